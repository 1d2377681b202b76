"""`ps`: sync equals local for the article's six optimizers, async reaches local's accuracy,
the wire dtypes, the staleness rule, fault recovery from the checkpoint, and the user errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from raydist import cli
from raydist.config import ConfigError, RunSpec
from raydist.data import load_data, shard
from raydist.engine import Diverged, checkpoint, global_batches, setup
from raydist.engine.record import documented
from raydist.optim import training
from raydist.strategies import local, ps
from raydist.strategies.ps import sharding
from raydist.strategies.ps.actors import Server
from raydist.strategies.ps.staleness import AsyncSchedule
from raydist.train import train

SMALL = {"model": "mlp", "data": "digits", "hidden": [16], "epochs": 2, "batch_size": 128,
         "seed": 3}
NEW = ["muon", "lamb", "adafactor", "lion", "schedule-free-adamw"]


def spec_of(tmp_path, name: str, **kw) -> RunSpec:
    return RunSpec.from_dict({**SMALL, "out": str(tmp_path / name), **kw})


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert list(a) == list(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def n_params(spec: RunSpec) -> int:
    return sum(p.numel() for p in setup(spec)[1].parameters())


# --- no Ray: pure pieces -----------------------------------------------------------------------

@pytest.mark.unit
def test_balance_gives_whole_tensors_largest_first_to_the_least_loaded():
    assert sharding.balance([10, 1000, 10, 100], 2) == [[1], [0, 2, 3]]
    assert sharding.balance([5, 5, 5], 3) == [[0], [1], [2]]


@pytest.mark.unit
def test_split_model_covers_every_tensor_once(tmp_path):
    spec = spec_of(tmp_path, "x", hidden=[16, 8])
    model = setup(spec)[1]
    parts = sharding.split_model(model, 3)
    names = [n for p in parts for n in p.names]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert all(p.names for p in parts)


@pytest.mark.unit
@pytest.mark.parametrize("dtype,torch_dtype,wire", [("float16", torch.float16, np.float16),
                                                     ("bfloat16", torch.bfloat16, np.uint16)])
def test_codec_rounds_like_torch_and_halves_the_bytes(dtype, torch_dtype, wire):
    t = torch.randn(1000) * 3
    codec = sharding.CODECS[dtype]
    sent = codec.encode(t)
    assert sent.dtype == wire and sent.nbytes == 2000
    back = codec.decode(sent)
    assert back.dtype == np.float32
    assert np.array_equal(back, t.to(torch_dtype).float().numpy())


@pytest.mark.unit
def test_float32_codec_is_exact():
    t = torch.randn(100)
    assert np.array_equal(sharding.CODECS["float32"].decode(sharding.CODECS["float32"].encode(t)), t.numpy())


@pytest.mark.unit
def test_async_schedule_discards_gradients_older_than_max_staleness():
    sched = AsyncSchedule([(0, 0), (0, 1), (1, 0)], max_staleness=1)
    a, b, c = sched.next(), sched.next(), sched.next()
    assert (a, b, c) == ((0, 0), (0, 1), (1, 0))
    assert sched.next() is None
    assert sched.finish(a, read_version=0)          # staleness 0
    assert sched.finish(b, read_version=0)          # staleness 1: still applied
    assert not sched.finish(c, read_version=0)      # staleness 2: discarded, back in the queue
    assert (sched.version, sched.discarded) == (2, 1)
    assert sched.next() == (1, 0)
    assert sched.finish((1, 0), read_version=2)
    assert sched.version == 3


@pytest.mark.unit
def test_server_steps_on_the_sum_of_the_gradients(tmp_path):
    """Two half gradients summed by the server give local's step on the whole gradient."""
    spec = spec_of(tmp_path, "x", optimizer="adam")
    _, model, optimizer = setup(spec)
    part = sharding.split_model(model, 1)[0]
    server = Server(spec, part, {n: p.detach().numpy().copy() for n, p in model.named_parameters()}, steps=1)
    grads = [torch.randn_like(p) for p in model.parameters()]
    flat = torch.cat([g.reshape(-1) for g in grads])
    server.apply(flat.numpy() * 0.25, flat.numpy() * 0.75)
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g
    optimizer.step()
    assert np.allclose(server.weights(), torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
                       atol=1e-7)


