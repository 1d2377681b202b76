"""`ps`: a parameter server on Ray actors.

`workers` replica actors hold the model and the data; each computes the gradient of its shard
of a global batch. `servers` parameter-server actors each own whole tensors of the model
(balanced by size), the fp32 master copy of them and the optimizer state for them; optimizers
act per tensor, so S servers stepping their own tensors equal one optimizer over all of them.

- sync:  every step all replicas' gradients go to the servers, which sum them and step once,
         and every replica reads the new weights. Replicas scale their loss by the GLOBAL batch,
         so the sum is the global-mean gradient: the run equals `local` to float32 round-off.
- async: (Downpour) the shards of an epoch's batches are a queue; whichever replica is free takes
         the next one, and its gradient is applied alone, against whatever weights are current.
         A gradient computed on weights more than `max_staleness` updates old is discarded and
         its shard recomputed on fresh weights (staleness.py). A slow replica
         (`straggler`) no longer holds the others back: they simply take more shards.

Communication is kept apart from the math: `Server` and `Replica` (actors.py) are plain
classes (the math: engine.backward and the optimizer step); group.py is the schedule, which
only moves object refs; sharding.py the split of the model and the wire format; staleness.py
async's bookkeeping. Tensors travel as flat numpy arrays, one per server, in `comm_dtype`
(zero-copy reads from the object store), and every ref goes straight from actor to actor: the
replicas' gradient refs are the servers' `apply` arguments, the servers' weight refs the
replicas' next arguments. numpy has no bfloat16: bfloat16 travels as its uint16 bit pattern (the
upper half of the float32, rounded to nearest even). Servers keep fp32 master weights whatever
the wire dtype.

lr schedule (engine/lr.py): every server steps its schedule with its optimizer, once per update:
in sync mode once per global batch, as local does; in async mode once per applied gradient, so
warmup_steps, lr_step_size and cosine's horizon count updates (workers per global batch).

Faults: after every epoch the driver writes spec.out/checkpoint.pt (weights, optimizer state by
tensor name, the servers' lr-schedule state, metrics history; its arrays as tensors,
sharding.to_file). When an actor dies, every actor is replaced and the run resumes from that
checkpoint, at most `max_failures` times; batch order depends only on (seed, epoch), so a
resumed sync run ends bit for bit where an uninterrupted one does. A new run whose `out` holds
a checkpoint of the same spec resumes from it, finished or not (engine.fit_restarting).

This module imports without Ray; the recipe (`run`) imports the actors when it runs.
"""

from __future__ import annotations

from typing import Any

from raydist.config import ConfigError, RunSpec
from raydist.data import Dataset, load_data
from raydist.engine import Report, RunResult, checkpoint, fit_restarting, global_batches
from raydist.models import build_model
from raydist.optim import OPTIMIZERS
from raydist.strategies.ps import cost  # noqa: F401 - its step time and bytes: strategy.cost
from raydist.strategies.ps.sharding import from_file, split_model

RESUMES = True
DATA_PARALLEL = True
"""Its N replicas each compute the gradient of 1/N of every global batch: the report sets its
rows beside the machine's compute bound (report/bound.py)."""
COUNT = "workers"
"""The knob that counts its workers (processes): N in `raydist plan`, its predicted bytes
and the report."""
SERVER_CPUS = 0.5
"""A server only sums and steps: half a CPU lets 2 replicas and 2 servers share 3 CPUs."""


class ActorFailed(RuntimeError):
    """An actor died more often than `max_failures` allows."""


def check(spec: RunSpec, data: Dataset) -> None:
    tensors = len(list(build_model(spec, data).parameters()))
    if spec.servers > tensors:
        raise ConfigError(f"servers: {spec.servers} parameter servers but the model has only "
                          f"{tensors} parameter tensors; expected servers <= {tensors}")
    batch = data.n_train if OPTIMIZERS[spec.optimizer].full_batch else min(spec.global_batch, data.n_train)
    if spec.workers > batch:
        raise ConfigError(f"workers: {spec.workers} replicas but a global batch holds only {batch} "
                          f"samples; expected workers <= {batch}")


check_saved = checkpoint.check_saved  # out/checkpoint.pt: plain data, not past spec.epochs


def resources(spec: RunSpec, gpus: float) -> tuple[float, float, str]:
    """(CPUs, GPUs, what) it asks of a cluster; ps runs on CPUs whatever the cluster has."""
    return (spec.workers * spec.threads_per_worker + spec.servers * SERVER_CPUS, 0.0,
            f"ps ({spec.workers} replicas x {spec.threads_per_worker} CPU + "
            f"{spec.servers} servers x {SERVER_CPUS:g} CPU)")


def run(spec: RunSpec, report: Report) -> RunResult:
    """The recipe: split the model's tensors over the servers; start the servers (from the
    checkpoint's weights and optimizer state, or the fresh model's) and the replicas; drive the
    engine's epoch loop, restarting from the checkpoint when an actor dies."""
    from raydist.runtime import connect
    from raydist.strategies.ps.group import SERVER_STEPS, PSGroup, lost, state_dict

    connect.connect(spec)
    data = load_data(spec)
    model = build_model(spec, data)  # the weights every attempt without a checkpoint starts from
    parts = split_model(model, spec.servers)
    steps = spec.epochs * SERVER_STEPS[spec.mode](global_batches(spec, data, 1), spec.workers)

    def start(saved: dict[str, Any] | None) -> PSGroup:
        saved = from_file(saved) if saved else None
        weights = saved["weights"] if saved else {n: p.detach().numpy() for n, p in model.named_parameters()}
        saved = saved or {}
        return PSGroup.start(spec, model, parts, weights, saved.get("optimizer", {}),
                           saved.get("scheduler"), steps)

    return fit_restarting(spec, data, report, start=start,
                          finished=lambda saved: state_dict(model, from_file(saved)["weights"]),
                          lost=lost, error=ActorFailed)
