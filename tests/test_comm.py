"""ddp's communication options (raydist/comm.py): the bytes each one sends, that local SGD sends
nothing between its averaging steps, that compressed runs still learn, and the one-line errors
of settings that cannot work."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
import torch.distributed as dist
from gloo import run_ranks

from raydist.cli import main
from raydist.config import ConfigError, RunSpec
from raydist.data import load_data
from raydist.models import build_model
from raydist.strategies.ddp import comm
from raydist.train import train

pytestmark = pytest.mark.timeout(600)

# The digits mlp with one hidden layer of 32: weights 32x64 and 10x32, biases 32 and 10.
BASE = {"model": "mlp", "data": "digits", "hidden": [32], "batch_size": 64, "seed": 0,
        "workers": 2, "val_fraction": 0.1, "optimizer": "adam"}
SHAPES = [torch.Size([32, 64]), torch.Size([32]), torch.Size([10, 32]), torch.Size([10])]
PARAMS = 32 * 64 + 32 + 10 * 32 + 10  # 2410
PLAIN = 4 * PARAMS  # bytes one worker all-reduces per step: float32 gradients
STEPS = 26  # per epoch: 1617 training samples in batches of 64
TARGET = 0.9  # validation accuracy, as in tune_configs/quickstart.yaml


def spec(**changes: Any) -> RunSpec:
    return RunSpec.from_dict({**BASE, "strategy": "ddp", **changes})


# --- bytes on the wire ---------------------------------------------------------------------------

@pytest.mark.unit
def test_shapes_are_those_of_the_digits_mlp():
    s = spec()
    model = build_model(s, load_data(s))
    assert [p.shape for p in model.parameters()] == SHAPES


# PowerSGD sends each weight matrix n x m as P (n x r) and Q (m x r) when (n + m) r * 2 < n m:
# rank 1: 32x64 -> 96, 10x32 -> 42, biases whole: 96 + 32 + 42 + 10 = 180 floats. Rank 4:
# 32x64 -> 384, but 10x32 -> 168 is not half of 320, so it goes whole: 384 + 32 + 320 + 10.
POWERSGD_1, POWERSGD_4 = 4 * 180, 4 * (384 + 32 + 320 + 10)
BYTES = {  # (changes, workers, first step, steps): all bytes on the wire per step
    "plain, 2 workers": ({}, 2, 0, 8, 2 * PLAIN),
    "plain, 3 workers": ({}, 3, 0, 8, 4 * PLAIN),  # ring: 2 (N - 1) x the payload
    "plain, 1 worker": ({}, 1, 0, 8, 0),
    "fp16": ({"grad_compression": "fp16"}, 2, 0, 8, PLAIN),
    "bf16": ({"grad_compression": "bf16"}, 2, 0, 8, PLAIN),
    "powersgd rank 1": ({"grad_compression": "powersgd"}, 2, 2, 8, 2 * POWERSGD_1),
    "powersgd rank 4": ({"grad_compression": "powersgd", "powersgd_rank": 4}, 2, 2, 8,
                        2 * POWERSGD_4),
    # steps 0 and 1 are plain all-reduces
    "powersgd first steps": ({"grad_compression": "powersgd"}, 2, 0, 4,
                             2 * (2 * PLAIN + 2 * POWERSGD_1) / 4),
    # parameters averaged after steps 0 and 4 of 0..7
    "local sgd 4": ({"local_sgd_steps": 4}, 2, 0, 8, 2 * 2 * PLAIN / 8),
    # epoch 2, steps 26..51: averaged after 28, 32, ..., 48
    "local sgd 4, epoch 2": ({"local_sgd_steps": 4}, 2, STEPS, STEPS, 2 * 6 * PLAIN / STEPS),
}


@pytest.mark.unit
@pytest.mark.parametrize("case", BYTES)
def test_bytes_per_step(case):
    changes, world, first, steps, expected = BYTES[case]
    s = spec(**changes)
    assert comm.bytes_per_step(s, SHAPES, world, first, steps) == pytest.approx(expected, rel=1e-12)


# --- two gloo processes without Ray: what really crosses between them --------------------------

SCENARIOS = {"plain": {}, "local sgd 4": {"local_sgd_steps": 4}, "fp16": {"grad_compression": "fp16"},
             "bf16": {"grad_compression": "bf16"}, "powersgd": {"grad_compression": "powersgd"}}
PROBE_STEPS = 9


def probe_scenario(rank: int, changes: dict[str, Any]) -> dict[str, Any]:
    """PROBE_STEPS steps of a DDP model on rank-specific data. After each: how far the ranks'
    parameters are apart, how many gloo all-reduces the profiler saw, and for PowerSGD how many
    floats its state says it all-reduced compressed."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    s = spec(**changes)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    link = comm.Comm(s, model, 2)
    optimizer = link.wrap(torch.optim.SGD(model.parameters(), lr=0.05))
    replica = torch.nn.parallel.DistributedDataParallel(model)
    state, hook = comm.make_hook(s)  # what Comm.attach registers, with the state kept here
    timed, calls = link.timed(hook), []

    def counted(state, bucket):  # DDP's reducer handing a bucket over
        calls.append(bucket.index())
        return timed(state, bucket)

    replica.register_comm_hook(state, counted)
    g = torch.Generator().manual_seed(100 + rank)
    out: dict[str, Any] = {"apart": [], "all_reduces": [], "compressed": []}
    for _ in range(PROBE_STEPS):
        x, y = torch.randn(16, 64, generator=g), torch.randint(0, 10, (16,), generator=g)
        before = getattr(state, "total_numel_after_compression", 0)
        with profile(activities=[ProfilerActivity.CPU]) as prof, link.stepping(replica):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(replica(x), y).backward()
            optimizer.step()
        out["all_reduces"].append(sum(e.count for e in prof.events() if e.name == "gloo:all_reduce"))
        out["compressed"].append(getattr(state, "total_numel_after_compression", 0) - before)
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        both = [torch.zeros_like(flat) for _ in range(2)]
        dist.all_gather(both, flat)
        out["apart"].append((both[0] - both[1]).abs().max().item())
    out["wait_s"], out["hook_calls"] = link.wait_s, len(calls)
    saved = optimizer.state_dict()
    out["saved_step"] = saved.get("step")
    if changes.get("local_sgd_steps", 1) > 1:  # a checkpoint restores the averager's step
        fresh = comm.Comm(s, model, 2).wrap(torch.optim.SGD(model.parameters(), lr=0.05))
        fresh.load_state_dict(saved)
        out["restored_step"] = fresh.averager.step
    return out


