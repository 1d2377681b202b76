"""`raydist report`: the numbers of a hand-made results table, worked out by hand, and the
Markdown and PNG files written from it."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from raydist import report
from raydist.cli import main
from raydist.config import ConfigError

pytestmark = pytest.mark.unit

PNG = b"\x89PNG\r\n\x1a\n"

# trial: (strategy, workers, seed, samples/s per epoch, val_accuracy per epoch, wall time per epoch)
# target val_accuracy 0.9; throughput = median over epochs 2..3; time to target = first epoch >= 0.9
SCALING = {
    "a": ("local", 1, 0, [100, 200, 220], [0.50, 0.85, 0.92], [1, 2, 3]),    # 210 /s, 3 s
    "b": ("local", 1, 1, [100, 190, 210], [0.60, 0.91, 0.95], [1, 2, 3]),    # 200 /s, 2 s
    "c": ("ddp", 1, 0, [50, 180, 180], [0.50, 0.80, 0.91], [2, 4, 6]),       # 180 /s, 6 s
    "d": ("ddp", 1, 1, [50, 200, 200], [0.50, 0.92, 0.93], [2, 4, 6]),       # 200 /s, 4 s
    "e": ("ddp", 2, 0, [80, 380, 380], [0.60, 0.90, 0.95], [1, 2, 3]),       # 380 /s, 2 s
    "f": ("ddp", 2, 1, [80, 360, 360], [0.50, 0.70, 0.80], [1, 2, 3]),       # 360 /s, never
    "g": ("ddp", 4, 0, [100, 600, 620], [0.70, 0.95, 0.96], [0.5, 1, 1.5]),  # 610 /s, 1 s
    "h": ("ddp", 4, 1, [100, 640, 660], [0.92, 0.95, 0.96], [0.5, 1, 1.5]),  # 650 /s, 0.5 s
}


def results_table(trials: dict, optimizer: str = "adam", lr: float = 0.01) -> pd.DataFrame:
    rows = []
    for trial_id, (strategy, workers, seed, sps, acc, wall) in trials.items():
        for epoch, (s, a, w) in enumerate(zip(sps, acc, wall, strict=True), start=1):
            rows.append({"trial_id": trial_id, "status": "completed", "epoch": epoch,
                         "train_loss": 1.0 / epoch, "val_loss": 1.0 - a, "val_accuracy": a,
                         "samples_per_s": s, "epoch_time_s": 1.0, "wall_time_s": w,
                         "strategy": strategy, "optimizer": optimizer, "lr": lr,
                         "workers": workers, "seed": seed, "out": f"x/trials/{trial_id}"})
    return pd.DataFrame(rows)


def sweep_folder(tmp_path: Path, results: pd.DataFrame, settings: str) -> Path:
    results.to_csv(tmp_path / "results.csv", index=False)
    (tmp_path / "sweep.yaml").write_text(f"model: mlp\nsweep: {settings}\n")
    return tmp_path


def test_speedup_efficiency_and_time_to_target_by_hand():
    trials = report.per_trial(results_table(SCALING), "val_accuracy", "max", 0.9)
    assert trials.set_index("trial_id")["samples_per_s"].to_dict() == {
        "a": 210, "b": 200, "c": 180, "d": 200, "e": 380, "f": 360, "g": 610, "h": 650}
    assert trials.set_index("trial_id")["time_to_target"].to_dict() == {
        "a": 3, "b": 2, "c": 6, "d": 4, "e": 2, "f": math.inf, "g": 1, "h": 0.5}

    table = report.speedup_table(trials).set_index(["strategy", "workers"])
    assert table["samples_per_s"].to_dict() == {("ddp", 1): 190, ("ddp", 2): 370, ("ddp", 4): 630,
                                                ("local", 1): 205}
    assert table["speedup"].to_dict() == pytest.approx(
        {("ddp", 1): 1.0, ("ddp", 2): 370 / 190, ("ddp", 4): 630 / 190, ("local", 1): 1.0})
    assert table["efficiency"].to_dict() == pytest.approx(
        {("ddp", 1): 1.0, ("ddp", 2): 370 / 190 / 2, ("ddp", 4): 630 / 190 / 4, ("local", 1): 1.0})
    # medians over seeds: ddp 1 -> (6+4)/2 = 5 s; ddp 2 -> (2+inf)/2: not reached; ddp 4 -> 0.75 s
    assert table["time_to_target"].to_dict() == {("ddp", 1): 5, ("ddp", 2): math.inf,
                                                 ("ddp", 4): 0.75, ("local", 1): 2.5}
    assert table.loc[("ddp", 4), "ttt_speedup"] == pytest.approx(5 / 0.75)
    assert math.isnan(table.loc[("ddp", 2), "ttt_speedup"])
    assert table["vs_local"].to_dict() == pytest.approx(
        {("ddp", 1): 190 / 205, ("ddp", 2): 370 / 205, ("ddp", 4): 630 / 205, ("local", 1): 1.0})


def test_report_file_holds_the_numbers_and_plots(tmp_path):
    folder = sweep_folder(tmp_path, results_table(SCALING), "{target: 0.9}")
    (folder / "trials" / "a").mkdir(parents=True)
    machine = {"host": "box", "cpu_model": "Test CPU", "cpus": 2, "gpus": 0, "threads_per_worker": 1,
               "python": "3.11.7", "torch": "2.13.0", "ray": "2.60.0"}
    (folder / "trials" / "a" / "machine.yaml").write_text(yaml.safe_dump(machine, sort_keys=False))

    assert main(["report", str(folder)]) == 0
    text = (folder / "report.md").read_text()
    assert "8 trials (8 completed); metric val_accuracy (max), target val_accuracy >= 0.9." in text
    assert "| box | Test CPU | 2 | 0 | 1 | 3.11.7 | 2.13.0 | 2.60.0 |" in text
    rows = {
        # strategy | workers | seeds | samples/s | speedup | efficiency | vs_local | time to target | ttt
        "| ddp | 1 | 2 | 190 | 1.00 | 1.00 | 0.93 | 5.00 s | 1.00 |",
        "| ddp | 2 | 2 | 370 | 1.95 | 0.97 | 1.80 | not reached | - |",
        "| ddp | 4 | 2 | 630 | 3.32 | 0.83 | 3.07 | 0.75 s | 6.67 |",
        "| local | 1 | 2 | 205 | 1.00 | 1.00 | 1.00 | 2.50 s | 1.00 |",
    }
    assert rows <= set(text.splitlines())
    # the best setting of the one optimizer: ddp on 4 workers, final accuracy 0.96 for both seeds
    assert "| adam | strategy=ddp, workers=4 | 2 | 0 | 0.9600 | 0.9600..0.9600 | 0.75 s |" in text
    for png in ("speedup.png", "curves.png"):
        assert (folder / png).read_bytes()[:8] == PNG
        assert f"]({png})" in text
    assert not (folder / "lr_sensitivity.png").exists()
    assert "The sweep tries one lr per optimizer: no sensitivity to show." in text


def test_best_lr_per_optimizer_and_lr_sensitivity(tmp_path):
    grid = {  # (optimizer, lr): final val_accuracy of seeds 0, 1; nan: the run diverged
        ("sgd", 0.1): [0.80, 0.90], ("sgd", 1.0): [math.nan, math.nan],
        ("adam", 0.001): [0.91, 0.93], ("adam", 0.01): [0.95, 0.94],
        ("adam", 0.1): [0.99, math.nan],  # the best seed of all, but half the seeds diverge
    }
    frames = []
    for i, ((optimizer, lr), finals) in enumerate(grid.items()):
        for seed, final in enumerate(finals):
            trial = {f"t{i}{seed}": ("local", 1, seed, [10, 20], [0.5, final], [1, 2])}
            frame = results_table(trial, optimizer, lr)
            frame["status"] = "diverged" if math.isnan(final) else "completed"
            frames.append(frame)
    folder = sweep_folder(tmp_path, pd.concat(frames, ignore_index=True), "{target: 0.92}")

    best = report.best_table(report.per_trial(pd.read_csv(folder / "results.csv"), "val_accuracy", "max",
                                              0.92), "max").set_index("optimizer")
    assert best["lr"].to_dict() == {"adam": 0.01, "sgd": 0.1}  # a diverging seed counts as worst
    assert best["final"].to_dict() == pytest.approx({"adam": 0.945, "sgd": 0.85})
    assert best["time_to_target"].to_dict() == {"adam": 2, "sgd": math.inf}

    text = report.write(folder).read_text()
    assert "10 trials (7 completed, 3 diverged); metric val_accuracy (max), target" in text
    assert "| adam | lr=0.01 | 2 | 0 | 0.9450 | 0.9400..0.9500 | 2.00 s |" in text
    assert "| sgd | lr=0.1 | 2 | 0 | 0.8500 | 0.8000..0.9000 | not reached |" in text
    assert "The sweep does not vary workers: nothing to compare." in text
    assert "| 0.1 | - | 0.8500 |" in text and "| 1 | - | - |" in text  # lr x optimizer medians
    assert (folder / "lr_sensitivity.png").read_bytes()[:8] == PNG


def test_report_without_results(tmp_path):
    with pytest.raises(ConfigError) as e:
        report.write(tmp_path)
    assert str(e.value) == f"{tmp_path}: no results.csv; run `raydist sweep FILE --out {tmp_path}` first"


def test_a_tie_goes_to_the_setting_that_reaches_the_target_first():
    ties = {  # the same accuracies, as ddp gives beside local; local gets there sooner
        "l": ("local", 1, 0, [100, 100], [0.5, 0.95], [1, 2]),
        "d": ("ddp", 1, 0, [100, 100], [0.5, 0.95], [2, 4]),
    }
    trials = report.per_trial(results_table(ties), "val_accuracy", "max", 0.9)
    best = report.best_table(trials, "max")
    assert best[["optimizer", "setting", "time_to_target"]].values.tolist() == [
        ["adam", "strategy=local", 2.0]]


def test_plan_predictions_beside_measured_speedups(tmp_path):
    folder = sweep_folder(tmp_path, results_table(SCALING), "{target: 0.9}")
    plan_dir = tmp_path / "plan"
    plan_dir.mkdir()
    pd.DataFrame({"strategy": ["ddp"] * 3 + ["ps"], "workers": [1, 2, 4, 2], "step_s": [1, 0.6, 0.4, 1],
                  "speedup": [1.0, 1.8, 3.5, 1.2], "efficiency": [1, 0.9, 0.875, 0.6]}
                 ).to_csv(plan_dir / "plan.csv", index=False)

    assert main(["report", str(folder), "--plan", str(plan_dir)]) == 0
    text = (folder / "report.md").read_text()
    # strategy | workers | seeds | samples/s | speedup | predicted | efficiency | ...
    assert "| ddp | 2 | 2 | 370 | 1.95 | 1.80 | 0.97 | 1.80 | not reached | - |" in text.splitlines()
    assert "| ddp | 4 | 2 | 630 | 3.32 | 3.50 | 0.83 | 3.07 | 0.75 s | 6.67 |" in text.splitlines()
    assert "| local | 1 | 2 | 205 | 1.00 | - | 1.00 | 1.00 | 2.50 s | 1.00 |" in text.splitlines()
    assert (folder / "speedup.png").read_bytes()[:8] == PNG

    with pytest.raises(ConfigError) as e:
        report.write(folder, tmp_path / "nowhere")
    assert str(e.value) == f"{tmp_path / 'nowhere'}: no plan.csv; write one with `raydist plan ... --out DIR`"
    (plan_dir / "plan.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError) as e:
        report.write(folder, plan_dir)
    assert str(e.value) == (f"{plan_dir / 'plan.csv'}: not a raydist plan table "
                            "(needs columns strategy, workers, speedup)")


def test_memory_per_worker_against_throughput_for_every_strategy(tmp_path):
    """Each trial's most model state and peak RSS over its epochs (each the worst worker's),
    beside its throughput; a sweep that recorded no memory has no such section."""
    results = results_table({k: SCALING[k] for k in ("a", "c", "g")})
    # MiB per epoch: local holds 8 MiB, ddp 1 8 MiB, ddp 4 the same model state, more RSS
    results["model_state_bytes"] = [8 * 2**20] * 6 + [8 * 2**20, 9 * 2**20, 8 * 2**20]
    results["peak_rss_bytes"] = [2**30] * 6 + [2**30, 3 * 2**30, 2 * 2**30]
    folder = sweep_folder(tmp_path, results, "{target: 0.9}")
    assert main(["report", str(folder)]) == 0
    text = (folder / "report.md").read_text()
    assert "## Memory per worker" in text
    # trial | strategy | workers | samples/s (median of epochs 2, 3) | model state | peak RSS
    assert {"| a | local | 1 | 210 | 8.0 MiB | 1.0 GiB |", "| c | ddp | 1 | 180 | 8.0 MiB | 1.0 GiB |",
            "| g | ddp | 4 | 610 | 9.0 MiB | 3.0 GiB |"} <= set(text.splitlines())
    assert (folder / "memory.png").read_bytes()[:8] == PNG and "](memory.png)" in text
    (tmp_path / "plain").mkdir()
    plain = sweep_folder(tmp_path / "plain", results_table(SCALING), "{target: 0.9}")
    assert main(["report", str(plain)]) == 0
    assert "## Memory per worker" not in (plain / "report.md").read_text()
    assert not (plain / "memory.png").exists()
def test_bound_beside_every_speedup(tmp_path, monkeypatch):
    """DIR/bound.csv (N bare actors, nothing exchanged) sets efficiency_vs_bound beside each
    measured speedup, a paragraph per scaled row, and a dotted line in the speedup plot."""
    folder = sweep_folder(tmp_path, results_table(SCALING), "{target: 0.9}")
    pd.DataFrame({"model": "mlp", "optimizer": "adam", "workers": [1, 2, 4],
                  "samples_per_s": [250.0, 500.0, 700.0]}).to_csv(folder / "bound.csv", index=False)
    figures = []
    monkeypatch.setattr(report.figures, "save", lambda fig, path: figures.append((path.name, fig)))

    report.write(folder)
    lines = (folder / "report.md").read_text().splitlines()
    # strategy | workers | seeds | samples/s | speedup | efficiency | bound | vs bound | vs_local | ttt..
    assert "| ddp | 1 | 2 | 190 | 1.00 | 1.00 | 250 | 0.76 | 0.93 | 5.00 s | 1.00 |" in lines
    assert "| ddp | 2 | 2 | 370 | 1.95 | 0.97 | 500 | 0.74 | 1.80 | not reached | - |" in lines
    assert "| ddp | 4 | 2 | 630 | 3.32 | 0.83 | 700 | 0.90 | 3.07 | 0.75 s | 6.67 |" in lines
    assert "| local | 1 | 2 | 205 | 1.00 | 1.00 | 250 | 0.82 | 1.00 | 2.50 s | 1.00 |" in lines
    assert ("- ddp on 4 workers: 3.32x of 1 worker, and 0.90 of what 4 workers reach on this machine "
            "with nothing exchanged (bound 2.80x); communication and overhead cost the rest.") in lines
    [speedup, efficiency, _] = dict(figures)["speedup.png"].axes
    [line] = [x for x in speedup.lines if x.get_label() == "this machine's bound"]
    assert list(line.get_xdata()) == [1, 2, 4] and list(line.get_ydata()) == pytest.approx([1, 2, 2.8])
    [line] = [x for x in efficiency.lines if x.get_label() == "this machine's bound"]
    assert list(line.get_ydata()) == pytest.approx([1, 1, 0.7])


def test_no_bound_no_bound_columns(tmp_path):
    folder = sweep_folder(tmp_path, results_table(SCALING), "{target: 0.9}")
    report.write(folder)
    text = (folder / "report.md").read_text()
    assert "efficiency_vs_bound" not in text and "What this machine allows" not in text


# fsdp's N workers each train on 1/N of every batch, as ddp's do (fsdp.DATA_PARALLEL); tp's ranks
# split the model and each sees its group's whole shard (tp.DATA_PARALLEL is False)
SHARDED = {
    "a": ("local", 1, 0, [100, 200, 220], [0.50, 0.85, 0.92], [1, 2, 3]),   # 210 /s
    "i": ("fsdp", 1, 0, [50, 200, 200], [0.50, 0.80, 0.91], [2, 4, 6]),    # 200 /s
    "j": ("fsdp", 2, 0, [80, 400, 400], [0.60, 0.90, 0.95], [1, 2, 3]),    # 400 /s
    "k": ("tp", 1, 0, [50, 100, 100], [0.50, 0.80, 0.91], [2, 4, 6]),      # 100 /s
    "l": ("tp", 2, 0, [80, 150, 150], [0.60, 0.90, 0.95], [1, 2, 3]),      # 150 /s
}


def test_fsdp_rows_meet_the_bound_tp_rows_do_not(tmp_path):
    """bound 250 /s on 1 worker, 500 on 2: fsdp reaches 200 / 250 = 0.80 and 400 / 500 = 0.80
    of it; tp's rows get none (its N ranks do not each train on 1/N of a batch)."""
    folder = sweep_folder(tmp_path, results_table(SHARDED), "{target: 0.9}")
    pd.DataFrame({"model": "mlp", "optimizer": "adam", "workers": [1, 2],
                  "samples_per_s": [250.0, 500.0]}).to_csv(folder / "bound.csv", index=False)
    report.write(folder)
    lines = (folder / "report.md").read_text().splitlines()
    # strategy | workers | seeds | samples/s | speedup | efficiency | bound | vs bound | vs_local | ttt..
    assert any(x.startswith("| fsdp | 1 | 1 | 200 | 1.00 | 1.00 | 250 | 0.80 | 0.95 |") for x in lines)
    assert any(x.startswith("| fsdp | 2 | 1 | 400 | 2.00 | 1.00 | 500 | 0.80 | 1.90 |") for x in lines)
    assert any(x.startswith("| tp | 2 | 1 | 150 | 1.50 | 0.75 | - | - | 0.71 |") for x in lines)
    assert ("- fsdp on 2 workers: 2.00x of 1 worker, and 0.80 of what 2 workers reach on this machine "
            "with nothing exchanged (bound 2.00x); communication and overhead cost the rest.") in lines
    assert not any(x.startswith("- tp on") for x in lines)


