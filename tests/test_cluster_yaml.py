"""cluster.yaml passes Ray's own launcher validation and keeps the cluster private."""

import copy
from pathlib import Path

import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def _config():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_valid_for_ray_launcher():
    from ray.autoscaler._private.util import fillout_defaults, merge_setup_commands, validate_config

    config = _config()
    # What `ray up` does, offline: fill the provider's defaults, then validate against ray-schema.json and
    # Ray's extra checks (AWS's bootstrap_config needs credentials and network: not run here).
    filled = fillout_defaults(copy.deepcopy(config))
    validate_config(filled)
    filled = merge_setup_commands(filled)
    assert filled["head_setup_commands"][: len(config["setup_commands"])] == config["setup_commands"]
    assert filled["head_node_type"] in filled["available_node_types"]
    gpu_types = [n["node_config"]["InstanceType"] for k, n in filled["available_node_types"].items() if k != "head"]
    assert {"g5.xlarge", "g5.12xlarge", "p4d.24xlarge"} <= set(gpu_types)


def test_private_by_construction():
    config = _config()
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token ray start" in cmd
    ingress = config["provider"]["security_group"]["IpPermissions"]
    assert [(p["FromPort"], p["ToPort"]) for p in ingress] == [(22, 22)]
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "docker" not in config  # with Docker the token would also need run_options -v/-e
