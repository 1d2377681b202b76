"""ddp's sync_batchnorm (raydist/strategies/ddp/syncbn.py) without Ray: two gloo processes train
DDP models with BatchNorm the way ddp's workers do (the engine's train_epoch on each rank's shard
of every global batch, its loss scaling, DDP's gradient average), and end with the parameters and
running statistics of one process trained on the whole batches (local); plain DDP does not."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
import torch.distributed as dist
from gloo import run_ranks
from torch import nn

from raydist.data import Dataset, shard
from raydist.engine import train_epoch
from raydist.strategies.ddp import syncbn

pytestmark = [pytest.mark.unit, pytest.mark.timeout(300)]

WORLD = 2
TOL = 1e-5  # parameters and running stats, converted DDP vs local
APART = 1e-4  # plain DDP is further than this from local


def conv_net() -> nn.Module:
    # No bias before a BatchNorm: its true gradient is 0, and Adam would turn the round-off
    # there (1e-9) into steps of lr, in local and ddp alike but not the same ones.
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 5))


def mlp_net() -> nn.Module:  # momentum None: the cumulative average of the running estimates
    return nn.Sequential(nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8, momentum=None), nn.ReLU(),
                         nn.Linear(8, 5))


NETS = {"conv": conv_net, "mlp": mlp_net}
INPUTS = {"conv": (3, 6, 6), "mlp": (6,)}
OPTIMIZERS = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
              "adam": lambda p: torch.optim.Adam(p, lr=0.01)}

# name: (net, optimizer, convert, the global batch sizes of the one epoch)
CASES = {
    "conv sgd": ("conv", "sgd", True, [8, 8, 8, 8]),
    "conv adam": ("conv", "adam", True, [8, 8, 8, 8]),
    "mlp sgd": ("mlp", "sgd", True, [8, 8, 8, 8]),
    "mlp adam": ("mlp", "adam", True, [8, 8, 8, 8]),
    "conv sgd, plain ddp": ("conv", "sgd", False, [8, 8, 8, 8]),
    "mlp adam, plain ddp": ("mlp", "adam", False, [8, 8, 8, 8]),
    "conv, uneven shards": ("conv", "adam", True, [7, 7, 5, 7]),  # 4 + 3, 4 + 3, 3 + 2, 4 + 3
    "mlp, uneven shards": ("mlp", "sgd", True, [7, 7, 5, 7]),
    # the last batch of 1: rank 1's shard is empty (BatchNorm2d still has 16 values a channel)
    "conv, an empty shard": ("conv", "sgd", True, [6, 8, 1]),
}


def dataset(net: str, sizes: list[int]) -> tuple[Dataset, list[torch.Tensor]]:
    """Inputs away from 0 mean and unit scale, so the variance's numerics are exercised."""
    g = torch.Generator().manual_seed(1)
    n = sum(sizes)
    x = 3.0 + 2.0 * torch.randn(n, *INPUTS[net], generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    val = 3.0 + 2.0 * torch.randn(10, *INPUTS[net], generator=g)
    data = Dataset("bn", x, y, val, torch.randint(0, 5, (10,), generator=g), task="ce",
                   inputs="features", out_dim=5)
    batches = list(torch.randperm(n, generator=g).split(sizes))
    assert [len(b) for b in batches] == sizes
    return data, batches


def build(case: str) -> tuple[nn.Module, torch.optim.Optimizer, Dataset, list[torch.Tensor]]:
    net, opt, convert, sizes = CASES[case]
    torch.manual_seed(0)
    model = NETS[net]()
    if convert and dist.is_initialized():
        model = syncbn.convert(model)  # as ddp's worker does: before the optimizer is made
    return (model, OPTIMIZERS[opt](model.parameters()), *dataset(net, sizes))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def kinds(model: nn.Module) -> list[str]:
    """The qualified names of the model's module classes: plain data, so that the parent reads the
    ranks' results with weights_only=True."""
    return sorted({name_of(type(m)) for m in model.modules()})


def name_of(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def local(case: str) -> dict[str, Any]:
    """The reference: one process, nn.BatchNorm, whole global batches."""
    model, optimizer, data, batches = build(case)
    train_epoch(model, optimizer, data, batches)
    model.eval()
    with torch.no_grad():
        return {"state": state(model), "eval": model(data.x_val)}


def replica(rank: int, case: str) -> dict[str, Any]:
    """One ddp worker: DDP over this rank's shard of every batch, as raydist's ddp trains."""
    from torch.profiler import ProfilerActivity, profile

    model, optimizer, data, batches = build(case)
    ddp = nn.parallel.DistributedDataParallel(model)
    train_epoch(ddp, optimizer, data, batches, rank, WORLD)
    ddp.eval()
    val = shard(torch.arange(len(data.x_val)), rank, WORLD)
    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
        out = ddp(data.x_val[val])
    return {"state": state(model), "eval": out, "kinds": kinds(model),
            "eval_all_reduces": sum(e.count for e in prof.events() if e.name == "gloo:all_reduce")}


def one_step(rank: int) -> dict[str, Any]:
    """One training forward and backward of a lone GlobalBatchNorm on this rank's shard of a
    batch of 7 (4 and 3 samples) far from 0 mean: output, input gradient, running stats."""
    g = torch.Generator().manual_seed(2)
    x = (100.0 + 0.5 * torch.randn(7, 3, 5, 5, generator=g)).requires_grad_()
    w = torch.randn(7, 3, 5, 5, generator=g)
    bn = syncbn.convert(nn.BatchNorm2d(3))
    idx = shard(torch.arange(7), rank, WORLD)
    y = bn(x[idx])
    (y * w[idx]).sum().backward()
    return {"y": y.detach(), "grad": x.grad[idx], "state": state(bn)}


def empty_forward(rank: int) -> dict[str, Any]:
    """A lone layer whose rank 1 has no sample: rank 1 still joins the all-reduce."""
    bn = syncbn.convert(nn.BatchNorm1d(4))
    x = torch.arange(12.0).reshape(3, 4) ** 1.5
    y = bn(x if rank == 0 else x[:0])
    return {"shape": tuple(y.shape), "state": state(bn)}


def probe(rank: int, port: int, results: Any) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    torch.set_num_threads(1)
    found: dict[str, Any] = {case: replica(rank, case) for case in CASES}
    found["one step"] = one_step(rank)
    found["empty forward"] = empty_forward(rank)
    buf = io.BytesIO()  # plain bytes: a tensor through the queue would be shared memory, which
    torch.save(found, buf)  # needs this process alive until the parent has read it
    results.put((rank, buf.getvalue()))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    """Every rank's results, by rank."""
    got = dict(run_ranks(probe, WORLD, WORLD, timeout=120))
    return [torch.load(io.BytesIO(got[r]), weights_only=True) for r in range(WORLD)]


def apart(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


# --- two gloo ranks -----------------------------------------------------------------------------

SYNCED = [c for c, (_, _, convert, _) in CASES.items() if convert]


@pytest.mark.parametrize("case", SYNCED)
def test_converted_ddp_ends_where_local_does(ranks, case):
    """Parameters, running_mean / running_var and num_batches_tracked, on both ranks; in eval
    the running stats normalise, with no all-reduce."""
    ref = local(case)
    for got in ranks:
        assert name_of(syncbn.GlobalBatchNorm) in got[case]["kinds"]
        assert apart(got[case]["state"], ref["state"]) < TOL
        assert got[case]["eval_all_reduces"] == 0
    assert apart(ranks[0][case]["state"], ranks[1][case]["state"]) == 0.0  # DDP: one model
    assert torch.allclose(torch.cat([r[case]["eval"] for r in ranks]), ref["eval"], atol=TOL, rtol=0)


@pytest.mark.parametrize("case", [c for c in CASES if c not in SYNCED])
def test_plain_ddp_normalises_each_shard_alone(ranks, case):
    """The control: DDP's default rule (each shard's own statistics) ends elsewhere."""
    ref = local(case)
    for got in ranks:
        assert name_of(syncbn.GlobalBatchNorm) not in got[case]["kinds"]
        assert apart(got[case]["state"], ref["state"]) > APART


def test_one_step_matches_batch_norm_over_the_whole_batch(ranks):
    """Output, input gradient and running stats of the shards, put together, are those of
    F.batch_norm over the batch of 7 in one process, though the input's mean is 200 times its
    standard deviation."""
    g = torch.Generator().manual_seed(2)
    x = (100.0 + 0.5 * torch.randn(7, 3, 5, 5, generator=g)).requires_grad_()
    w = torch.randn(7, 3, 5, 5, generator=g)
    bn = nn.BatchNorm2d(3)
    y = bn(x)
    (y * w).sum().backward()
    got = [r["one step"] for r in ranks]
    # Both round the mean (~100) to float32, 3.8e-6 at most, i.e. 7.6e-6 of the normalised
    # output each (std 0.5); measured: 5.0e-6 apart, and 4.1e-6 (ours) and 8.9e-6 (F.batch_norm)
    # from a float64 batch norm.
    assert torch.allclose(torch.cat([r["y"] for r in got]), y, atol=2e-5, rtol=0)
    assert torch.allclose(torch.cat([r["grad"] for r in got]), x.grad, atol=1e-5, rtol=0)
    for r in got:
        assert apart(r["state"], state(bn)) < 1e-5
        assert r["state"]["num_batches_tracked"].item() == 1


def test_an_empty_shard_joins_and_gives_an_empty_output(ranks):
    bn = nn.BatchNorm1d(4)
    bn(torch.arange(12.0).reshape(3, 4) ** 1.5)
    assert ranks[0]["empty forward"]["shape"] == (3, 4)
    assert ranks[1]["empty forward"]["shape"] == (0, 4)
    for r in ranks:
        assert apart(r["empty forward"]["state"], state(bn)) < 1e-5


# --- one process ----------------------------------------------------------------------------------

def test_convert_swaps_every_batchnorm_and_keeps_its_tensors():
    inner = nn.Sequential(nn.Conv3d(2, 2, 1), nn.BatchNorm3d(2))
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Sequential(nn.BatchNorm2d(3)), inner)
    model[1].running_mean.fill_(0.5)
    model[1].num_batches_tracked.fill_(7)
    before = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    model.eval()
    assert syncbn.convert(model) is model
    kinds = [type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds == [syncbn.GlobalBatchNorm] * 3
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)  # the very parameters and buffers
    assert not any(m.training for m in model.modules())
    fresh = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Sequential(nn.BatchNorm2d(3)),
                          nn.Sequential(nn.Conv3d(2, 2, 1), nn.BatchNorm3d(2)))
    fresh.load_state_dict(model.state_dict())  # a checkpoint loads into local's model
    model.load_state_dict(fresh.state_dict())
    with pytest.raises(ValueError, match="expected 4D input"):
        model[2][0](torch.zeros(2, 3))  # BatchNorm2d's input check survives


def test_convert_of_a_lone_layer_returns_the_new_one():
    bn = nn.BatchNorm1d(3, eps=1e-3, momentum=0.3, affine=False)
    new = syncbn.convert(bn)
    assert isinstance(new, syncbn.GlobalBatchNorm)
    assert (new.eps, new.momentum, new.affine, new.weight) == (1e-3, 0.3, False, None)
    assert new.running_var is bn.running_var
    no_bias = syncbn.convert(nn.BatchNorm2d(3, bias=False))  # torch 2.13's affine without bias
    assert no_bias.bias is None and no_bias.weight is not None
    assert no_bias.state_dict().keys() == nn.BatchNorm2d(3, bias=False).state_dict().keys()


@pytest.mark.parametrize("net", NETS)
def test_without_a_process_group_it_is_nn_batchnorm(net):
    """One process (local, or a ddp group of 1): F.batch_norm itself, bit for bit."""
    data, batches = dataset(net, [8, 8, 8])
    torch.manual_seed(0)
    ref = NETS[net]()
    torch.manual_seed(0)
    model = syncbn.convert(NETS[net]())
    for m in (ref, model):
        train_epoch(m, torch.optim.SGD(m.parameters(), lr=0.1), data, batches)
    assert apart(state(model), state(ref)) == 0.0
    model.eval(), ref.eval()
    assert torch.equal(model(data.x_val), ref(data.x_val))


# --- ddp's worker ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sync, world, converted", [(True, 2, True), (True, 1, False), (False, 2, False)])
def test_ddp_worker_converts_with_sync_batchnorm_on_several_workers(monkeypatch, sync, world, converted):
    """DDPReplica with Ray Train's context, device, DDP wrapping and checkpoint stubbed out: the
    model it trains has the global-batch BatchNorm exactly when sync_batchnorm and world > 1,
    and its optimizer holds that model's parameters."""
    from raydist.config import RunSpec
    from raydist.raytrain import worker as skeleton
    from raydist.strategies.ddp import worker

    monkeypatch.setattr(skeleton, "place", lambda: (0, world, torch.device("cpu")))
    monkeypatch.setattr(skeleton, "build_model", lambda spec, data: conv_net())
    monkeypatch.setattr(worker.DDPReplica, "restore", lambda self: [])
    monkeypatch.setattr(worker, "prepare_model", lambda model, **kwargs: model)
    monkeypatch.setattr(worker.Comm, "attach", lambda self, replica: None)
    spec = RunSpec.from_dict({"strategy": "ddp", "workers": 2, "sync_batchnorm": sync})
    me = worker.DDPReplica(spec, dataset("conv", [8])[0], faults=None)
    assert isinstance(me.model[1], syncbn.GlobalBatchNorm) == converted
    assert me.replica is me.model
    held = [p for group in me.optimizer.param_groups for p in group["params"]]
    assert len(held) == len(list(me.model.parameters()))
    assert all(a is b for a, b in zip(held, me.model.parameters(), strict=True))
