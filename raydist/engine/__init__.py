"""The engine: what every strategy shares and none writes again. step.py, the math (losses,
the loss-scaling rule, one step, evaluation); loop.py, THE epoch loop and the Trainer a
strategy drives it through; record.py, the per-epoch record's schema; preflight.py, the checks
before any work; outputs.py, the files every run leaves."""

from raydist.engine.loop import (
    Diverged,
    Group,
    Report,
    RunResult,
    StateDict,
    Trainer,
    announce,
    fit,
    fit_restarting,
    restart_line,
)
from raydist.engine.outputs import claim, machine_info, save_metrics, save_outputs
from raydist.engine.preflight import preflight
from raydist.engine.record import EpochRecord, Record, make_record
from raydist.engine.step import (
    LOSSES,
    backward,
    correct,
    denominator,
    evaluate,
    global_batches,
    loss_fn,
    make_optimizer,
    setup,
    step,
    train_epoch,
)

__all__ = ["LOSSES", "Diverged", "EpochRecord", "Group", "Record", "Report", "RunResult", "StateDict",
           "Trainer", "announce", "backward", "claim", "correct", "denominator", "evaluate", "fit",
           "fit_restarting", "global_batches", "loss_fn", "machine_info", "make_optimizer", "make_record",
           "preflight", "restart_line", "save_metrics", "save_outputs", "setup", "step", "train_epoch"]
