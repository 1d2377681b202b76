"""`raydist train` and `raydist sweep` as a user runs them: a worker that dies prints one restart
line and no traceback (Ray's account goes to --out/ray.log); Ctrl-C or SIGTERM stops the command
within 30 s with exit code 130 / 143, one line saying how to resume, every finished epoch's
checkpoint kept and none of its Ray processes left; the same command again ends with the model an
uninterrupted run ends with. A sweep interrupted by Ctrl-C, or whose driver is SIGKILLed,
finishes with `raydist sweep --resume DIR`. Only processes these tests started are ever
signalled.

What only a process of its own shows (its exit code, its embedded Ray gone with it, a driver
SIGKILLed) runs once as a CLI subprocess starting its own Ray (hence the multinode tier): ps
stopped by SIGTERM (143), a sweep by Ctrl-C (130), a sweep's driver SIGKILLed. The rest runs the
same commands in this process (cli.main) on the session's Ray, a Ray start each fewer: the
uninterrupted runs, every resume, and ddp's and the pipeline's Ctrl-C, a signal this process sends
itself (cli.main returns 130, and the run's workers are gone in place of its processes)."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from ray.util.state import list_actors
from rayprocs import alive, parents, processes_of, stop

from raydist import cli

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[1]
RAYDIST = [sys.executable, "-m", "raydist.cli"]
STOP_S = 30  # the promise: the command ends this long after the signal
GONE_S = 15  # and its Ray processes this long after the command
BASE = ["--model", "mlp", "--data", "digits", "--hidden", "16", "--epochs", "8", "--batch-size", "64",
        "--seed", "0", "--val-fraction", "0.1", "--optimizer", "adam"]
STRATEGIES = {  # strategy: (its flags, the signal it gets, in a subprocess of its own?)
    "ps": (["--strategy", "ps", "--workers", "2", "--servers", "1"], signal.SIGTERM, True),
    "pipeline": (["--strategy", "pipeline", "--stages", "2"], signal.SIGINT, False),
    "ddp": (["--strategy", "ddp", "--workers", "2"], signal.SIGINT, False),
}


def env(**extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAYDIST_FAULT")}
    return {**clean, "PYTHONPATH": str(REPO), **extra}


def descendants(root: int) -> list[int]:
    up = parents()
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += [c for c, p in up.items() if p == pid]
    return found


def session_of(pids: list[int]) -> str | None:
    """The Ray session folder of the embedded Ray among `pids` (from its raylet's command line)."""
    for pid in pids:
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        for arg in args:
            if arg.startswith("--session-dir="):
                return arg.split("=", 1)[1]
    return None


class Command:
    """One CLI command in a session of its own; its output in a file; on the way out, whatever
    is left of its process tree or its Ray session is stopped by PID."""

    def __init__(self, tmp: Path, args: list[str], name: str, **extra: str) -> None:
        self.log = tmp / f"{name}.out"
        with self.log.open("w") as f:
            self.proc = subprocess.Popen([*RAYDIST, *args], cwd=REPO, env=env(**extra), stdout=f,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.tree: list[int] = []
        self.session: str | None = None

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, ready, what: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, f"the command ended before {what}:\n{self.text()}"
            assert time.monotonic() < deadline, f"no {what} in {timeout} s:\n{self.text()}"
            time.sleep(0.05)

    def signal(self, sig: int) -> float:
        """Send `sig` to the command (only it, as `kill` does); returns how long it took to end."""
        self.tree = descendants(self.proc.pid)
        self.session = session_of(self.tree)
        t = time.monotonic()
        os.kill(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=STOP_S + 30)
        except subprocess.TimeoutExpired:
            pass
        return time.monotonic() - t

    def leftovers(self) -> list[int]:
        """Its processes still alive GONE_S after it ended (its tree when signalled, and anything
        that names its Ray session)."""
        deadline = time.monotonic() + GONE_S
        while True:
            left = [p for p in self.tree[1:] if alive(p)]
            left += processes_of(self.session) if self.session else []
            if not left or time.monotonic() > deadline:
                return sorted(set(left))
            time.sleep(0.2)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        stop([p for p in self.tree[1:] if alive(p)] + (processes_of(self.session) if self.session else []))


class Console(io.TextIOBase):
    """sys.stdout and sys.stderr of a command run in this process: one text, as a terminal
    shows them, readable while the command runs."""

    encoding = "utf-8"

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            self.parts.append(text)
        return len(text)

    def text(self) -> str:
        with self.lock:
            return "".join(self.parts)


def in_process(args: list[str], stop_when: Callable[[str], bool] | None = None,
               sig: int = signal.SIGINT) -> tuple[int, str, float | None]:
    """cli.main(args) here, on the session's Ray, its console captured; with `stop_when`, a
    thread sends this process `sig` once the console satisfies it. Returns the exit code, the
    console and how long the command took to end after the signal."""
    console, done, sent = Console(), threading.Event(), []

    def watch() -> None:
        while not done.wait(0.05):
            if stop_when(console.text()):
                sent.append(time.monotonic())
                os.kill(os.getpid(), sig)
                return

    late: list[int] = []  # a signal after the command ended must not stop pytest itself
    previous = signal.signal(sig, lambda signum, frame: late.append(signum))
    streams = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = console
    watcher = threading.Thread(target=watch, daemon=True)
    if stop_when:
        watcher.start()
    try:
        code = cli.main(args)
        ended = time.monotonic()
    finally:
        sys.stdout, sys.stderr = streams
        done.set()
        if stop_when:
            watcher.join()
        signal.signal(sig, previous)
    assert not late, f"the command ended before the signal:\n{console.text()}"
    return code, console.text(), ended - sent[0] if sent else None


ACTORS = {"ddp": "RayTrainWorker", "pipeline": "Stage"}  # the class of a run's workers, in process


def workers(strategy: str) -> set[str]:
    """The ids of the strategy's workers alive in the session's Ray."""
    rows = list_actors(filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False)
    return {a.actor_id for a in rows if a.class_name == ACTORS[strategy]}


def workers_left(strategy: str, before: set[str]) -> set[str]:
    """The strategy's workers started since `before` still alive GONE_S after the command ended."""
    deadline = time.monotonic() + GONE_S
    while (left := workers(strategy) - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.fixture(scope="module")
def uninterrupted(ray_local, tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """The three runs undisturbed, the same commands in this process."""
    tmp = tmp_path_factory.mktemp("clean")
    for name, (flags, _, _) in STRATEGIES.items():
        code, console, _ = in_process(["train", *BASE, *flags, "--out", str(tmp / name)])
        assert code == 0, console
    return {name: torch.load(tmp / name / "model.pt") for name in STRATEGIES}


def interrupted_in_a_subprocess(tmp_path: Path, args: list[str], sig: int) -> str:
    first = Command(tmp_path, args, "first", RAYDIST_FAULT="1:2")  # worker/replica/stage 1 dies in epoch 2
    try:
        first.wait_for(lambda: re.search(r"^epoch 3 ", first.text(), re.M), "epoch 3")
        took = first.signal(sig)
        assert first.proc.returncode == 128 + sig, first.text()
        assert took < STOP_S, f"it took {took:.1f} s to stop"
        assert first.leftovers() == [], "processes of the interrupted command still alive"
    finally:
        first.close()
    return first.text()


def interrupted_in_process(strategy: str, args: list[str], sig: int,
                           monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("RAYDIST_FAULT", "1:2")  # worker/stage 1 dies in epoch 2
    before = workers(strategy)
    code, console, took = in_process(args, lambda text: re.search(r"^epoch 3 ", text, re.M), sig)
    monkeypatch.delenv("RAYDIST_FAULT")
    assert code == 128 + sig, console
    assert took < STOP_S, f"it took {took:.1f} s to stop"
    assert workers_left(strategy, before) == set(), "workers of the interrupted command still alive"
    return console


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_death_prints_one_line_and_an_interrupted_run_resumes_to_the_same_model(
        strategy, uninterrupted, tmp_path, monkeypatch):
    flags, sig, own_process = STRATEGIES[strategy]
    out = tmp_path / "out"
    args = ["train", *BASE, *flags, "--max-failures", "1", "--out", str(out)]
    if own_process:
        console = interrupted_in_a_subprocess(tmp_path, args, sig)
    else:
        console = interrupted_in_process(strategy, args, sig, monkeypatch)
    kind = {"ddp": "ddp worker", "ps": "ps replica", "pipeline": "pipeline stage"}[strategy]
    restarts = re.findall(r"^restart .*$", console, re.M)
    assert len(restarts) == 1 and re.fullmatch(
        rf"restart 1/1: {kind} 1 \(pid \d+\) died; resuming from epoch [12]", restarts[0]), console
    assert "Traceback" not in console and "(raylet)" not in console, console
    stopped = re.findall(r"^interrupted at epoch (\d+); run the same command again to resume$", console, re.M)
    assert len(stopped) == 1, console
    detail = (out / "ray.log").read_text()  # Ray's own account of the death, naming the process
    pid = re.search(r"\(pid (\d+)\)", restarts[0]).group(1)
    assert pid in detail and "died" in detail, detail[-3000:]
    epoch = int(stopped[0])
    assert 4 <= epoch <= 8

    code, again = in_process(args)[:2]  # the same command again
    assert code == 0, again
    if strategy != "ddp":  # ps and pipeline resume from checkpoint.pt: epochs before it are not redone
        assert re.findall(r"^epoch (\d+) ", again, re.M)[0] == str(epoch)
    model, clean = torch.load(out / "model.pt"), uninterrupted[strategy]
    assert list(model) == list(clean) and all(torch.equal(model[k], clean[k]) for k in clean)


def sweep_file(tmp_path: Path, trials: int, epochs: int = 3) -> Path:
    """A sweep of `trials` trials one after the other (lr 0.001, 0.002, ...)."""
    lrs = ", ".join(f"{0.001 * (i + 1):g}" for i in range(trials))
    (tmp_path / "sweep.yaml").write_text(SWEEP.replace("LRS", lrs).replace("EPOCHS", str(epochs)))
    return tmp_path / "sweep.yaml"


SWEEP = """
strategy: local
model: mlp
data: digits
hidden: [16]
epochs: EPOCHS
batch_size: 16
lr: {grid: [LRS]}
sweep: {max_concurrent: 1}
"""


def statuses(out: Path) -> list[str]:
    return [yaml.safe_load(p.read_text())["status"] for p in sorted(out.glob("trials/*/trial.yaml"))]


def resumed_to_the_end(out: Path, trials: int) -> None:
    code, console = in_process(["sweep", "--resume", str(out)])[:2]
    assert code == 0, console
    assert statuses(out) == ["completed"] * trials, console


def test_a_sweep_stopped_by_ctrl_c_continues_with_resume(ray_local, tmp_path):
    """Stopped once the first of its three trials has finished: two are left for the resume."""
    out = tmp_path / "out"
    first = Command(tmp_path, ["sweep", str(sweep_file(tmp_path, 3)), "--out", str(out)], "first")
    try:
        first.wait_for(lambda: "completed" in statuses(out), "a completed trial")
        took = first.signal(signal.SIGINT)
        assert first.proc.returncode == 130, first.text()
        assert took < STOP_S, f"it took {took:.1f} s to stop"
        assert first.leftovers() == [], "processes of the interrupted sweep still alive"
    finally:
        first.close()
    assert f"sweep: interrupted; continue it with `raydist sweep --resume {out}`" in first.text()
    assert "Traceback" not in first.text() and "Tuner.restore" not in first.text(), first.text()
    resumed_to_the_end(out, 3)


def test_a_sweep_whose_driver_was_killed_continues_with_resume(ray_local, tmp_path):
    """Six trials: room for Tune to save its state while trials are still left. Tune saves it
    every so often (TUNE_GLOBAL_CHECKPOINT_S, by default a share of its own loop's time); warm
    trial actors run a 3-epoch trial in a fraction of a second, so the sweep could end before any
    save came after its newest trial began: 40 epochs a trial (a second or two), and this
    driver saves at every step of its loop."""
    out = tmp_path / "out"
    first = Command(tmp_path, ["sweep", str(sweep_file(tmp_path, 6, epochs=40)), "--out", str(out)],
                    "first", TUNE_GLOBAL_CHECKPOINT_S="0")
    seen: dict[str, float] = {}

    def saved_since_last_trial_began() -> bool:
        """A trial has finished, and Tune's state was saved after the newest trial began: a
        trial Tune's saved state does not know would be started afresh under a new id."""
        for trial in out.glob("trials/*"):
            seen.setdefault(trial.name, time.time())
        states = list(out.glob("tune/experiment_state*.json"))
        return ("completed" in statuses(out) and bool(states)
                and max(p.stat().st_mtime for p in states) > max(seen.values()) + 0.5)

    try:
        first.wait_for(saved_since_last_trial_began, "a saved state")
        first.signal(signal.SIGKILL)
        assert first.proc.returncode == -signal.SIGKILL
    finally:
        first.close()  # a SIGKILLed driver shuts nothing down: its Ray is stopped by PID here
    resumed_to_the_end(out, 6)
