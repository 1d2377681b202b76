"""Entrypoint for Ray Jobs: `raydist train ...` run on the cluster's head.

    ray job submit --working-dir . -- python jobs/train.py --strategy ddp --workers 2 --out /abs/dir

Ray uploads the working directory and puts it on PYTHONPATH, so `raydist` imports from there;
inside a job RAY_ADDRESS names the cluster, and the run joins it.
"""

import sys

from raydist.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
