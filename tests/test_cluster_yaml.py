"""cluster.yaml passes Ray's own `ray up` validation (offline), and `raydist cluster check` prints
the autoscaling maximum or refuses a bad file with one line and exit code 2. No Ray is started."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from raydist.cli import main
from raydist.runtime.capacity import load_cluster_config

pytestmark = pytest.mark.unit

SHIPPED = Path(__file__).resolve().parent.parent / "cluster.yaml"

# A head with 2 CPUs; 4 worker slots. CPU: 2 + 3*4 (type a, its max) + 1*2 (type b fills the
# last slot) = 16. GPU: 0 + 2*2 (type b, its max) + 0 = 4.
SMALL = {
    "cluster_name": "t", "max_workers": 4, "provider": {"type": "aws", "region": "us-west-2"},
    "head_node_type": "h",
    "available_node_types": {
        "h": {"node_config": {}, "resources": {"CPU": 2, "GPU": 0, "trial_driver": 3}},
        "a": {"node_config": {}, "resources": {"CPU": 4, "GPU": 0}, "min_workers": 0, "max_workers": 3},
        "b": {"node_config": {}, "resources": {"CPU": 2, "GPU": 2}, "min_workers": 0, "max_workers": 2},
    },
}


def write(tmp_path: Path, name: str, config: dict | str) -> str:
    path = tmp_path / name
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return str(path)


def edited(**types: dict) -> dict:
    """SMALL with some node types' entries replaced."""
    config = yaml.safe_load(yaml.safe_dump(SMALL))
    config["available_node_types"].update(types)
    return config


def test_shipped_file_passes_ray_validation():
    with open(SHIPPED) as f:
        validate_config(prepare_config(yaml.safe_load(f)))


def test_shipped_file_security_and_trial_driver():
    config = load_cluster_config(SHIPPED)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["trial_driver"] >= 1
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("make -C ~/raydist setup" in c for c in config["setup_commands"])
    assert "security_group" not in config["provider"]


def test_check_shipped_file(capsys):
    assert main(["cluster", "check", str(SHIPPED)]) == 0
    # Head 8 CPUs + 4 slots x 16 (cpu_worker); GPUs: 2 gpu_workers x 1.
    assert capsys.readouterr().out.splitlines()[1:] == ["  CPU: 72", "  GPU: 2", "  trial_driver: 8"]


def test_check_small_config(tmp_path, capsys):
    path = write(tmp_path, "small.yaml", SMALL)
    assert main(["cluster", "check", path]) == 0
    assert capsys.readouterr().out == (f"{path}: valid; at most (each on its own, head + workers up to "
                                       "max_workers):\n  CPU: 16\n  GPU: 4\n  trial_driver: 3\n")


def test_cap_above_type_limits_adds_nothing(tmp_path, capsys):
    config = yaml.safe_load(yaml.safe_dump(SMALL)) | {"max_workers": 100}
    assert main(["cluster", "check", write(tmp_path, "big.yaml", config)]) == 0
    assert capsys.readouterr().out.splitlines()[1:3] == ["  CPU: 18", "  GPU: 4"]   # 2+12+4, 0+4


BAD = {
    "missing file": (None, "{tmp}/bad.yaml: no such file"),
    "not yaml": ("a: [1,\nb: 2\n", "{tmp}/bad.yaml: not valid YAML (line 3)"),
    "misspelled key": (edited(a={"node_config": {}, "resources": {"CPU": 1, "GPU": 0}, "min_worker": 1}),
                       "{tmp}/bad.yaml: available_node_types.a: Additional properties are not allowed "
                       "('min_worker' was unexpected)"),
    "wrong type": (yaml.safe_load(yaml.safe_dump(SMALL)) | {"idle_timeout_minutes": "five"},
                   "{tmp}/bad.yaml: idle_timeout_minutes: 'five' is not of type 'number'"),
    "min above max": (edited(a={"node_config": {}, "resources": {"CPU": 1, "GPU": 0}, "min_workers": 3,
                                "max_workers": 1}),
                      "{tmp}/bad.yaml: available_node_types.a: min_workers 3 > max_workers 1"),
    "min above cap": (edited(a={"node_config": {}, "resources": {"CPU": 1, "GPU": 0}, "min_workers": 5}),
                      "{tmp}/bad.yaml: The specified global `max_workers` is smaller than the sum of "
                      "`min_workers` of all the available node types."),
    "no resources key": (edited(b={"node_config": {}, "max_workers": 1}),
                         "{tmp}/bad.yaml: available_node_types.b: 'resources' is a required property"),
    # What Ray's own AWS example ships: counts auto-detected at launch, unknown offline.
    "empty resources": (edited(b={"node_config": {}, "resources": {}, "max_workers": 1}),
                     "{tmp}/bad.yaml: available_node_types.b: resources has no CPU or GPU; give both, "
                     "e.g. resources: {CPU: 8, GPU: 0}"),
    "no GPU count": (edited(b={"node_config": {}, "resources": {"CPU": 4}, "max_workers": 1}),
                     "{tmp}/bad.yaml: available_node_types.b: resources has no GPU; give both, "
                     "e.g. resources: {CPU: 8, GPU: 0}"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_file_is_refused(case, tmp_path, capsys):
    content, message = BAD[case]
    path = str(tmp_path / "bad.yaml") if content is None else write(tmp_path, "bad.yaml", content)
    assert main(["cluster", "check", path]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == "error: " + message.replace("{tmp}", str(tmp_path)) + "\n"
