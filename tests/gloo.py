"""`world` gloo processes on loopback without Ray, for the tests of what really crosses between
DDP ranks (tests/test_comm.py, tests/test_syncbn.py, tests/test_tp_plan.py).

The processes are spawned once per session and kept: each module's probe runs in the same ones,
under a process group of its own that the probe opens and destroys. A spawned process spends
~3 s importing torch, raydist and scikit-learn (digits) before its probe does anything, on each
of its ranks; three modules paying that once instead of thrice save ~6 s of `make unit` on 2
cores. A probe that fails or hangs takes its processes with it: the next module starts new ones."""

from __future__ import annotations

import multiprocessing
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import pytest

_ranks: dict[int, tuple[list[Any], list[Any], Any]] = {}  # world: (processes, inboxes, results)


class Failed:
    """What a rank puts on the queue in place of its results when its probe raised."""

    def __init__(self, rank: int, text: str) -> None:
        self.rank, self.text = rank, text


def serve(rank: int, inbox: Any, results: Any) -> None:
    """One rank: run each probe sent until told to stop (None)."""
    while (job := inbox.get()) is not None:
        probe, port = job
        try:
            probe(rank, port, results)
        except BaseException:
            results.put(Failed(rank, traceback.format_exc()))
            raise  # its peers may be stuck in a collective: this pool is not used again


def _close(world: int) -> None:
    procs, inboxes, _ = _ranks.pop(world)
    for p, inbox in zip(procs, inboxes, strict=True):
        if p.is_alive():
            inbox.put(None)
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()


def _pool(world: int) -> tuple[list[Any], list[Any], Any]:
    if world in _ranks and not all(p.is_alive() for p in _ranks[world][0]):
        _close(world)
    if world not in _ranks:
        ctx = multiprocessing.get_context("spawn")
        results = ctx.Queue()
        inboxes = [ctx.Queue() for _ in range(world)]
        procs = [ctx.Process(target=serve, args=(rank, inboxes[rank], results), daemon=True)
                 for rank in range(world)]
        for p in procs:
            p.start()
        _ranks[world] = procs, inboxes, results
    return _ranks[world]


def run_ranks(probe: Callable[[int, int, Any], None], world: int, results: int,
              timeout: float) -> list[Any]:
    """Run probe(rank, port, queue) on each of the session's `world` gloo processes (rank 0
    hosts the process group at `port`) and return the first `results` items they put on the
    queue. `probe` is a module-level function (it is pickled by name)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _, inboxes, out = _pool(world)
    for inbox in inboxes:
        inbox.put((probe, port))
    ok = False
    try:
        got = [out.get(timeout=timeout) for _ in range(results)]
        failed = [g for g in got if isinstance(g, Failed)]
        if failed:
            pytest.fail(f"gloo rank {failed[0].rank} raised:\n{failed[0].text}")
        ok = True
        return got
    except queue.Empty:
        pytest.fail(f"the gloo processes gave no result in {timeout:g} s")
    finally:
        if not ok:
            _close(world)