def step_servers(servers: list[Server], grads: list[dict[str, torch.Tensor]]) -> None:
    """One epoch of steps on each server, in training mode as ps's epoch runs them."""
    for s in servers:
        s.train_mode()
    for g in grads:
        for s in servers:
            s.apply(np.concatenate([g[n].numpy().reshape(-1) for n in s.part.names]))
    for s in servers:
        s.eval_mode()


@pytest.mark.unit
@pytest.mark.parametrize("optimizer", NEW)
def test_two_servers_hold_the_state_of_their_shard_only_and_step_as_local(tmp_path, optimizer):
    """Each server's optimizer state covers its own tensors (muon: hidden matrices and the rest
    apart, on different servers), and the two together take local's steps; one restarted from
    its state continues as if never stopped."""
    spec = spec_of(tmp_path, "x", optimizer=optimizer, hidden=[16, 8])
    _, model, opt = setup(spec)
    weights = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    parts = sharding.split_model(model, 2)
    servers = [Server(spec, p, {n: weights[n] for n in p.names}, steps=6) for p in parts]
    epochs = [[{n: torch.randn_like(p) for n, p in model.named_parameters()} for _ in range(3)]
              for _ in range(2)]
    for grads in epochs:
        with training(optimizer, opt):
            for g in grads:
                for n, p in model.named_parameters():
                    p.grad = g[n].clone()  # schedule-free divides the gradient in place
                opt.step()
        if grads is epochs[0]:
            step_servers(servers, grads)
            restarted = [Server(spec, s.part, st["weights"], st["optimizer"], steps=6,
                                scheduler_state=st["scheduler"])
                         for s, st in ((s, s.state()) for s in servers)]
    step_servers(servers, epochs[1])
    step_servers(restarted, epochs[1])
    assert [sorted(s.state()["optimizer"]) for s in servers] == [sorted(p.names) for p in parts]
    ours = dict(model.named_parameters())
    for s, again in zip(servers, restarted, strict=True):
        for n, w in s.state()["weights"].items():
            assert np.abs(w - ours[n].detach().numpy()).max() <= 1e-6, n
            assert np.array_equal(w, again.state()["weights"][n]), n


# --- user errors -------------------------------------------------------------------------------

@pytest.mark.unit
def test_check_rejects_more_servers_than_tensors(tmp_path):
    spec = spec_of(tmp_path, "x", strategy="ps", servers=5)
    with pytest.raises(ConfigError) as e:
        ps.check(spec, load_data(spec))
    assert str(e.value) == ("servers: 5 parameter servers but the model has only 4 parameter tensors; "
                            "expected servers <= 4")


@pytest.mark.unit
def test_check_rejects_more_workers_than_samples_in_a_batch(tmp_path):
    spec = spec_of(tmp_path, "x", strategy="ps", workers=5, batch_size=4)
    with pytest.raises(ConfigError) as e:
        train(spec)
    assert str(e.value) == ("workers: 5 replicas but a global batch holds only 4 samples; "
                            "expected workers <= 4")
    assert not (tmp_path / "x").exists()


@pytest.mark.ray
def test_run_fails_fast_when_the_cluster_is_too_small(ray_local, tmp_path):
    spec = spec_of(tmp_path, "x", strategy="ps", workers=4, servers=2)
    with pytest.raises(ConfigError) as e:
        train(spec)
    assert str(e.value) == ("ps (4 replicas x 1 CPU + 2 servers x 0.5 CPU) needs 5 CPUs but the "
                            "cluster can provide at most 4")


# --- with Ray: equivalence, async, wire dtypes -------------------------------------------------