def probe(rank: int, port: int, results: Any) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    found = {name: probe_scenario(rank, changes) for name, changes in SCENARIOS.items()}
    if rank == 0:
        results.put(found)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def probed() -> dict[str, dict[str, Any]]:
    return run_ranks(probe, 2, 1, timeout=300)[0]


@pytest.mark.unit
def test_plain_and_compressed_ddp_all_reduce_every_step(probed):
    """The control for the local SGD test below: the same checks see every all-reduce."""
    for name in ("plain", "fp16", "bf16", "powersgd"):
        assert probed[name]["apart"] == [0.0] * PROBE_STEPS, name
        assert all(n >= 1 for n in probed[name]["all_reduces"]), name
        assert probed[name]["wait_s"] > 0, name
        assert probed[name]["hook_calls"] >= PROBE_STEPS, name


@pytest.mark.unit
def test_local_sgd_steps_alone_between_averages(probed):
    """k = 4: between averages each worker steps alone (its parameters drift from the other's,
    and the profiler sees no gloo all-reduce); after steps 0, 4 and 8 they are averaged. DDP's
    reducer hands no bucket over at all (the steps run under no_sync). A checkpoint of the
    optimizer carries the averager's step."""
    got = probed["local sgd 4"]
    assert got["hook_calls"] == 0
    averaged = [i % 4 == 0 for i in range(PROBE_STEPS)]
    assert [apart == 0.0 for apart in got["apart"]] == averaged
    assert [n >= 1 for n in got["all_reduces"]] == averaged
    assert got["saved_step"] == got["restored_step"] == PROBE_STEPS
    assert got["wait_s"] > 0


@pytest.mark.unit
def test_powersgd_sends_what_the_formula_says(probed):
    """PowerSGD's own count of the floats it all-reduced once compressing (from step 2 on)
    equals comm's rank-1 count for the same model."""
    s = spec(grad_compression="powersgd")
    per_step = comm.powersgd_elements(s, SHAPES, 2)[0]
    assert per_step == 180
    assert probed["powersgd"]["compressed"] == [0, 0] + [per_step] * (PROBE_STEPS - 2)


# --- Ray Train runs on digits --------------------------------------------------------------------

