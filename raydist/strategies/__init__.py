"""Strategy registry and `train`, the one path every run takes: pre-flight, claim the output
folder, run, save.

A strategy is a module (local.py) or a package (ddp/, ps/, pipeline/, fsdp/) holding everything of
it and nothing of another's, with:
- `check(spec, data)`: what it needs of the spec and data (ConfigError before anything runs);
- `resources`: `resources(spec, gpus) -> (CPUs, GPUs, what)` it asks of a cluster that has `gpus`
  GPUs now (with 0 before Ray starts: an embedded Ray is sized to its CPUs), or None for a
  strategy that runs without Ray;
- `RESUMES`: whether a run continues from the checkpoint in its output folder, and with it
  `check_saved(spec)`: the pre-flight's refusal (ConfigError) of a checkpoint there that this run
  cannot resume from (not plain data: raydist/engine/checkpoint.py; past spec.epochs);
- `run(spec, report) -> RunResult`: the recipe, driving the engine's epoch loop.
Adding one is a new module or package and its name below; strategies never import each other.

The Ray Train machinery ddp and fsdp share lives outside strategies, in raydist/raytrain/.
Modules are imported on first use: `ddp` pulls in Ray Train, which every ps replica and
pipeline stage process would otherwise pay for at start-up."""

from __future__ import annotations

import contextlib
import importlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from raydist.config import ConfigError, RunSpec
from raydist.engine import Diverged, Record, Report, RunResult, claim, preflight, save_metrics, save_outputs
from raydist.registry import Registry
from raydist.tracking import open_run

STRATEGIES: Registry[str] = Registry("strategy")
for _name in ("local", "ddp", "ps", "pipeline", "fsdp", "tp"):
    STRATEGIES.register(_name)(f"raydist.strategies.{_name}")


def get(name: str) -> ModuleType:
    """The strategy module `name` (ConfigError naming the choices if there is none)."""
    return importlib.import_module(STRATEGIES[name])


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
