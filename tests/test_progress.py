"""Progress at a terminal, and the same output as before anywhere else: a run's stdout on a
pseudo-terminal shows a bar per epoch; on a pipe it is one line per epoch. The sweep's status
line the same way, on a pty and on a plain stream.

The runs are the CLI's main in this process with sys.stdout a pty or a pipe: the bar is drawn
or not by what sys.stdout is (raydist.engine.progress), which a process of its own would only
show at the cost of ~4 s of imports each."""

from __future__ import annotations

import errno
import fcntl
import io
import os
import pty
import re
import struct
import termios
import threading
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from raydist.cli import main
from raydist.engine.progress import SweepLine, steps

pytestmark = pytest.mark.unit

EPOCH_LINE = re.compile(r"epoch \d+  train_loss \d+\.\d{4}  val_loss \d+\.\d{4}  val_accuracy \d\.\d{4}  "
                        r"\d+ samples/s  \d+\.\d{2} s")
# digits: 1797 samples, 20% held out -> 1438 to train, 23 global batches of 64
TRAIN = ["train", "--strategy", "local", "--data", "digits", "--epochs", "2",
         "--batch-size", "64"]


def pty_pair(cols: int = 120) -> tuple[int, int]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))
    return master, slave


def read_all(fd: int) -> str:
    """Everything written to the pty until its other side is closed (Linux then says EIO)."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError as e:
            if e.errno == errno.EIO:
                break
            raise
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def run_to(stdout: int, out: Path) -> int:
    """The CLI's main with sys.stdout writing to the file descriptor `stdout`, closed after."""
    with os.fdopen(stdout, "w") as stream, redirect_stdout(stream):
        return main([*TRAIN, "--out", str(out)])


def test_a_run_on_a_terminal_shows_a_bar_per_epoch(tmp_path, capsys):
    master, slave = pty_pair()
    shown = []  # read while the run writes: a full pty would block it
    reader = threading.Thread(target=lambda: shown.append(read_all(master)))
    reader.start()
    code = run_to(slave, tmp_path / "run")
    reader.join()
    os.close(master)
    [shown] = shown
    assert code == 0, capsys.readouterr().err
    for epoch in (1, 2):  # the bar is drawn when the epoch starts: 0 of 1438 samples, step 0/23
        assert re.search(rf"epoch {epoch}:\s+0%\|[^|]*\| 0/1438 \[[^]]*samples/s, step 0/23\]", shown), shown
    lines = [line.split("\r")[-1] for line in shown.replace("\r\n", "\n").split("\n")]
    assert sum(bool(EPOCH_LINE.fullmatch(line.replace("\x1b[A", "").strip())) for line in lines) == 2


def test_a_run_on_a_pipe_prints_one_line_per_epoch(tmp_path, capsys):
    read, write = os.pipe()
    shown = []  # read while the run writes: a full pipe would block it
    reader = threading.Thread(target=lambda: shown.append(os.fdopen(read).read()))
    reader.start()
    code = run_to(write, tmp_path / "run")
    reader.join()
    [stdout], err = shown, capsys.readouterr().err
    assert code == 0, err
    lines = stdout.splitlines()
    assert len(lines) == 3 and all(EPOCH_LINE.fullmatch(line) for line in lines[:2]), stdout
    assert lines[2] == f"wrote {tmp_path / 'run'}/spec.yaml, metrics.csv, model.pt"
    assert "\r" not in stdout + err


def test_the_bar_goes_only_to_a_terminal():
    batches = [list(range(4))] * 3
    assert steps(batches, 1, io.StringIO()) is batches
    master, slave = pty_pair()
    with os.fdopen(slave, "w") as tty:
        wrapped = steps(batches, 7, tty)
        assert list(wrapped) == batches and len(wrapped) == 3 and wrapped[1] == batches[1]
    shown = read_all(master)
    os.close(master)
    assert re.search(r"epoch 7:\s+0%\|[^|]*\| 0/12 ", shown), shown


def sweep_events(stream) -> None:
    """A sweep of 6 trials: 2 start, one finishes, a third starts."""
    with SweepLine(6, stream) as line:
        line.write("[0/6] t1 started")
        line.update(done=0, running=1)
        line.write("[0/6] t2 started")
        line.update(done=0, running=2)
        line.write("[1/6] t1 completed")
        line.update(done=1, running=1)
        line.write("[1/6] t3 started")
        line.update(done=1, running=2)


def test_the_sweep_line_updates_on_a_terminal():
    master, slave = pty_pair()
    with os.fdopen(slave, "w") as tty:
        sweep_events(tty)
    shown = read_all(master)
    os.close(master)
    for event in ("t1 started", "t2 started", "t1 completed", "t3 started"):
        assert event in shown
    assert "sweep: 0/6 done, 0 running, 6 pending" in shown  # drawn at the start
    assert "sweep: 1/6 done, 2 running, 3 pending" in shown  # and redrawn below each event
    assert "\r" in shown


def test_the_sweep_prints_only_its_event_lines_elsewhere():
    stream = io.StringIO()
    sweep_events(stream)
    assert stream.getvalue() == "[0/6] t1 started\n[0/6] t2 started\n[1/6] t1 completed\n[1/6] t3 started\n"
