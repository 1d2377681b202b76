"""P13: raydist fsdp (2 workers x 1 thread, Ray Train, gloo) against plain PyTorch FSDP2 under
`torchrun --nproc_per_node 2` (gloo), same model, data, batch order and units (one per block,
then the root): steady-state epoch time. P1's protocol, with fsdp for ddp.

    .venv/bin/python bench/p13_fsdp_vs_torchrun.py --reps 5
"""

from __future__ import annotations

import common


def main() -> None:
    common.against_torchrun("P13", "fsdp", "torchrun FSDP2", "torch_fsdp.py",
                            common.peer_parser(__doc__).parse_args())


if __name__ == "__main__":
    main()