@pytest.mark.ray
@pytest.mark.parametrize("optimizer,servers", [("gd", 1), ("sgd", 2), ("momentum", 1),
                                               ("adagrad", 2), ("rmsprop", 1), ("adam", 2),
                                               *((name, 2) for name in NEW)])
def test_sync_equals_local(ray_local, tmp_path, trained, optimizer, servers):
    spec = spec_of(tmp_path, "local", optimizer=optimizer)
    ref = local.run(spec, lambda r: None)
    reports = []
    ps_spec = spec.replace(strategy="ps", workers=2, servers=servers, out=str(tmp_path / "ps"))
    got = ps.run(ps_spec, reports.append)
    trained.put(ps_spec, got)  # adam's is the undisturbed run the fault test below compares with
    assert max_diff(ref.state_dict, got.state_dict) <= 1e-5
    assert [r["epoch"] for r in reports] == [1, 2]
    for a, b in zip(ref.metrics, got.metrics, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5)
        assert b["val_accuracy"] == pytest.approx(a["val_accuracy"], abs=1e-6)
    # gradients up and weights down, 2 replicas, float32
    assert got.metrics[0]["bytes_per_step"] == 2 * 2 * 4 * n_params(spec)


@pytest.mark.ray
def test_bfloat16_on_the_wire_halves_bytes_and_stays_close(ray_local, tmp_path):
    spec = spec_of(tmp_path, "local", optimizer="sgd")
    ref = local.run(spec, lambda r: None)
    got = ps.run(spec.replace(strategy="ps", workers=2, servers=2, comm_dtype="bfloat16",
                              out=str(tmp_path / "ps")), lambda r: None)
    assert got.metrics[0]["bytes_per_step"] == 2 * 2 * 2 * n_params(spec)
    assert got.state_dict["head.weight"].dtype == torch.float32  # fp32 master weights
    assert 0 < max_diff(ref.state_dict, got.state_dict) < 0.02


@pytest.mark.ray
def test_async_reaches_local_accuracy_within_twice_the_epochs(ray_local, tmp_path):
    """Target: local's val_accuracy after E=2 epochs minus 0.03; async with 2 replicas, replica 0
    twice as slow and max_staleness 1 must reach it by epoch 2E=4."""
    spec = spec_of(tmp_path, "local", optimizer="adam", hidden=[32])
    target = local.run(spec, lambda r: None).metrics[-1]["val_accuracy"] - 0.03
    got = ps.run(spec.replace(strategy="ps", mode="async", workers=2, straggler=2.0, max_staleness=1,
                              epochs=4, out=str(tmp_path / "ps")), lambda r: None)
    accs = [r["val_accuracy"] for r in got.metrics]
    assert max(accs) >= target, (accs, target)
    assert all(r["bytes_per_step"] > 0 and documented_record(r) for r in got.metrics)


@pytest.mark.ray
def test_async_discards_a_slow_replicas_stale_gradients_when_no_staleness_is_allowed(ray_local, tmp_path):
    """max_staleness 0: a gradient is applied only if no update came after the weights it read.
    Both replicas start on the same weights, and replica 0 (three times as slow) finishes after
    replica 1 has updated them: its gradient is discarded and its shard recomputed."""
    spec = spec_of(tmp_path, "ps", strategy="ps", mode="async", workers=2, straggler=3.0,
                   max_staleness=0, epochs=1)
    rec = ps.run(spec, lambda r: None).metrics[0]
    assert rec["discarded"] >= 1
    # every computed gradient, discarded or not, brought its weights down and went up: 2 x 4 bytes
    batches = global_batches(spec, load_data(spec), 1)
    shards = sum(1 for b in batches for part in range(2) if len(shard(b, part, 2)))
    assert rec["bytes_per_step"] == pytest.approx(
        (shards + rec["discarded"]) * 2 * 4 * n_params(spec) / len(batches), rel=1e-12)


