"""Ray's console output into a file: while a Ray strategy runs, the driver's forwarded worker
output and Ray's loggers go to out/ray.log."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from raydist.runtime import ray_compat

RAY_LOG = "ray.log"


ANSI = re.compile(r"\x1b\[[0-9;]*m")


_logs: list[TextIO] = []


_logs_lock = threading.Lock()


_console: dict[logging.Handler, logging.Logger] = {}


class _Plain:
    """A file that drops the colour codes Ray puts around its prefixes."""

    def __init__(self, files: list[TextIO]) -> None:
        self.files = files

    def write(self, text: str) -> None:
        for f in self.files:
            f.write(ANSI.sub("", text))

    def flush(self) -> None:
        for f in self.files:
            f.flush()


def _to_files(data: dict[str, Any], ignore_prefix: bool) -> None:
    with _logs_lock:
        ray_compat.print_worker_batch(data, _Plain(_logs), ignore_prefix)
        for f in _logs:
            f.flush()


def _ray_loggers() -> list[logging.Logger]:
    named = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.split(".")[0] == "ray"]
    return [logging.getLogger("ray"), *named]


@contextlib.contextmanager
def ray_log(path: str | Path) -> Iterator[Path]:
    """While it is open, what Ray would print on this driver's console goes to `path` instead:
    the workers' forwarded output and the raylet's reports of dead workers (tracebacks, "actor
    died"), and the records of Ray's own loggers (Ray Train's, Tune's). raydist's lines (epochs,
    restarts, notes) stay on the console. Nested or concurrent uses each get everything."""
    path = Path(path)
    f = path.open("a", buffering=1)
    with _logs_lock:
        _logs.append(f)
        if len(_logs) == 1:
            ray_compat.route_worker_output(_to_files)
            _swap_console_handlers()
    to_file = logging.StreamHandler(_Plain([f]))
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("ray").addHandler(to_file)
    try:
        yield path
    finally:
        logging.getLogger("ray").removeHandler(to_file)
        with _logs_lock:
            _logs.remove(f)
            if not _logs:
                ray_compat.route_worker_output(None)
                for handler, log in _console.items():
                    log.addHandler(handler)
                _console.clear()
        f.close()


def _swap_console_handlers() -> None:
    """Take Ray's console handlers off its loggers (given back when the last log closes)."""
    for log in _ray_loggers():
        for handler in list(log.handlers):
            if getattr(handler, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__):
                log.removeHandler(handler)
                _console[handler] = log
