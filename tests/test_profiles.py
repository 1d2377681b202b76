"""AlgoPerf's performance profiles (raydist/report/profiles.py) on a hand-made table of trials, every
expected number worked out by hand below, and the report section they make."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from raydist import report, sweep
from raydist.report import profiles

INF = math.inf
PNG = b"\x89PNG\r\n\x1a\n"
# (model, data, optimizer, lr): time to target of seeds 0, 1, 2, and the final val_accuracy
# (every seed the same) that breaks ties between lrs that never reach the target
TIMES = {
    # mlp/digits: sgd's best lr 0.1 (median 5), adam's 0.01 (median of 2, 3, inf = 3), rmsprop's
    # 0.01 (9); the best is adam's 3 -> ratios sgd 5/3, adam 1, rmsprop 3
    ("mlp", "digits", "sgd", 0.01): ([INF, INF, INF], 0.5), ("mlp", "digits", "sgd", 0.1): ([4, 6, 5], 0.9),
    ("mlp", "digits", "adam", 0.01): ([2, 3, INF], 0.9), ("mlp", "digits", "adam", 0.1): ([INF, INF, 1], 0.8),
    ("mlp", "digits", "rmsprop", 0.01): ([9, 8, 10], 0.9),
    ("mlp", "digits", "rmsprop", 0.1): ([INF] * 3, 0.2),
    # cnn/digits: sgd 0.1 (median of 2, 4, 2 = 2), adam 0.01 (4), rmsprop never: the best is
    # sgd's 2 -> ratios sgd 1, adam 2, rmsprop inf; rmsprop's best lr is 0.1 by its accuracy
    ("cnn", "digits", "sgd", 0.01): ([3, 3, 3], 0.9), ("cnn", "digits", "sgd", 0.1): ([2, 4, 2], 0.9),
    ("cnn", "digits", "adam", 0.01): ([4, 4, 4], 0.9), ("cnn", "digits", "adam", 0.1): ([INF, 5, 5], 0.9),
    ("cnn", "digits", "rmsprop", 0.01): ([INF] * 3, 0.3), ("cnn", "digits", "rmsprop", 0.1): ([INF] * 3, 0.5),
    # mlp/synthetic: nobody reaches the target -> every ratio inf
    ("mlp", "synthetic", "sgd", 0.01): ([INF] * 3, 0.6), ("mlp", "synthetic", "sgd", 0.1): ([INF] * 3, 0.7),
    ("mlp", "synthetic", "adam", 0.01): ([INF] * 3, 0.6), ("mlp", "synthetic", "adam", 0.1): ([INF] * 3, 0.6),
    ("mlp", "synthetic", "rmsprop", 0.01): ([INF] * 3, 0.6),
    ("mlp", "synthetic", "rmsprop", 0.1): ([INF] * 3, 0.6),
}


def trials_table() -> pd.DataFrame:
    rows = []
    for (model, data, optimizer, lr), (times, final) in TIMES.items():
        for seed, t in enumerate(times):
            rows.append({"trial_id": f"{model}-{data}-{optimizer}-{lr}-{seed}", "status": "completed",
                         "model": model, "data": data, "optimizer": optimizer, "lr": lr, "seed": seed,
                         "final": final, "time_to_target": t, "final_loss": 1 - final})
    return pd.DataFrame(rows)


@pytest.mark.unit
def test_best_lr_ratios_and_profiles_by_hand():
    scores = profiles.best(profiles.per_lr(trials_table(), "max"), "max").set_index(["workload", "optimizer"])
    assert scores["lr"].to_dict() == {
        ("cnn/digits", "adam"): 0.01, ("cnn/digits", "rmsprop"): 0.1, ("cnn/digits", "sgd"): 0.1,
        ("mlp/digits", "adam"): 0.01, ("mlp/digits", "rmsprop"): 0.01, ("mlp/digits", "sgd"): 0.1,
        ("mlp/synthetic", "adam"): 0.01, ("mlp/synthetic", "rmsprop"): 0.01, ("mlp/synthetic", "sgd"): 0.1}
    assert scores.loc[("mlp/digits", "adam"), "time_to_target"] == 3
    assert scores.loc[("cnn/digits", "sgd"), "time_to_target"] == 2

    ratio = profiles.ratios(scores.reset_index())
    assert ratio.loc["mlp/digits"].to_dict() == pytest.approx({"adam": 1.0, "rmsprop": 3.0, "sgd": 5 / 3})
    assert ratio.loc["cnn/digits"].to_dict() == {"adam": 2.0, "rmsprop": INF, "sgd": 1.0}
    assert ratio.loc["mlp/synthetic"].to_dict() == {"adam": INF, "rmsprop": INF, "sgd": INF}

    # sgd's ratios 5/3, 1, inf; adam's 1, 2, inf; rmsprop's 3, inf, inf
    shares = profiles.profile(ratio, [1.0, 1.5, 1.7, 2.0, 3.0, 100.0])
    expected = {"adam": [1, 1, 1, 2, 2, 2], "rmsprop": [0, 0, 0, 0, 1, 1], "sgd": [1, 1, 2, 2, 2, 2]}
    for name, thirds in expected.items():
        assert shares[name].tolist() == pytest.approx([n / 3 for n in thirds])


@pytest.mark.unit
def test_an_optimizer_missing_on_a_workload_counts_as_never_reaching(tmp_path):
    trials = trials_table()
    trials = trials[~((trials["optimizer"] == "sgd") & (trials["model"] == "cnn"))]
    ratio = profiles.ratios(profiles.best(profiles.per_lr(trials, "max"), "max"))
    # without sgd, adam is cnn/digits' best
    assert ratio.loc["cnn/digits"].to_dict() == {"adam": 1.0, "rmsprop": INF, "sgd": INF}


def results_of(trials: pd.DataFrame) -> pd.DataFrame:
    """results.csv rows: one epoch per trial at wall time = its time to target (accuracy 0.95,
    target 0.9), or an epoch that never reaches it (accuracy 0.5)."""
    rows = []
    for t in trials.itertuples():
        reached = math.isfinite(t.time_to_target)
        rows.append({"trial_id": t.trial_id, "status": "completed", "epoch": 1, "train_loss": 1.0,
                     "val_loss": 0.1 if reached else 2.0, "val_accuracy": 0.95 if reached else 0.5,
                     "samples_per_s": 100.0, "epoch_time_s": 1.0,
                     "wall_time_s": t.time_to_target if reached else 20.0, "strategy": "local",
                     "model": t.model, "data": t.data, "optimizer": t.optimizer, "lr": t.lr,
                     "workers": 1, "seed": t.seed, "out": f"x/{t.trial_id}"})
    return pd.DataFrame(rows)


@pytest.mark.unit
def test_the_report_draws_profiles_for_several_workloads_only(tmp_path):
    (tmp_path / "results.csv").write_text(results_of(trials_table()).to_csv(index=False))
    (tmp_path / "sweep.yaml").write_text("sweep: {target: 0.9}\n")
    text = report.write(tmp_path).read_text()
    assert "## Performance profiles (AlgoPerf)" in text
    lines = set(text.splitlines())
    # optimizer | workload | best lr | seeds | time to target | ratio | final val_loss
    assert "| adam | mlp/digits | 0.01 | 3 | 3.00 s | 1.00 | 0.1000 |" in lines
    assert "| sgd | mlp/digits | 0.1 | 3 | 5.00 s | 1.67 | 0.1000 |" in lines
    assert "| rmsprop | cnn/digits | 0.01 | 3 | not reached | - | 2.0000 |" in lines
    assert "| optimizer | rho(1) | rho(1.5) | rho(2) | rho(4) |" in lines
    assert "| rmsprop | 0 | 0 | 0 | 0.333333 |" in lines
    for png in ("profiles.png", "lr_profiles.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG

    one = tmp_path / "one"
    one.mkdir()
    results = results_of(trials_table()[lambda t: t["model"] == "cnn"])
    (one / "results.csv").write_text(results.to_csv(index=False))
    (one / "sweep.yaml").write_text("sweep: {target: 0.9}\n")
    assert "Performance profiles" not in report.write(one).read_text()
    assert not (one / "profiles.png").exists()


PROTOCOL = """
strategy: local
epochs: 2
optimizer: {grid: [sgd, adam]}
lr: {grid: [0.01, 0.1]}
sweep:
  target: 0.8
  seeds: [0]
  max_concurrent: 2
  variants: [{model: mlp, data: digits}, {model: mlp, data: synthetic, samples: 600}]