# --- faults, checkpoints, resuming ---------------------------------------------------------------

@pytest.mark.ray
def test_sync_run_killed_mid_epoch_resumes_bit_for_bit(ray_local, tmp_path, trained, monkeypatch):
    kw = {"strategy": "ps", "optimizer": "adam", "workers": 2, "servers": 2}
    undisturbed = spec_of(tmp_path, "clean", **kw)  # test_sync_equals_local[adam-2] trained it
    clean = (trained.get(undisturbed) or train(undisturbed, lambda r: None)).state_dict
    monkeypatch.setenv("RAYDIST_FAULT", "1:2")
    reports = []
    spec = spec_of(tmp_path, "faulty", max_failures=1, **kw)
    train(spec, reports.append)
    assert (tmp_path / "faulty" / ".fault_fired").exists()
    assert [r["epoch"] for r in reports] == [1, 2]  # epoch 1 came from the checkpoint, not redone
    faulty = torch.load(tmp_path / "faulty" / "model.pt")
    assert all(torch.equal(clean[k], faulty[k]) for k in clean) and list(clean) == list(faulty)

    # the same spec again: the finished checkpoint is resumed, nothing is retrained
    again = []
    result = train(spec, again.append)
    assert again == [] and result.metrics == checkpoint.read(spec.out)["history"]
    assert all(torch.equal(clean[k], result.state_dict[k]) for k in clean)

    # another spec in the same out is refused
    with pytest.raises(ConfigError) as e:
        train(spec.replace(lr=0.5), lambda r: None)
    assert str(e.value) == (
        f"lr: got 0.5, but {spec.out} holds a ps run with lr={spec.lr!r}; resume it with the same "
        "settings (only epochs, out, address, max_failures, stall_timeout_s, threads_per_worker, "
        "straggler, memory_per_worker may change) or choose another out")


@pytest.mark.ray
def test_a_diverged_run_leaves_no_checkpoint_of_the_diverged_epoch(ray_local, tmp_path):
    spec = spec_of(tmp_path, "nan", strategy="ps", workers=2, optimizer="sgd", lr=1e20)
    reports = []
    with pytest.raises(Diverged, match=r"^training loss is (nan|inf) at epoch 1$"):
        train(spec, reports.append)
    assert [r["epoch"] for r in reports] == [1]  # reported, with its non-finite loss
    assert pd.read_csv(tmp_path / "nan" / "metrics.csv")["epoch"].tolist() == [1]  # kept on disk
    assert checkpoint.read(spec.out) is None and not (tmp_path / "nan" / "model.pt").exists()


@pytest.mark.ray
def test_a_death_beyond_max_failures_ends_the_run(ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYDIST_FAULT", "0:1")
    with pytest.raises(ps.ActorFailed,
                       match=r"^ps: an actor died \(\w+\) and max_failures=0 restarts are used up$"):
        train(spec_of(tmp_path, "x", strategy="ps", workers=2), lambda r: None)


# --- the command line ----------------------------------------------------------------------------

@pytest.mark.ray
def test_cli_train_ps_writes_the_same_outputs_as_local(ray_local, tmp_path):
    args = ["train", "--model", "mlp", "--data", "digits", "--hidden", "16", "--epochs", "1",
            "--batch-size", "128", "--optimizer", "momentum"]
    assert cli.main([*args, "--out", str(tmp_path / "local")]) == 0
    assert cli.main([*args, "--strategy", "ps", "--workers", "2", "--servers", "2",
                     "--out", str(tmp_path / "ps")]) == 0
    local_files = {p.name for p in (tmp_path / "local").iterdir()}
    assert local_files <= {p.name for p in (tmp_path / "ps").iterdir()}
    a, b = torch.load(tmp_path / "local" / "model.pt"), torch.load(tmp_path / "ps" / "model.pt")
    assert max_diff(a, b) <= 1e-5


def documented_record(rec) -> bool:
    return all(documented(k) for k in rec)