VARIANTS = {"fp16": {"grad_compression": "fp16"}, "bf16": {"grad_compression": "bf16"},
            "powersgd": {"grad_compression": "powersgd"}, "local sgd 4": {"local_sgd_steps": 4}}


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    """local until it reaches TARGET (epoch e), then each variant on 2 ddp workers for 2e epochs,
    two fits at a time. Plain ddp equals local to round-off (tests/test_ddp.py), so local's
    records stand in for plain ddp's."""
    tmp = tmp_path_factory.mktemp("comm")
    local = train(spec(strategy="local", workers=1, epochs=6, out=str(tmp / "local")), report=lambda r: None)
    reached = [r["epoch"] for r in local.metrics if r["val_accuracy"] >= TARGET]
    assert reached, "local never reached the target: the test's settings are off"
    epochs = 2 * reached[0]

    def fit(name: str) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        train(spec(epochs=epochs, out=str(tmp / name.replace(" ", "_")), **VARIANTS[name]),
              report=records.append)
        return records

    with ThreadPoolExecutor(2) as pool:
        fits = dict(zip(VARIANTS, pool.map(fit, VARIANTS), strict=True))
    return local.metrics[:epochs], fits


# Relative distance of the final training loss from plain ddp's. fp16 keeps 11 significant
# bits, bf16 8; measured here after 4 epochs: 3.6e-4 for both.
HALF_TOLERANCE = {"fp16": 0.002, "bf16": 0.01}


@pytest.mark.ray
@pytest.mark.parametrize("name", HALF_TOLERANCE)
def test_half_precision_gradients_stay_with_plain_ddp(runs, name):
    plain, fits = runs
    got = fits[name]
    assert [r["epoch"] for r in got] == [r["epoch"] for r in plain]
    assert got[-1]["train_loss"] == pytest.approx(plain[-1]["train_loss"], rel=HALF_TOLERANCE[name])
    assert got[-1]["train_loss"] != plain[-1]["train_loss"]  # the hook did round the gradients
    assert all(r["bytes_per_step"] == PLAIN for r in got)  # 2 workers: 2 x PLAIN / 2
    assert all(r["comm_wait_s"] > 0 for r in got)


@pytest.mark.ray
@pytest.mark.parametrize("name", ["powersgd", "local sgd 4"])
def test_reaches_locals_target_within_twice_the_epochs(runs, name):
    plain, fits = runs
    got = fits[name]
    first = next(r["epoch"] for r in plain if r["val_accuracy"] >= TARGET)
    assert any(r["val_accuracy"] >= TARGET for r in got if r["epoch"] <= 2 * first)
    s = spec(**VARIANTS[name])
    expected = [comm.bytes_per_step(s, SHAPES, 2, (r["epoch"] - 1) * STEPS, STEPS) for r in got]
    assert [r["bytes_per_step"] for r in got] == pytest.approx(expected, rel=1e-12)
    assert max(expected) < PLAIN  # less than half of plain ddp's 2 x PLAIN, even in epoch 1


# --- settings that cannot work ---------------------------------------------------------------------

ERRORS = {
    "powersgd on 1 worker": ({"grad_compression": "powersgd", "workers": 1},
                             "grad_compression: got 'powersgd' with workers 1; PowerSGD compresses "
                             "the gradients workers exchange, so it needs workers >= 2"),
    "powersgd on an elastic range of 1": ({"grad_compression": "powersgd", "workers": [1, 1]},
                                           "grad_compression: got 'powersgd' with workers [1, 1]; "
                                           "PowerSGD compresses the gradients workers exchange, so "
                                           "it needs workers >= 2"),
    "unknown compression": ({"grad_compression": "fp8"},
                            "grad_compression: unknown value 'fp8' (did you mean 'fp16'?); expected "
                            "one of none, fp16, bf16, powersgd"),
    "k < 1": ({"local_sgd_steps": 0}, "local_sgd_steps: got 0; expected an integer >= 1"),
    "local sgd and compression": ({"local_sgd_steps": 4, "grad_compression": "fp16"},
                                  "local_sgd_steps: got 4 with grad_compression 'fp16'; local SGD "
                                  "exchanges parameters every k steps, no gradients to compress: "
                                  "set one of the two"),
    "powersgd rank 0": ({"grad_compression": "powersgd", "powersgd_rank": 0},
                        "powersgd_rank: got 0; expected an integer >= 1"),
}


@pytest.mark.unit
@pytest.mark.parametrize("case", ERRORS)
def test_bad_settings_are_one_config_error(case):
    changes, message = ERRORS[case]
    with pytest.raises(ConfigError) as e:
        spec(**changes)
    assert str(e.value) == message


@pytest.mark.unit
@pytest.mark.parametrize("case", ["powersgd on 1 worker", "local sgd and compression"])
def test_bad_settings_on_the_command_line(case, tmp_path, capsys):
    changes, message = ERRORS[case]
    out = tmp_path / "run"
    flags = [x for k, v in changes.items() for x in ("--" + k.replace("_", "-"), str(v))]
    assert main(["train", "--strategy", "ddp", "--out", str(out), *flags]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not out.exists()