def test_a_sweep_of_one_strategy_meets_the_bound_as_that_strategy(tmp_path):
    """Where the sweep does not vary the strategy, the table has no strategy column: its one
    strategy decides (fsdp: the bound; tp: none)."""
    for name, bound in (("fsdp", "500 | 0.80"), ("tp", "- | -")):
        trials = {k: (name, *SHARDED[k][1:]) for k in ("i", "j")}
        (tmp_path / name).mkdir()
        folder = sweep_folder(tmp_path / name, results_table(trials), "{target: 0.9}")
        pd.DataFrame({"model": "mlp", "optimizer": "adam", "workers": [1, 2],
                      "samples_per_s": [250.0, 500.0]}).to_csv(folder / "bound.csv", index=False)
        report.write(folder)
        lines = (folder / "report.md").read_text().splitlines()
        # workers | seeds | samples/s | speedup | efficiency | bound | vs bound | ...
        assert any(x.startswith(f"| 2 | 1 | 400 | 2.00 | 1.00 | {bound} |") for x in lines), name


def test_the_cluster_paragraph_names_the_strategy_the_plan_predicts_fastest(tmp_path):
    """A sweep's DIR/plan/plan.csv: at its most workers (4) ps steps in 0.3 s, ddp in 0.4 s, so
    the paragraph is about ps, at every N it was predicted."""
    folder = sweep_folder(tmp_path, results_table(SCALING), "{target: 0.9}")
    pd.DataFrame({"model": "mlp", "optimizer": "adam", "workers": [1, 2, 4],
                  "samples_per_s": [250.0, 500.0, 700.0]}).to_csv(folder / "bound.csv", index=False)
    (folder / "plan").mkdir()
    pd.DataFrame({"strategy": ["ddp"] * 3 + ["ps"] * 3, "workers": [1, 2, 4] * 2,
                  "step_s": [1, 0.6, 0.4, 1.2, 0.5, 0.3], "speedup": [1, 1.67, 2.5, 1, 2.4, 4.0],
                  "efficiency": [1, 0.83, 0.625, 1, 1.2, 1.0]}
                 ).to_csv(folder / "plan" / "plan.csv", index=False)
    report.write(folder)
    text = (folder / "report.md").read_text()
    assert ("links, ? latency): ps, the fastest it predicts there, on 4 workers would run 4.00x one "
            "(efficiency 1.00). DIR/plan/ has every strategy.") in text
    assert "| 4 | 300 | 4 | 1 |" in text.splitlines()
