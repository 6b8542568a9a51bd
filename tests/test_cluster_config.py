"""cluster.yaml and cluster-local.yaml validate against Ray's own cluster-config schema."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = Path(__import__("ray.autoscaler", fromlist=["x"]).__file__).parent / "ray-schema.json"


def validate(config: dict) -> None:
    """What `ray up` does first: fill in the provider's defaults, then check against ray-schema.json."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(config, json.loads(SCHEMA.read_text()))  # the file as written, before defaults
    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_cluster_configs_validate(name):
    config = yaml.safe_load((ROOT / name).read_text())
    validate(config)
    for command in config["head_start_ray_commands"]:
        if "ray start --head" in command:
            assert "--dashboard-host=127.0.0.1" in command  # the dashboard stays on the head node


def test_the_schema_check_is_real():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_wokers"] = 1  # misspelt key
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)
    broken = copy.deepcopy(config)
    broken["max_workers"] = "four"
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)
