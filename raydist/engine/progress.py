"""Progress a person at a terminal can follow, and nothing new for a log.

- One run: a tqdm bar per epoch over the training samples (samples/s, ETA, step i/n), drawn
  while the epoch trains and cleared before the epoch's line is printed. It is drawn where the
  steps run in this process (local, and pipeline's driver, which hands out every global batch);
  ddp's steps run in Ray Train workers and ps's in replica actors: those runs print their
  epoch lines only.
- A sweep: one line that updates, trials done / running / pending and an ETA from the rate at
  which trials finished so far; the sweep's own event lines are printed above it.

Both are drawn only when the stream is a terminal: in a CI log or a file the output stays
exactly what it was, one line per epoch (and per trial event).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from tqdm import tqdm


def screen() -> dict[str, int]:
    """tqdm's width and height: a pseudo-terminal whose size was never set says 0 x 0, and tqdm
    then draws nothing; such a one is taken as 80 x 24."""
    size = shutil.get_terminal_size((80, 24))
    return {"ncols": size.columns, "nrows": size.lines}


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Steps:
    """An epoch's global batches (len and indexing as the batches have them), with a bar that
    advances by each batch's samples when the trainer asks for the next one, i.e. once the step
    before is done. A stream's batches say their `samples` (they cannot be counted ahead)."""

    def __init__(self, batches: Sequence[Any], epoch: int, stream: TextIO) -> None:
        self.batches, self.epoch, self.stream = batches, epoch, stream

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Any:
        return self.batches[i]

    def __iter__(self) -> Iterator[Any]:
        total = getattr(self.batches, "samples", None) or sum(len(b) for b in self.batches)
        bar = tqdm(total=total, desc=f"epoch {self.epoch}", unit=" samples", leave=False,
                   file=self.stream, postfix=f"step 0/{len(self)}", **screen())
        try:
            for i, batch in enumerate(self.batches, start=1):
                yield batch
                bar.set_postfix_str(f"step {i}/{len(self)}", refresh=False)
                bar.update(len(batch))
        finally:
            bar.close()  # leave=False: the line is cleared for the epoch's own line


def steps(batches: Sequence[Any], epoch: int, stream: TextIO | None = None) -> Sequence[Any]:
    """`batches` with a bar when `stream` (default: stdout) is a terminal, else `batches` itself."""
    stream = stream or sys.stdout
    return Steps(batches, epoch, stream) if is_terminal(stream) else batches


class SweepLine:
    """The sweep's status line: a tqdm bar over the trials whose count is the trials done, with
    `running` and `pending` beside it; tqdm's ETA is from the rate of finished trials."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.total = total
        self.bar = tqdm(total=total, desc="sweep", unit=" trials", file=self.stream, **screen(),
                        disable=not is_terminal(self.stream),
                        bar_format="{desc}: {n_fmt}/{total_fmt} done{postfix} "
                                   "[{elapsed}<{remaining}]",
                        postfix=f"0 running, {total} pending")

    def write(self, line: str) -> None:
        """One event line; at a terminal above the status line, which is redrawn below it."""
        if self.bar.disable:
            print(line, file=self.stream, flush=True)
        else:
            self.bar.write(line, file=self.stream)

    def update(self, done: int, running: int) -> None:
        if self.bar.disable:
            return
        self.bar.set_postfix_str(f"{running} running, {max(0, self.total - done - running)} pending",
                                 refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> SweepLine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
