"""cluster.yaml (AWS) and cluster-onprem.yaml (local provider) against the Ray autoscaler's own schema."""

import json
import os

import pytest
import yaml

REPO = os.path.join(os.path.dirname(__file__), "..")


@pytest.fixture(scope="module")
def schema():
    import ray

    with open(os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")) as f:
        return json.load(f)


def load(name):
    with open(os.path.join(REPO, name)) as f:
        return yaml.safe_load(f), open(os.path.join(REPO, name)).read()


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-onprem.yaml"])
def test_cluster_configs_validate_against_the_ray_autoscaler_schema(schema, name):
    import jsonschema

    cluster, text = load(name)
    jsonschema.validate(cluster, schema)
    assert any("pip install" in c and "-e /home/" in c for c in cluster["setup_commands"])
    assert list(cluster["file_mounts"].values()) == ["."]
    for command in (f"ray up {name}", "ray job submit", "--working-dir .", f"ray down {name}"):
        assert command in text, command
    assert any("--dashboard-host=127.0.0.1" in c for c in cluster["head_start_ray_commands"])


def test_aws_cluster_has_a_cpu_head_and_autoscaled_gpu_workers():
    cluster, _ = load("cluster.yaml")
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]["node_config"]["InstanceType"]
    assert head.startswith(("m", "c", "r"))  # a CPU instance family
    workers = [t for name, t in types.items() if name != cluster["head_node_type"]]
    assert workers and all(0 <= t["min_workers"] <= t["max_workers"] for t in workers)
    assert all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)  # GPU families


def test_onprem_cluster_uses_the_local_provider():
    cluster, _ = load("cluster-onprem.yaml")
    assert cluster["provider"]["type"] == "local" and cluster["provider"]["worker_ips"]
