"""`pipeline`: the model cut into K contiguous stages, one Ray actor each; GPipe and 1F1B.

Every global batch is split into M micro-batches. The driver makes one call per stage per
global batch; the stages then run their schedule among themselves, activations flowing forward
and their gradients back over a gloo process group of the stage actors (point to point, never
through the driver or the object store). The last stage's loss is the SUM over its micro-batch
divided by the GLOBAL batch size (engine.denominator), so the gradients accumulated over the
micro-batches are the full-batch gradient; every stage steps its own optimizer once all
micro-batches are back (the flush), and the run equals `local` to round-off.

cuts.py: where the model is cut and what crosses each cut; schedules.py: which op a stage
runs when; stage.py: the Stage actor (the math and its messages); driver.py: the stages of one
attempt as the engine's Trainer. This module imports without Ray.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from raydist import checkpoint
from raydist.config import ConfigError, RunSpec
from raydist.data import Dataset, load_data
from raydist.engine import Report, RunResult, fit_restarting, global_batches
from raydist.models import build_model
from raydist.strategies.pipeline.cuts import HOW, Blocks, blocks_of, shared_parameters, stage_bounds

RESUMES = True


class StageFailed(RuntimeError):
    """Stages died more often than `max_failures` allows, or a stage stopped answering."""


def check(spec: RunSpec, data: Dataset) -> None:
    """The model must come as blocks (cuts.blocks_of), the cut and the micro-batches must fit
    the blocks and the batch."""
    model = build_model(spec, data)
    parts = blocks_of(model, spec.model)
    check_blocks(model, parts, data, spec)
    blocks = len(parts)
    k = spec.stages
    if k > blocks:
        raise ConfigError(f"stages: got {k}, but model '{spec.model}' has only {blocks} blocks; "
                          f"expected at most {blocks}")
    batch = len(global_batches(spec, data, 1)[0])  # gd: the whole training set
    if spec.microbatches > batch:
        raise ConfigError(f"microbatches: got {spec.microbatches}, more than the global batch of "
                          f"{batch} samples; expected at most {batch}")
    cuts = spec.cuts
    if cuts is None:
        return
    if len(cuts) != k - 1:
        raise ConfigError(f"cuts: got {cuts}; expected {k - 1} block indices (stages - 1) "
                          f"for stages={k}")
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
    """(CPUs, GPUs, what) the stages ask of a cluster that has `gpus` GPUs now."""
    return (spec.stages * spec.threads_per_worker, spec.stages * gpus_per_stage(spec, gpus),
            f"pipeline ({spec.stages} stages x {spec.threads_per_worker} threads)")


def gpus_per_stage(spec: RunSpec, gpus: float) -> float:
    """With GPUs (use_gpu, or by default when the cluster has any): a whole GPU per stage when
    there are enough, else the stages share them (2 stages on 1 GPU: half each). Asked for on a
    cluster without any, a whole one each, which the capacity check then refuses."""
    if not (spec.use_gpu if spec.use_gpu is not None else gpus > 0):
        return 0.0
    return min(1.0, gpus / spec.stages) if gpus else 1.0


def check_saved(spec: RunSpec) -> None:
    """The checkpoint a run in spec.out resumes from is plain data and not past spec.epochs."""
    checkpoint.resume(spec)


def run(spec: RunSpec, report: Report) -> RunResult:
    """The recipe: cut the model's blocks into stages; start one actor per stage with its slice
    (and the checkpoint's state, if any) and connect them; drive the engine's epoch loop, the
    driver reassembling the model after every epoch; restart from the checkpoint when a stage
    dies."""
    from raydist import cluster
    from raydist.strategies.pipeline.driver import Pipeline, lost

    cluster.connect(spec)
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
