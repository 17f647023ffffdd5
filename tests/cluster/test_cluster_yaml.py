"""The cluster files (AWS, GCP, on-premises) as Ray's own `ray up` reads them: prepared (defaults,
docker and node types filled in) and validated against the autoscaler's schema."""

import copy
import os

import pytest
import yaml
from repo_paths import REPO

CLUSTER_FILES = ["cluster.yaml", "cluster-gcp.yaml", "cluster-onprem.yaml"]
CLOUD_FILES = ["cluster.yaml", "cluster-gcp.yaml"]


def load(name):
    with open(os.path.join(REPO, name)) as f:
        text = f.read()
    return yaml.safe_load(text), text


def all_setup_commands(cluster):
    return [
        *cluster.get("setup_commands", []),
        *cluster.get("head_setup_commands", []),
        *cluster.get("worker_setup_commands", []),
    ]


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_files_pass_rays_prepare_and_validate(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cluster, text = load(name)
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert any("pip install" in c and "-e /home/" in c for c in all_setup_commands(cluster))
    assert list(cluster["file_mounts"].values()) == ["."]
    for command in (f"ray up {name}", "ray job submit", "--working-dir .", f"ray down {name}"):
        assert command in text, command
    assert any("--dashboard-host=127.0.0.1" in c for c in cluster["head_start_ray_commands"])
    assert "FORGETRAY_STAGING" not in text  # the run directory (a bucket) is all nodes share


@pytest.mark.parametrize("name", CLOUD_FILES)
def test_cloud_clusters_run_python_311_images_with_cuda_torch_on_gpu_workers(name):
    cluster, _ = load(name)
    docker = cluster["docker"]
    # Ray's own images: Python 3.11 (forgetray needs >= 3.11), the Ray version forgetray pins.
    assert docker["worker_image"] == "rayproject/ray:2.60.0-py311-gpu"
    assert docker["head_image"].startswith("rayproject/ray:2.60.0-py311")
    assert cluster["setup_commands"] == []
    head, workers = cluster["head_setup_commands"], cluster["worker_setup_commands"]
    # torch before forgetray (else pip picks one); PyPI's Linux wheel on GPU workers is the CUDA
    # build, the head gets the CPU wheel.
    assert workers[0].endswith("pip install --quiet torch==2.13.0")
    assert any("torch.cuda.is_available()" in c for c in workers)
    assert "download.pytorch.org/whl/cpu" in head[0] and "torch==2.13.0" in head[0]
    assert head[-1].endswith("-e /home/ray/forgetray") and workers[-1].endswith("-e /home/ray/forgetray")
    assert "/home/ray/forgetray" in cluster["file_mounts"]


def test_aws_cluster_has_a_cpu_head_and_gpu_workers_from_zero_with_bucket_access():
    cluster, text = load("cluster.yaml")
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]["node_config"]
    assert head["InstanceType"].startswith(("m", "c", "r"))  # a CPU instance family
    workers = [t for name, t in types.items() if name != cluster["head_node_type"]]
    assert workers and all(t["min_workers"] == 0 < t["max_workers"] for t in workers)
    assert all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)  # GPU families
    for node in [head, *(t["node_config"] for t in workers)]:
        assert node["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    assert "--out s3://" in text


def test_gcp_cluster_has_a_cpu_head_and_gpu_workers_from_zero_with_bucket_access():
    cluster, text = load("cluster-gcp.yaml")
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and "guestAccelerators" not in head["node_config"]
    workers = [t for name, t in types.items() if name != cluster["head_node_type"]]
    assert workers and all(t["min_workers"] == 0 < t["max_workers"] for t in workers)
    for worker in workers:
        config = worker["node_config"]
        assert worker["resources"]["GPU"] >= 1 and config["guestAccelerators"][0]["acceleratorCount"] >= 1
        assert config["scheduling"][0]["onHostMaintenance"] == "TERMINATE"
        account = config["serviceAccounts"][0]
        assert account["email"].endswith(".iam.gserviceaccount.com")
        assert "https://www.googleapis.com/auth/cloud-platform" in account["scopes"]
    assert cluster["provider"]["project_id"] and "--out gs://" in text


def test_onprem_cluster_uses_the_local_provider():
    cluster, _ = load("cluster-onprem.yaml")
    assert cluster["provider"]["type"] == "local" and cluster["provider"]["worker_ips"]
