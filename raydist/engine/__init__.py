"""The engine: what every strategy shares and none writes again. step.py, the math (losses,
the loss-scaling rule, one step, evaluation); lr.py, each step's learning rate (scaling for the
global batch, warmup and schedule); loop.py, THE epoch loop and the Trainer a
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
from raydist.engine.lr import effective_lr, make_scheduler, restore_scheduler
from raydist.engine.outputs import claim, machine_info, save_metrics, save_outputs
from raydist.engine.preflight import check_out, preflight
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
    total_steps,
    train_epoch,
)

__all__ = ["LOSSES", "Diverged", "EpochRecord", "Group", "Record", "Report",
           "RunResult", "StateDict", "Trainer", "announce", "backward", "check_out", "claim", "correct",
           "denominator", "effective_lr", "evaluate", "fit", "fit_restarting", "global_batches", "loss_fn",
           "machine_info", "make_optimizer", "make_record", "make_scheduler", "preflight", "restart_line",
           "restore_scheduler", "save_metrics", "save_outputs", "setup", "step", "total_steps",
           "train_epoch"]
