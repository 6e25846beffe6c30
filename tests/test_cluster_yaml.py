"""cluster.yaml passes Ray's own launcher validation and keeps the cluster private."""

import copy
from pathlib import Path

import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def _config():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_valid_for_ray_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _config()
    # What `ray up` does before talking to the cloud (commands._bootstrap_config): prepare_config (provider
    # defaults, merged setup commands, Docker checks, per-type min/max workers), then validate_config
    # (ray-schema.json and Ray's checks of the filled config). AWS's own bootstrap needs credentials.
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert prepared[key][: len(config["setup_commands"])] == config["setup_commands"]
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and types["head"]["max_workers"] == 0
    assert all(t["min_workers"] <= t["max_workers"] <= prepared["max_workers"] for t in types.values())
    gpu_types = [n["node_config"]["InstanceType"] for k, n in types.items() if k != "head"]
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


def test_storage_through_instance_profiles_never_keys():
    text = CLUSTER_YAML.read_text()
    config = _config()
    for name, node_type in config["available_node_types"].items():
        if name != config["head_node_type"]:  # the head keeps Ray's default profile (EC2 and S3)
            assert node_type["node_config"]["IamInstanceProfile"] == {"Name": "neoray-s3"}, name
    for secret in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "aws_secret_access_key", "AKIA"):
        assert secret not in text
