"""tp's recipes: which Linear layers of a model are split over the tensor-parallel ranks, and how.

Megatron's pairing (Shoeybi et al. 2019): a Linear split column-wise (its output features,
`ColwiseParallel`) feeds one split row-wise (its input features, `RowwiseParallel`), so the
activation between them stays sharded and one all-reduce after the second gives every rank the
full output. Everything not named in a recipe (embeddings, norms, a head) stays a plain
tensor, replicated: every rank computes it on the same input, so its gradient agrees too.

- `mlp`: consecutive Linear layers in pairs, column- then row-wise; an odd last one (the head
  after an odd number of hidden layers) stays replicated.
- `gpt`, `transformer` (the same blocks): per block, attention's fused qkv column-wise with the
  heads split over the ranks (heads must divide by tp_size), its output projection row-wise;
  the MLP's first Linear column-wise, its second row-wise.

The fused qkv's rows are [q | k | v], each heads x head_dim. A plain column split would hand
rank 0 all of q and half of k; so before splitting, its rows are reordered rank by rank
([q_r | k_r | v_r] for r = 0..tp-1, `head_order`), and rank r's contiguous shard holds its own
heads' q, k and v. The attention infers its head count from the width it gets
(models/classic.py), so the same model code runs whole or split. `TPLayout.inverse` undoes the
reorder when the full state is gathered (`full_state`): model.pt holds local's layout.

Adding a model is one `RECIPES.register` entry: a function (model, tp_size) -> TPLayout, which
raises ConfigError (naming the knob and the numbers) when the model cannot be split so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from raydist.config import ConfigError, RunSpec
from raydist.registry import Registry

COLWISE, ROWWISE = "colwise", "rowwise"


@dataclass
class TPLayout:
    styles: dict[str, str]
    """module name -> COLWISE or ROWWISE"""
    orders: dict[str, torch.Tensor] = field(default_factory=dict)
    """parameter name -> the row order it is split in (rows[order] before the split)"""

    def inverse(self, name: str) -> torch.Tensor | None:
        """The order that brings a gathered parameter back to the model's own layout."""
        order = self.orders.get(name)
        return None if order is None else torch.argsort(order)


Build = Callable[[nn.Module, RunSpec, int], TPLayout]
RECIPES: Registry[Build] = Registry("model (tensor parallel)")


def linears(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]


@RECIPES.register("mlp")
def mlp(model: nn.Module, spec: RunSpec, tp: int) -> TPLayout:
    names = linears(model)
    widths = [model.get_submodule(n).out_features for n in names[: len(names) // 2 * 2 : 2]]
    if any(w % tp for w in widths):
        raise ConfigError(f"tp_size: got {tp}; mlp's column-split layers have widths {widths}, "
                          f"each must divide by tp_size")
    styles = {}
    for first, second in zip(names[0::2], names[1::2], strict=False):
        styles[first], styles[second] = COLWISE, ROWWISE
    return TPLayout(styles)


def head_order(d: int, tp: int) -> torch.Tensor:
    """Rows of a fused [q | k | v] (3d rows) reordered to [q_0 k_0 v_0 | q_1 k_1 v_1 | ...],
    where x_r is rank r's d/tp rows of x (its heads)."""
    local = d // tp
    return torch.cat([torch.arange(j * d + r * local, j * d + (r + 1) * local)
                      for r in range(tp) for j in range(3)])


def blocks(model: nn.Module, spec: RunSpec, tp: int) -> TPLayout:
    """The transformer blocks of classic.py (gpt's and transformer's)."""
    if spec.heads % tp:
        raise ConfigError(f"tp_size: got {tp}; the attention heads ({spec.heads}) are split over "
                          f"the tensor-parallel ranks, so heads must divide by tp_size")
    styles: dict[str, str] = {}
    orders: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        if hasattr(m, "attn") and hasattr(m, "mlp"):
            styles |= {f"{name}.attn.qkv": COLWISE, f"{name}.attn.proj": ROWWISE,
                       f"{name}.mlp.0": COLWISE, f"{name}.mlp.2": ROWWISE}
            order = head_order(m.attn.qkv.in_features, tp)
            orders |= {f"{name}.attn.qkv.weight": order, f"{name}.attn.qkv.bias": order}
    return TPLayout(styles, orders)


RECIPES.register("gpt")(blocks)
RECIPES.register("transformer")(blocks)


def recipe(model: nn.Module, spec: RunSpec, tp: int) -> TPLayout:
    """The model's recipe, or ConfigError naming the models tp can split."""
    if spec.model not in RECIPES:
        raise ConfigError(f"model: tp cannot split '{spec.model}'; it splits "
                          f"{', '.join(RECIPES.names())} (a model needs a recipe in "
                          "raydist/strategies/tp/parallelize.py)")
    return RECIPES[spec.model](model, spec, tp)


def parallelize(model: nn.Module, plan: TPLayout, mesh: object) -> nn.Module:
    """Split `model` in place over the 1-D device mesh `mesh` as `plan` says."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    with torch.no_grad():  # the reorder, before the split hands each rank its contiguous rows
        for name, order in plan.orders.items():
            p = model.get_parameter(name)
            p.copy_(p[order])
    styles = {COLWISE: ColwiseParallel, ROWWISE: RowwiseParallel}
    return parallelize_module(model, mesh, {n: styles[s]() for n, s in plan.styles.items()})


def full_state(model: nn.Module, plan: TPLayout) -> dict[str, torch.Tensor]:
    """The whole model's state_dict under local's keys and layout (a collective: every rank
    of the mesh calls it)."""
    return {name: gather(plan, name, t) for name, t in model.state_dict().items()}


def gather(plan: TPLayout, name: str, t: torch.Tensor) -> torch.Tensor:
    """The full tensor behind the (maybe split) tensor `t` of parameter `name`, in the model's
    own layout: a parameter, or its gradient."""
    full = t.full_tensor() if hasattr(t, "full_tensor") else t
    inv = plan.inverse(name)
    return (full if inv is None else full[inv]).detach().clone()
