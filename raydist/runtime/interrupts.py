"""Ctrl-C (SIGINT) and SIGTERM in a `raydist` command: both unwind the driver as a
KeyboardInterrupt does, so that every `finally` runs (actors are killed, ddp's workers stop
after their epoch, the embedded Ray is shut down at exit) and the command exits with
128 + the signal's number (130, 143). What a command says on the way out is the CLI's."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)
received: list[int] = []
"""The signals this process has received since `catching` started, first first."""
_active: list[bool] = []


class Interrupted(KeyboardInterrupt):
    """A signal stopped the command. `epoch`: the epoch a run was training when it came (set
    on the way out by `raydist.train`; None before training started)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.epoch = signum, None

    @property
    def code(self) -> int:
        return 128 + self.signum


def _raise(signum: int, frame: FrameType | None) -> None:
    received.append(signum)
    raise Interrupted(signum)


@contextlib.contextmanager
def catching() -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted in the main thread while this is open (elsewhere,
    where Python delivers no signals, it does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received.clear()
    before = {s: signal.signal(s, _raise) for s in SIGNALS}
    _active.append(True)
    try:
        yield
    finally:
        _active.pop()
        for s, handler in before.items():
            signal.signal(s, handler)


def reassert() -> None:
    """After ray.init: Ray's core installs its own SIGTERM handler (it logs and aborts), which
    would end the driver without unwinding; while `catching`, SIGTERM is raydist's again."""
    if _active and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise)


@contextlib.contextmanager
def sigterm_as_sigint() -> Iterator[None]:
    """SIGTERM does what SIGINT does at that moment: inside Ray Tune's fit, Tune's own handler
    stops the sweep gracefully, saving its state; the signal is remembered for the exit code."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler) and handler is not _raise:
            handler(signal.SIGINT, frame)
        else:
            raise Interrupted(signum)

    before = signal.signal(signal.SIGTERM, forward)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def code() -> int:
    """The exit code of a command that the first signal received stopped (130 for SIGINT)."""
    return 128 + (received[0] if received else signal.SIGINT)
