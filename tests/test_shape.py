"""One shape for every strategy: the pre-flight's refusals (knobs the strategy does not read,
an output folder that cannot be written), the knobs' resume rules, a sweep's trials holding
only the knobs their strategy reads, and the record schema."""

from __future__ import annotations

import pandas as pd
import pytest

from raydist.cli import main
from raydist.config import RunSpec, SweepSpec
from raydist.config.resume import resumable
from raydist.engine.record import documented
from raydist.train import train

pytestmark = pytest.mark.unit


def run_cli(args, capsys):
    code = main(["train", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--strategy", "ddp", "--servers", "3"], "servers: read only by ps; this run's strategy is ddp"),
    (["--strategy", "ps", "--stages", "3"], "stages: read only by pipeline; this run's strategy is ps"),
    (["--strategy", "pipeline", "--workers", "2"],
     "workers: read only by ddp, ps, fsdp, tp; this run's strategy is pipeline"),
    (["--strategy", "local", "--grad-compression", "fp16"],
     "grad_compression: read only by ddp; this run's strategy is local"),
    (["--strategy", "local", "--max-failures", "1"],
     "max_failures: read only by ddp, ps, pipeline, fsdp, tp; this run's strategy is local"),
])
def test_a_knob_the_strategy_does_not_read_is_refused_by_name(tmp_path, capsys, args, message):
    out = tmp_path / "never"
    code, err = run_cli([*args, "--out", str(out)], capsys)
    assert (code, err) == (2, f"error: {message}\n")
    assert not out.exists()


def test_each_name_knob_finds_its_registry_and_ray_knobs_follow_the_strategies():
    """config names no registry by string: each knob whose value is a registered name finds
    its registry (a strategy's own values in that strategy), and the knobs read on Ray are
    read by the strategies that ask a cluster for resources, with no list of them in config."""
    from dataclasses import fields

    from raydist.config.knobs import ON_RAY, readers_of, registry_of

    named = {f.name: registry_of(f.name).kind for f in fields(RunSpec) if f.metadata["registry"]}
    assert named == {n: n for n in ("strategy", "model", "data", "optimizer", "lr_scaling", "lr_schedule",
                                    "tracking", "grad_compression", "schedule")}
    on_ray = {f.name: readers_of(f) for f in fields(RunSpec) if f.metadata["strategies"] == ON_RAY}
    assert on_ray == {n: ("ddp", "ps", "pipeline", "fsdp", "tp")
                      for n in ("address", "max_failures", "stall_timeout_s")}


def test_a_knob_at_its_default_is_no_mistake(tmp_path):
    spec = RunSpec.from_dict({"strategy": "local", "servers": 1, "epochs": 1, "out": str(tmp_path / "a")})
    spec.refuse_unread()


def test_out_that_is_a_file_is_refused_before_any_training(tmp_path, capsys):
    file = tmp_path / "taken"
    file.write_text("not a folder")
    code, err = run_cli(["--epochs", "50", "--out", str(file)], capsys)
    assert (code, err) == (2, f"error: out: {file} is a file; expected a folder (created if missing)\n")
    assert file.read_text() == "not a folder"
    # a Ray strategy too, before it starts any Ray (the unit tier forbids ray.init)
    code, err = run_cli(["--strategy", "ddp", "--workers", "2", "--out", str(file)], capsys)
    assert (code, err) == (2, f"error: out: {file} is a file; expected a folder (created if missing)\n")
    code, err = run_cli(["--out", str(file / "run")], capsys)
    assert (code, err) == (2, f"error: out: cannot create {file / 'run'}: {file} is a file\n")


def test_a_local_run_writes_its_spec_when_it_starts(tmp_path):
    seen = []
    spec = RunSpec.from_dict({"epochs": 1, "out": str(tmp_path / "r")})
    train(spec, lambda rec: seen.append((tmp_path / "r" / "spec.yaml").exists()))
    assert seen == [True]


def test_which_knobs_a_resume_may_change():
    # where and how fast a run goes, never what it computes; ddp's elastic group may resize
    assert resumable("ps") == ["epochs", "out", "address", "max_failures", "stall_timeout_s",
                               "threads_per_worker", "straggler", "memory_per_worker"]
    assert resumable("pipeline") == ["epochs", "out", "address", "max_failures", "stall_timeout_s",
                                     "threads_per_worker", "memory_per_worker", "use_gpu", "replicas",
                                     "timeline_step"]
    assert resumable("ddp") == ["epochs", "workers", "out", "address", "max_failures", "stall_timeout_s",
                                "threads_per_worker", "memory_per_worker", "use_gpu", "bucket_cap_mb"]
    # tp's checkpoints hold each rank's shards: workers and tp_size stay
    assert resumable("tp") == ["epochs", "out", "address", "max_failures", "stall_timeout_s",
                               "threads_per_worker", "memory_per_worker", "use_gpu"]


