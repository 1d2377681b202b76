"""Splits, batch order and shards; models as named block sequences."""

from __future__ import annotations

import pytest
import torch

from raydist.config import RunSpec
from raydist.data import batch_order, load_data, shard
from raydist.models import build_model

pytestmark = pytest.mark.unit


def spec(**kw) -> RunSpec:
    return RunSpec.from_dict({"out": "/tmp/unused", **kw})


def test_shards_are_disjoint_and_together_exactly_the_global_batch():
    batch = torch.randperm(67)
    for world in (1, 2, 3, 8):
        parts = [shard(batch, r, world) for r in range(world)]
        assert torch.equal(torch.cat(parts), batch)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_batch_order_is_fixed_by_seed_and_epoch():
    a, b = batch_order(100, 32, seed=0, epoch=1), batch_order(100, 32, seed=0, epoch=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert [len(x) for x in a] == [32, 32, 32, 4]
    assert torch.equal(torch.cat(a).sort().values, torch.arange(100))
    assert not torch.equal(a[0], batch_order(100, 32, seed=0, epoch=2)[0])


def test_split_follows_the_seed():
    d0, d0b, d1 = load_data(spec(seed=0)), load_data(spec(seed=0)), load_data(spec(seed=1))
    assert torch.equal(d0.x_val, d0b.x_val) and not torch.equal(d0.x_val, d1.x_val)
    assert d0.n_train + len(d0.x_val) == 1797 and len(d0.x_val) == round(1797 * 0.2)


def test_text_corpus_is_pythons_own_documentation():
    d = load_data(spec(data="text", seq_len=16, text_chars=5000))
    assert d.x_train.shape[1] == 16 and d.inputs == "tokens"
    assert torch.equal(d.x_train[:, 1:], d.y_train[:, :-1])  # y is x shifted by one character


def test_parameter_names_do_not_depend_on_the_cut():
    for kw in ({"model": "mlp", "hidden": [16, 8]}, {"model": "cnn"},
               {"model": "transformer", "data": "text", "layers": 2, "d_model": 16, "text_chars": 2000}):
        s = spec(**kw)
        model = build_model(s, load_data(s))
        whole = model.state_dict()
        for cut in range(1, len(model)):
            pieces = {**model[:cut].state_dict(), **model[cut:].state_dict()}
            assert pieces.keys() == whole.keys()
            assert all(torch.equal(pieces[k], whole[k]) for k in whole)


def test_same_seed_same_weights():
    s = spec(seed=3)
    a, b = build_model(s, load_data(s)), build_model(s, load_data(s))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
