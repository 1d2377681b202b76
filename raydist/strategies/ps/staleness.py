"""Async ps's bookkeeping, pure Python so that the staleness rule is testable on its own: which
shard a free replica takes next, and whether a gradient read at some version of the weights is
still fresh enough to apply (Downpour with bounded staleness)."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

Item = tuple[int, int]
"""(step, part): one shard of one global batch."""


class AsyncSchedule:
    """The shards of one async epoch, handed out in order to whichever replica is free. `version`
    counts applied updates; a gradient read at version v is applied only if at most
    `max_staleness` updates came after v, otherwise its shard goes back to the front."""

    def __init__(self, items: Sequence[Item], max_staleness: int) -> None:
        self.todo, self.max_staleness = deque(items), max_staleness
        self.version = 0
        self.discarded = 0

    def next(self) -> Item | None:
        return self.todo.popleft() if self.todo else None

    def finish(self, item: Item, read_version: int) -> bool:
        """True: apply the gradient (the version advances). False: discarded, shard re-queued."""
        if self.version - read_version > self.max_staleness:
            self.todo.appendleft(item)
            self.discarded += 1
            return False
        self.version += 1
        return True
