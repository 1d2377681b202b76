"""`gpt`: a GPT-2-style decoder for token data (`text`), laid out as GPT-2 is.

Blocks, the pipeline's cut points: `embed` (token embedding + learned position embedding),
`block0` .. `block{layers-1}` (pre-LayerNorm: causal self-attention through
F.scaled_dot_product_attention, then a 4x GELU MLP, each added back), `head` (final LayerNorm,
linear to the vocabulary). The blocks are classic.py's Embed and Block, the ones `transformer`
uses; gpt differs in GPT-2's initialisation (weights normal with std 0.02, biases 0, the two
residual projections of each block std 0.02 / sqrt(2 * layers)), an output linear without bias
(GPT-2's lm_head has none: so its 124,439,808 parameters come out), and `tie_head`.

`tie_head`: the head's linear weight IS the embedding's token weight, one Parameter in two
blocks. parameters() lists it once, so the optimizer updates it once; the state_dict keeps
both keys, `embed.tok.weight` and `head.1.weight`, two names for one tensor, and a state_dict
of a tied gpt loads back into a tied gpt. A pipeline cannot put the two blocks on different
stages (it refuses a tied gpt).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import TYPE_CHECKING

from torch import nn

from raydist.data import Dataset
from raydist.errors import ConfigError
from raydist.models import MODELS, ModelEntry
from raydist.models.classic import Block, Embed

if TYPE_CHECKING:  # annotations only: config sits above this layer and imports it
    from raydist.config import RunSpec


def gpt_params(layers: int, d_model: int, vocab: int, seq_len: int, tie_head: bool) -> int:
    """gpt's parameter count: embeddings (vocab + seq_len) * d; per block two LayerNorms (4d),
    qkv (3d^2 + 3d), attention projection (d^2 + d), MLP (4d^2 + 4d and 4d^2 + d), i.e.
    12 d^2 + 13 d; the final LayerNorm (2d); the head's weight (vocab * d) unless tied."""
    d = d_model
    return ((vocab + seq_len) * d + layers * (12 * d * d + 13 * d) + 2 * d
            + (0 if tie_head else vocab * d))


def gpt(spec: RunSpec, data: Dataset) -> nn.Sequential:
    if spec.d_model % spec.heads:
        raise ConfigError(f"heads: {spec.heads} does not divide d_model {spec.d_model}")
    d, vocab = spec.d_model, data.out_dim
    blocks: OrderedDict[str, nn.Module] = OrderedDict(embed=Embed(vocab, d, spec.seq_len))
    for i in range(spec.layers):
        blocks[f"block{i}"] = Block(d, spec.heads)
    blocks["head"] = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, vocab, bias=False))
    model = nn.Sequential(blocks)
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
    for i in range(spec.layers):  # the projections back into the residual stream
        block = blocks[f"block{i}"]
        for w in (block.attn.proj.weight, block.mlp[2].weight):
            nn.init.normal_(w, std=0.02 / math.sqrt(2 * spec.layers))
    if spec.tie_head:
        blocks["head"][1].weight = blocks["embed"].tok.weight
    return model


MODELS.register("gpt")(ModelEntry(gpt, inputs=("tokens",),
                                  knobs=("layers", "d_model", "heads", "seq_len", "tie_head")))
