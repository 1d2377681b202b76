"""A sweep and its report as a Ray job, on the cluster the job runs in (Ray Jobs sets
RAY_ADDRESS for the entrypoint):

    ray job submit --working-dir . -- python jobs/sweep.py tune_configs/scaling.yaml [--out DIR]

The arguments are those of `raydist sweep`; this is a thin wrapper over the CLI.
"""

from __future__ import annotations

import sys

from raydist import cli


def main(argv: list[str]) -> int:
    args = cli.build_parser().parse_args(["sweep", *argv])
    code = cli.main(["sweep", *argv])
    return code or cli.main(["report", cli.sweep_dir(args)])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
