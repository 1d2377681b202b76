"""`train`, the one path every run takes: pre-flight, claim the output folder, run, save.

It sits above the strategies (it runs one, picked from raydist.strategies' registry, through
the engine's pre-flight and outputs, logging to a tracker); `cli train`, a sweep's trials and
the benchmarks call it."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from raydist.config import ConfigError, RunSpec
from raydist.engine import Diverged, Record, Report, RunResult, claim, preflight, save_metrics, save_outputs
from raydist.errors import Stalled
from raydist.strategies import get
from raydist.tracking import open_run


def progress(rec: Record) -> None:
    acc = f"  val_accuracy {rec['val_accuracy']:.4f}" if "val_accuracy" in rec else ""
    print(f"epoch {rec['epoch']}  train_loss {rec['train_loss']:.4f}  "
          f"val_loss {rec['val_loss']:.4f}{acc}  {rec['samples_per_s']:.0f} samples/s  "
          f"{rec['epoch_time_s']:.2f} s", flush=True)


def train(spec: RunSpec, report: Report = progress, track: bool = True) -> RunResult:
    """Pre-flight, run and save one spec. User errors surface before the output folder
    exists; a ConfigError raised later removes the folder this call created. A diverged run
    leaves its metrics.csv (no model.pt). Ray's console output goes to out/ray.log while it
    runs. Interrupted (KeyboardInterrupt, Ctrl-C or SIGTERM through raydist.runtime.interrupts), the
    checkpoints stay, and the exception's `epoch` says which epoch was under way. `track`: log the
    epochs to `spec.tracking` (a sweep's trials do not: Tune's callbacks track them)."""
    strategy = get(spec.strategy)
    preflight(spec, strategy)
    out = Path(spec.out)
    created = not out.exists()
    claim(spec)
    seen: list[Record] = []
    tracker = open_run(spec if track else None)

    def tee(rec: Record) -> None:
        seen.append(rec)
        tracker.log(rec)
        report(rec)

    try:
        with ray_log(strategy, out):
            result = strategy.run(spec, tee)
    except KeyboardInterrupt as e:
        e.epoch = getattr(e, "epoch", None) or (seen[-1]["epoch"] + 1 if seen else None)  # type: ignore[attr-defined]
        raise
    except ConfigError:
        tracker.close(failed=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    except BaseException as e:
        tracker.close(failed=True)
        if isinstance(e, Diverged):  # the epochs it trained stay on disk, the diverged one included
            save_metrics(out, e.history or seen)
        elif isinstance(e, Stalled) and seen:  # the finished epochs stay readable (a resume
            save_metrics(out, seen)  # rewrites the file from its checkpoint)
        raise
    tracker.close()
    save_outputs(out, spec, result)
    return result


@contextlib.contextmanager
def ray_log(strategy: ModuleType, out: Path) -> Iterator[None]:
    """A Ray strategy's run sends what Ray prints to out/ray.log (raydist.runtime.logs.ray_log)."""
    if strategy.resources is None:
        yield
        return
    from raydist.runtime import logs  # imports Ray

    with logs.ray_log(out / logs.RAY_LOG):
        yield
