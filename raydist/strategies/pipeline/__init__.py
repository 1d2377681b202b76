"""`pipeline`: the model cut into K stages, one Ray actor each; GPipe, 1F1B, interleaved 1F1B
(V chunks per actor), ZB-H1; R replicas of the whole pipeline (DP x PP).

Every global batch is split over the R replicas, and each replica's share into M micro-batches.
The driver makes one call per stage actor per global batch; the stages then run their schedule
among themselves, activations flowing forward and their gradients back over a gloo process
group of the stage actors (point to point, never through the driver or the object store). The
last stage's loss is the SUM over its micro-batch divided by the GLOBAL batch size
(engine.denominator), so the gradients accumulated over the micro-batches (and summed over the
replicas of a stage position, one all-reduce per step) are the full-batch gradient; every stage
steps its own optimizer once all micro-batches are back (the flush), and the run equals `local`
to round-off.

cuts.py: where the model is cut and what crosses each cut; schedules.py: which op a stage
runs when; stage.py: the Stage actor (the math and its messages); driver.py: the stages of one
attempt as the engine's Trainer. This module imports without Ray.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from raydist.config import ConfigError, RunSpec
from raydist.data import Dataset, load_data
from raydist.engine import Report, RunResult, checkpoint, fit_restarting, global_batches
from raydist.models import build_model
from raydist.strategies.pipeline import cost  # noqa: F401 - its step time and bytes: strategy.cost
from raydist.strategies.pipeline.cuts import HOW, Blocks, blocks_of, pieces, shared_parameters, stage_bounds
from raydist.strategies.pipeline.schedules import SCHEDULES, chunks_of

RESUMES = True
DATA_PARALLEL = False
"""Its stages split the model, not the batch: no compute bound of N workers applies."""
COUNT = "stages"
"""The knob that counts its workers (processes): N in `raydist plan`, its predicted bytes
and the report."""


class StageFailed(RuntimeError):
    """Stages died more often than `max_failures` allows (one that stops answering is the
    watchdog's: raydist/runtime/stall.py)."""


def check(spec: RunSpec, data: Dataset) -> None:
    """The model must come as blocks (cuts.blocks_of), the schedule, the cut and the
    micro-batches must fit the blocks and the batch."""
    model = build_model(spec, data)
    parts = blocks_of(model, spec.model)
    check_blocks(model, parts, data, spec)
    check_schedule(spec, len(parts))
    batch = len(global_batches(spec, data, 1)[0])  # gd: the whole training set
    if spec.microbatches * spec.replicas > batch:
        per = "" if spec.replicas == 1 else f" x replicas {spec.replicas}"
        raise ConfigError(f"microbatches: got {spec.microbatches}{per}, more than the global batch of "
                          f"{batch} samples; expected at most {batch // spec.replicas}")
    if spec.cuts is not None:
        check_cuts(spec, len(parts))


def check_schedule(spec: RunSpec, blocks: int) -> None:
    """Chunks only under an interleaved schedule, at least one block per chunk, and whole
    groups of K micro-batches for an interleaved one."""
    k, entry = spec.stages, SCHEDULES[spec.schedule]
    v = chunks_of(spec.schedule, spec.virtual_stages)
    if v > 1 and not entry.interleaved:
        raise ConfigError(f"virtual_stages: got {v}, but schedule '{spec.schedule}' runs one chunk per "
                          "stage actor; expected 1, or schedule interleaved-1f1b")
    if k > blocks:
        raise ConfigError(f"stages: got {k}, but model '{spec.model}' has only {blocks} blocks; "
                          f"expected at most {blocks}")
    if k * v > blocks:
        raise ConfigError(f"virtual_stages: got {v} with stages {k}: {spec.schedule} cuts the model into "
                          f"stages x virtual_stages = {k * v} chunks, but model '{spec.model}' has only "
                          f"{blocks} blocks; expected stages x virtual_stages <= {blocks}")
    if entry.interleaved and spec.microbatches % k:
        raise ConfigError(f"microbatches: got {spec.microbatches}; {spec.schedule} runs micro-batches in "
                          f"groups of stages ({k}): expected a multiple of {k}")


def check_cuts(spec: RunSpec, blocks: int) -> None:
    cuts, k, n = spec.cuts, spec.stages, pieces(spec)
    if len(cuts) != n - 1:
        what = (f"(stages - 1) for stages={k}" if n == k else
                f"(stages x virtual_stages - 1) for stages={k}, virtual_stages={n // k}")
        raise ConfigError(f"cuts: got {cuts}; expected {n - 1} block indices {what}")
    if any(b <= a for a, b in itertools.pairwise(cuts)):
        raise ConfigError(f"cuts: got {cuts}; expected strictly increasing block indices")
    if not all(1 <= c < blocks for c in cuts):
        raise ConfigError(f"cuts: got {cuts}; expected block indices from 1 to {blocks - 1} "
                          f"(model '{spec.model}' has {blocks} blocks)")


@torch.no_grad()
def check_blocks(model: nn.Module, blocks: Blocks, data: Dataset, spec: RunSpec) -> None:
    """A user's pipeline_blocks() in order must compute the model's forward, and blocks that
    share a parameter (a head tied to its embedding) cannot be split over stages."""
    if blocks.prefixes is not None:
        model.eval()
        x = data.x_train[:2]
        try:
            same = torch.allclose(blocks.seq(x), model(x), atol=1e-6)
        except Exception:  # noqa: BLE001 - blocks whose shapes do not chain: not its forward
            same = False
        if not same:
            raise ConfigError(f"model: {spec.model}'s pipeline_blocks(), applied in order, give another "
                              f"output than its forward; {HOW}")
        model.train()
    names = blocks.prefixes or list(blocks.seq._modules)
    for a, b in shared_parameters(blocks):
        if spec.stages > 1:
            raise ConfigError(f"model: blocks '{names[a]}' and '{names[b]}' share a parameter (a tied "
                              "head?), which pipeline stages cannot: untie it (gpt: tie_head false) "
                              "or use stages 1")


def resources(spec: RunSpec, gpus: float) -> tuple[float, float, str]:
    """(CPUs, GPUs, what) the stage actors ask of a cluster that has `gpus` GPUs now."""
    actors = spec.stages * spec.replicas
    what = f"{spec.stages} stages"
    if spec.replicas > 1:
        what = f"{spec.replicas} replicas x {what}"
    return (actors * spec.threads_per_worker, actors * gpus_per_stage(spec, gpus),
            f"pipeline ({what} x {spec.threads_per_worker} threads)")


def gpus_per_stage(spec: RunSpec, gpus: float) -> float:
    """With GPUs (use_gpu, or by default when the cluster has any): a whole GPU per stage actor
    when there are enough, else the actors share them (2 stages on 1 GPU: half each). Asked for
    on a cluster without any, a whole one each, which the capacity check then refuses."""
    if not (spec.use_gpu if spec.use_gpu is not None else gpus > 0):
        return 0.0
    return min(1.0, gpus / (spec.stages * spec.replicas)) if gpus else 1.0


check_saved = checkpoint.check_saved  # out/checkpoint.pt: plain data, not past spec.epochs


def run(spec: RunSpec, report: Report) -> RunResult:
    """The recipe: cut the model's blocks into stages; start one actor per stage with its slice
    (and the checkpoint's state, if any) and connect them; drive the engine's epoch loop, the
    driver reassembling the model after every epoch; restart from the checkpoint when a stage
    dies."""
    from raydist.runtime import connect
    from raydist.strategies.pipeline.driver import Pipeline, lost

    connect.connect(spec)
    data = load_data(spec)
    model = build_model(spec, data)  # the driver's copy, reassembled from the stages each epoch
    blocks = blocks_of(model, spec.model)
    bounds = stage_bounds(spec, blocks.seq)

    def start(saved: dict[str, Any] | None) -> Pipeline:
        if saved:
            model.load_state_dict(blocks.model_state([st["model"] for st in saved["stages"]]))
        return Pipeline(spec, data, model, blocks, bounds, saved)

    def finished(saved: dict[str, Any]) -> Any:
        model.load_state_dict(blocks.model_state([st["model"] for st in saved["stages"]]))
        return model.state_dict()

    return fit_restarting(spec, data, report, start=start, finished=finished, lost=lost,
                          error=StageFailed)
