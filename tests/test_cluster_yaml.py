import json
import os

import yaml


def test_cluster_yaml_validates_against_the_ray_autoscaler_schema():
    import jsonschema
    import ray

    schema_path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    with open(schema_path) as f:
        schema = json.load(f)
    with open(os.path.join(os.path.dirname(__file__), "..", "cluster.yaml")) as f:
        cluster = yaml.safe_load(f)
    jsonschema.validate(cluster, schema)
    assert cluster["available_node_types"]["gpu_worker"]["max_workers"] >= 1
    assert any("pip install" in c and "torch==2.13.0" in c for c in cluster["setup_commands"])
