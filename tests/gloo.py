"""`world` gloo processes on loopback without Ray, for the tests of what really crosses between
DDP ranks (tests/test_comm.py, tests/test_syncbn.py)."""

from __future__ import annotations

import multiprocessing
import queue
import socket
from collections.abc import Callable
from typing import Any

import pytest


def run_ranks(probe: Callable[[int, int, Any], None], world: int, results: int,
              timeout: float) -> list[Any]:
    """Start probe(rank, port, queue) in `world` spawned processes (rank 0 hosts the process
    group at `port`) and return the first `results` items they put on the queue."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=probe, args=(rank, port, out), daemon=True) for rank in range(world)]
    for p in procs:
        p.start()
    try:
        return [out.get(timeout=timeout) for _ in range(results)]
    except queue.Empty:
        pytest.fail(f"the gloo processes gave no result in {timeout:g} s")
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
