"""P11: `local` on the same rows streamed through Ray Data (`parquet-dir:`, 20 files) against
held in memory (`parquet:`, one file of the same rows), in training samples/s, alternating.

    .venv/bin/python bench/p11_streamed.py --reps 3

Both: mlp 8 -> 16 -> 2, sgd, global batch 1024, 2 epochs, 1 thread; the median samples/s of
the epochs after the first. The in-memory side indexes tensors; the streamed side pays Ray
Data's reading, its local shuffle buffer and the conversion of each batch to tensors.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import common
import numpy as np
import pandas as pd


def write(root: Path, files: int, rows: int) -> tuple[Path, Path]:
    """The same rows as a folder of `files` Parquet files and as one file."""
    rng = np.random.default_rng(0)
    x = rng.random((files * rows, 8), dtype=np.float32)
    y = ((np.sin(3 * x[:, 0]) + x[:, 1] * x[:, 2] - x[:, 3]) > 0.3).astype(np.int64)
    table = pd.DataFrame(x, columns=[f"f{j}" for j in range(8)]).assign(label=y)
    (root / "dir").mkdir()
    for i in range(files):
        table.iloc[i * rows:(i + 1) * rows].to_parquet(root / "dir" / f"part-{i:03d}.parquet", index=False)
    table.to_parquet(root / "all.parquet", index=False)
    return root / "dir", root / "all.parquet"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--files", type=int, default=20)
    p.add_argument("--rows", type=int, default=10_000, help="rows per file")
    args = p.parse_args()
    common.start_ray()
    base = {"strategy": "local", "model": "mlp", "hidden": "16", "optimizer": "sgd", "lr": 0.1,
            "batch_size": 1024, "epochs": 2, "threads_per_worker": 1}
    with tempfile.TemporaryDirectory(prefix="p11_") as tmp:
        folder, whole = write(Path(tmp), args.files, args.rows)
        sides = {"streamed (parquet-dir, Ray Data)": common.spec(**base, data=f"parquet-dir:{folder}"),
                 "in memory (parquet)": common.spec(**base, data=f"parquet:{whole}")}
        kept = common.alternate({name: (lambda s=s: common.steady(common.raydist_records(s), "samples_per_s"))
                                 for name, s in sides.items()}, args.reps)
    ref = common.median(kept["in memory (parquet)"])
    rows = [[name, common.median(v), common.median(v) / ref] for name, v in kept.items()]
    print(f"P11 on {common.machine()}; {args.files} files x {args.rows} rows\n")
    print(common.markdown(["side", "median samples/s", "vs in memory"], rows))


if __name__ == "__main__":
    main()
