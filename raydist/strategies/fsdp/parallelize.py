"""How fsdp shards a model, as a recipe (torchtitan's parallelize): each of the model's blocks
(raydist.models.blocks: the pipeline's blocks) becomes one FSDP unit, gathered just before
its forward and freed after; then the root, which takes what no block holds."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from raydist.config import ConfigError, RunSpec
from raydist.models.blocks import Blocks, blocks_of, shared_parameters

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parallelize(model: nn.Module, spec: RunSpec, mesh: DeviceMesh) -> nn.Module:
    """Shard `model` in place over `mesh`: every block with parameters of its own, then the root."""
    options = {
        "mesh": mesh,
        "reshard_after_forward": spec.reshard_after_forward,
        # the gradients are reduced, and the weights kept and stepped, in float32
        "mp_policy": MixedPrecisionPolicy(param_dtype=DTYPES[spec.fsdp_param_dtype],
                                          reduce_dtype=torch.float32),
        "offload_policy": offload(spec),
    }
    for block in units(model, spec.model):
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def offload(spec: RunSpec) -> OffloadPolicy:
    # pinned memory needs CUDA: a CPU run keeps its shards where they already are
    return CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if spec.cpu_offload else OffloadPolicy()


def units(model: nn.Module, name: str) -> list[nn.Module]:
    """The blocks that become FSDP units: those with parameters, and none that shares one with
    another block (a head tied to the embedding: one parameter goes to one unit, the root's).
    A model without blocks is one unit, the root."""
    try:
        blocks: Blocks = blocks_of(model, name)
    except ConfigError:
        return []
    shared = {i for pair in shared_parameters(blocks) for i in pair}
    return [b for i, b in enumerate(blocks.seq) if i not in shared and any(True for _ in b.parameters())]
