"""How fsdp shards a model, as a recipe (torchtitan's parallelize): each of the model's blocks
(raydist.models.blocks: the pipeline's blocks) becomes one FSDP unit, gathered just before
its forward and freed after; then the root, which takes what no block holds."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from raydist.config import RunSpec
from raydist.models.blocks import units_of

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
    for block in units_of(model, spec.model):
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def offload(spec: RunSpec) -> OffloadPolicy:
    # pinned memory needs CUDA: a CPU run keeps its shards where they already are
    return CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if spec.cpu_offload else OffloadPolicy()