"""


@pytest.mark.ray
def test_a_protocol_sweep_reports_its_profiles(ray_local, tmp_path):
    (tmp_path / "protocol.yaml").write_text(PROTOCOL)
    out = tmp_path / "out"
    sweep.run(tmp_path / "protocol.yaml", out)
    text = report.write(out).read_text()
    results = pd.read_csv(out / "results.csv")
    assert (results.drop_duplicates("trial_id")["status"] == "completed").all()
    # one seed: an optimizer's time is its best lr's first wall time at val_accuracy >= 0.8
    times = {}
    for (optimizer, data), rows in results.groupby(["optimizer", "data"]):
        hits = [g[g["val_accuracy"] >= 0.8]["wall_time_s"].min() for _, g in rows.groupby("lr")]
        times[optimizer, f"mlp/{data}"] = min((h for h in hits if not math.isnan(h)), default=INF)
    lines = set(text.splitlines())
    for (optimizer, workload), t in times.items():
        best = min(times[o, workload] for o in ("sgd", "adam"))
        shown = "not reached" if t == INF else f"{t:.2f} s"
        ratio = f"{t / best:.2f}" if t < INF else "-"
        assert any(line.startswith(f"| {optimizer} | {workload} | ") and f"| 1 | {shown} | {ratio} |" in line
                   for line in lines), (optimizer, workload, shown, ratio)
    for optimizer in ("sgd", "adam"):
        wins = sum(times[optimizer, w] == min(times["sgd", w], times["adam", w]) < INF
                   for w in ("mlp/digits", "mlp/synthetic"))
        assert any(line.startswith(f"| {optimizer} | {wins / 2:g} |") for line in lines)
    for png in ("profiles.png", "lr_profiles.png"):
        assert (out / png).read_bytes()[:8] == PNG


@pytest.mark.unit
def test_the_shipped_protocol_gives_every_optimizer_the_same_space():
    from pathlib import Path

    from raydist.config import load_sweep

    s = load_sweep(Path(__file__).resolve().parents[1] / "tune_configs" / "protocol.yaml")
    (kind, optimizers), (lr_kind, lrs) = s.space["optimizer"], s.space["lr"]
    assert kind == lr_kind == "grid" and len(optimizers) >= 4 and len(lrs) >= 3
    steps = [b / a for a, b in zip(lrs, lrs[1:], strict=False)]
    assert steps == pytest.approx([steps[0]] * len(steps)) and steps[0] > 1  # a log grid
    assert len(s.space["seed"][1]) >= 3 and s.target is not None and s.search == "grid"
    assert len({(v["model"], v["data"]) for v in s.variants}) == 2
    assert sweep.total_trials(s) == len(optimizers) * len(lrs) * len(s.space["seed"][1]) * 2
