"""Bad input: one line `error: ...` on stderr naming the field or file, exit code 2, no output folder."""

from __future__ import annotations

import pytest

from raydist.cli import main

pytestmark = pytest.mark.unit

OPTIMIZER_NAMES = "gd, sgd, momentum, adagrad, rmsprop, adam, adamw, lars, muon, lamb, adafactor, lion, schedule-free-adamw"


def write(path, text):
    path.write_text(text)
    return str(path)


CASES = {
    "negative lr": (["--lr", "-1"], "lr: got -1.0; expected a number > 0"),
    "unknown optimizer": (["--optimizer", "adamm"], "optimizer: unknown value 'adamm' (did you mean "
                          f"'adam'?); expected one of {OPTIMIZER_NAMES}"),
    "unknown --set key": (["--set", "bach_size=3"], "unknown key 'bach_size' (did you mean 'batch_size'?)"),
    "--set without =": (["--set", "lr"], "--set: got 'lr'; expected key=value"),
    "epochs not int": (["--epochs", "two"], "epochs: got 'two'; expected an integer"),
    "zero batch": (["--batch-size", "0"], "batch_size: got 0; expected an integer >= 1"),
    "beta out of range": (["--beta", "1.5"], "beta: got 1.5; expected a number in [0, 1)"),
    "bad schedule": (["--schedule", "2f2b"], "schedule: unknown value '2f2b' (did you mean '1f1b'?); expected one of gpipe, 1f1b"),
    "bad hidden": (["--hidden", "64,x"], "hidden: got '64,x'; expected a list of integers"),
    "unknown flag": (["--bach-size", "3"], "unrecognized arguments: --bach-size 3"),
    "missing config": (["--config", "{tmp}/nope.yaml"], "{tmp}/nope.yaml: no such file"),
    "config not yaml": (["--config", "{tmp}/bad.yaml"], "{tmp}/bad.yaml: not valid YAML (line 2)"),
    "config unknown key": (["--config", "{tmp}/typo.yaml"],
                           "{tmp}/typo.yaml: unknown key 'lrr' (did you mean 'lr'?)"),
    "config bad value": (["--config", "{tmp}/neg.yaml"], "{tmp}/neg.yaml: epochs: got -3; expected an integer >= 1"),
    "config not a mapping": (["--config", "{tmp}/list.yaml"],
                             "{tmp}/list.yaml: expected a mapping of field: value at the top level"),
    "unknown strategy": (["--strategy", "locale"], "strategy: unknown value 'locale' (did you mean 'local'?); "
                         "expected one of "),
    "unknown data": (["--data", "digit"], "data: unknown value 'digit' (did you mean 'digits'?); expected one of "
                     "digits, synthetic, text, csv, parquet"),
    "csv without path": (["--data", "csv"], "data: 'csv' needs a file: csv:PATH"),
    "csv missing file": (["--data", "csv:{tmp}/none.csv"], "{tmp}/none.csv: no such file"),
    "csv empty": (["--data", "csv:{tmp}/empty.csv"], "{tmp}/empty.csv: the file is empty"),
    "csv header only": (["--data", "csv:{tmp}/header.csv"], "{tmp}/header.csv: the file has no data rows"),
    "csv no target": (["--data", "csv:{tmp}/ok.csv", "--target", "label"],
                      "{tmp}/ok.csv: no target column 'label'; columns are a, b, y"),
    "csv not numeric": (["--data", "csv:{tmp}/text.csv"], "{tmp}/text.csv: column 'a' is not numeric (row 2: 'x')"),
    "csv missing value": (["--data", "csv:{tmp}/nan.csv"], "{tmp}/nan.csv: column 'b' has a missing value (row 1)"),
    "parquet not parquet": (["--data", "parquet:{tmp}/ok.csv"],
                            "{tmp}/ok.csv: cannot be read as parquet (ArrowInvalid)"),
    "model cannot take data": (["--model", "cnn", "--data", "synthetic"],
                               "model: 'cnn' cannot take data 'synthetic' (features); it takes image"),
    "text needs transformer": (["--model", "mlp", "--data", "text"],
                               "model: 'mlp' cannot take data 'text' (tokens); it takes features"),
    "heads do not divide": (["--model", "transformer", "--data", "text", "--heads", "3"],
                            "heads: 3 does not divide d_model 64"),
}


@pytest.fixture
def files(tmp_path):
    write(tmp_path / "bad.yaml", "lr: 0.1\n  epochs: [3\n")
    write(tmp_path / "typo.yaml", "lrr: 0.1\n")
    write(tmp_path / "neg.yaml", "epochs: -3\n")
    write(tmp_path / "list.yaml", "- lr\n- 0.1\n")
    write(tmp_path / "empty.csv", "")
    write(tmp_path / "header.csv", "a,b,y\n")
    write(tmp_path / "ok.csv", "a,b,y\n1,2,0\n3,4,1\n5,6,0\n")
    write(tmp_path / "text.csv", "a,b,y\n1,2,0\nx,4,1\n")
    write(tmp_path / "nan.csv", "a,b,y\n1,,0\n3,4,1\n")
    return tmp_path


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_no_folder(case, files, capsys):
    argv, message = CASES[case]
    out = files / "run"
    argv = [a.replace("{tmp}", str(files)) for a in argv]
    assert exit_code(["train", "--epochs", "1", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    expected = "error: " + message.replace("{tmp}", str(files))
    assert err.startswith(expected) and err.count("\n") == 1, err
    assert not out.exists()


def exit_code(argv: list[str]) -> int:
    """main's return value, or the code argparse exits with."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code