def test_a_sweep_trial_gets_only_the_knobs_its_strategy_reads():
    sweep = SweepSpec.from_dict({
        "servers": 2, "epochs": 1, "optimizer": {"grid": ["sgd", "adam"]},
        "stages": {"grid": [1, 2]},
        "sweep": {"variants": [{"strategy": "ps", "workers": 2}, {"strategy": "local"},
                               {"strategy": "pipeline"}]}})
    grid = sweep.trial_grid()
    # local ignores stages: its two trials per optimizer are one; ps ignores it too
    assert grid == [
        {"optimizer": "sgd", "strategy": "ps", "workers": 2}, {"optimizer": "sgd", "strategy": "local"},
        {"optimizer": "sgd", "stages": 1, "strategy": "pipeline"},
        {"optimizer": "sgd", "stages": 2, "strategy": "pipeline"},
        {"optimizer": "adam", "strategy": "ps", "workers": 2}, {"optimizer": "adam", "strategy": "local"},
        {"optimizer": "adam", "stages": 1, "strategy": "pipeline"},
        {"optimizer": "adam", "stages": 2, "strategy": "pipeline"}]
    ps, local = (sweep.run_spec({"variant": v}, "/tmp/t") for v in grid[:2])
    assert (ps.servers, ps.workers) == (2, 2)
    assert (local.servers, local.stages) == (1, 2)  # the defaults: local reads neither
    local.refuse_unread()


def test_a_sweeps_embedded_ray_offers_what_its_hungriest_trial_asks():
    """3 ps replicas of 1 CPU and 2 servers of half a CPU: 4 CPUs, more than the 2-worker ddp
    trial or the pipeline of 3 stages; local asks Ray for nothing."""
    from raydist import sweep

    spec = SweepSpec.from_dict({"epochs": 1, "sweep": {"variants": [
        {"strategy": "local"}, {"strategy": "ddp", "workers": 2}, {"strategy": "pipeline", "stages": 3},
        {"strategy": "ps", "workers": 3, "servers": 2}]}})
    assert sweep.hungriest_trial(spec) == (4.0, "a trial (ps (3 replicas x 1 CPU + 2 servers x 0.5 CPU))")
    only_local = SweepSpec.from_dict({"epochs": 1, "optimizer": {"grid": ["sgd", "adam"]}})
    assert sweep.hungriest_trial(only_local) == (0.0, "the sweep")


def test_every_record_field_is_documented(tmp_path):
    metrics = train(RunSpec.from_dict({"epochs": 1, "out": str(tmp_path)}), lambda r: None).metrics
    assert all(documented(k) for k in metrics[0]), metrics[0]
    assert documented("stage3_comm_s") and not documented("stage_x_comm_s") and not documented("speed")


def test_a_diverged_run_on_the_command_line_is_one_line_and_exit_1(tmp_path, capsys):
    code, err = run_cli(["--optimizer", "sgd", "--lr", "1e30", "--epochs", "2", "--out", str(tmp_path)],
                        capsys)
    assert (code, err) == (1, "error: diverged: training loss is nan at epoch 1; try a smaller lr\n")
    # what it trained is kept: the diverged epoch's record, not a model
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert metrics["epoch"].tolist() == [1] and metrics["train_loss"].isna().all()
    assert not (tmp_path / "model.pt").exists()


def test_a_checkpoint_past_the_runs_epochs_is_refused_before_ray_starts(tmp_path, capsys):
    from raydist.engine import checkpoint

    spec = RunSpec.from_dict({"strategy": "ps", "workers": 2, "epochs": 3, "out": str(tmp_path)})
    spec.save(tmp_path / "spec.yaml")
    checkpoint.write(str(tmp_path), {"history": [{"epoch": e} for e in (1, 2, 3)]})
    code, err = run_cli(["--strategy", "ps", "--workers", "2", "--epochs", "2", "--out", str(tmp_path)],
                        capsys)
    assert (code, err) == (2, f"error: epochs: got 2, but the checkpoint in {tmp_path} is at epoch 3; "
                              "expected epochs >= 3\n")
    # another setting than the run in the folder: refused by name, also before any Ray
    code, err = run_cli(["--strategy", "ps", "--workers", "2", "--epochs", "4", "--lr", "0.5",
                         "--out", str(tmp_path)], capsys)
    assert code == 2 and err.startswith(f"error: lr: got 0.5, but {tmp_path} holds a ps run with lr=0.01;")


def test_only_rays_notice_about_switching_auth_off_is_dropped(caplog):
    import logging

    from raydist.runtime import ray_compat

    ray_compat.quiet_token_auth_notice()
    ray_compat.quiet_token_auth_notice()  # once is enough: no second filter
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    assert len(log.filters) == 1
    with caplog.at_level(logging.WARNING, logger=log.name):
        log.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled")
        log.warning("Token authentication is disabled for this Ray cluster. Anyone can connect")
    assert [r.getMessage().split(".")[0] for r in caplog.records] == [
        "Token authentication is disabled for this Ray cluster"]
