"""The cluster files: launcher config against Ray's own schema, RayService layout, one image."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jsonschema
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


def _launcher() -> dict:
    return yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())


def _rayservice() -> dict:
    return yaml.safe_load((CLUSTER / "rayservice.yaml").read_text())


def _containers(rs: dict) -> list[dict]:
    spec = rs["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _image_from_dockerfile() -> str:
    """The image tag the README builds: `docker build -f cluster/Dockerfile -t <tag> .`."""
    text = (CLUSTER / "Dockerfile").read_text()
    m = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", text)
    assert m, "Dockerfile documents no build command"
    return m.group(1)


def test_launcher_config_matches_rays_schema() -> None:
    schema = json.loads(RAY_SCHEMA.read_text())
    jsonschema.validate(_launcher(), schema)


def test_launcher_config_passes_rays_own_validation() -> None:
    # prepare_config fills the provider defaults the way `ray up` does before validating.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_launcher()))


def test_schema_rejects_a_broken_launcher_config() -> None:
    # The schema check has teeth: a typo'd field or a fractional GPU count fails it.
    schema = json.loads(RAY_SCHEMA.read_text())
    cfg = _launcher()
    cfg["available_node_types"]["gpu_worker"]["max_wrokers"] = 2
    try:
        jsonschema.validate(cfg, schema)
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("misspelled field passed the schema")
    cfg = _launcher()
    cfg["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    try:
        jsonschema.validate(cfg, schema)
    except jsonschema.ValidationError:
        return
    raise AssertionError("fractional GPU passed the schema")


def test_launcher_node_types() -> None:
    cfg = _launcher()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"]["CPU"] == 0  # no replicas on the head
    gpu = types["gpu_worker"]
    assert gpu["resources"] == {"CPU": 0, "GPU": 1}
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    cpu = types["cpu_worker"]
    assert cpu["resources"]["CPU"] >= 1 and cpu["min_workers"] >= 1
    assert cfg["idle_timeout_minutes"] > 0
    assert cfg["max_workers"] >= sum(t.get("max_workers", 0) for t in types.values())
    assert cfg["provider"]["type"] == "aws"
    assert "--gpus all" in gpu["docker"]["worker_run_options"]


def test_rayservice_layout() -> None:
    rs = _rayservice()
    assert rs["apiVersion"] == "ray.io/v1" and rs["kind"] == "RayService"
    spec = rs["spec"]["rayClusterConfig"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    cpu, gpu = groups["cpu"], groups["gpu"]
    assert cpu["minReplicas"] >= 1
    for (c,) in [cpu["template"]["spec"]["containers"]]:
        assert "nvidia.com/gpu" not in c["resources"]["limits"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    (gc,) = gpu["template"]["spec"]["containers"]
    assert gc["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["rayStartParams"]["num-cpus"] == "0"
    for g in (cpu, gpu):
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_one_image_everywhere() -> None:
    image = _image_from_dockerfile()
    assert {c["image"] for c in _containers(_rayservice())} == {image}
    assert _launcher()["docker"]["image"] == image
    # the tag is the project version, so a release rebuilds the image
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert image.endswith(f":{version}")


def test_dockerfile_base_matches_installed_ray_and_python() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", text, re.M)
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert base == f"rayproject/ray:{ray.__version__}-{py}-gpu"
    assert f'"ray[serve]=={ray.__version__}"' in text  # pip keeps the image's Ray


def test_dockerfile_ships_every_package_and_file_it_uses() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    packages = re.search(r"include = \[([^\]]*)\]", pyproject).group(1)
    for pkg in re.findall(r'"(\w+)\*"', packages):
        assert f"COPY --chown=ray:users {pkg} ./{pkg}" in text, pkg
        assert f"!{pkg}/**" in ignore, pkg
    for f in ("pyproject.toml", "serve_config.yaml", "cluster/rayservice-overrides.yaml"):
        assert f in text and f"!{f}" in ignore, f
        assert (ROOT / f).exists(), f
