"""`dlp cluster render|check`: the RayService carries serve_config.yaml's applications."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from dlp.cli import main
from dlp.cluster_cli import apply_overrides, drift, embedded_config, expected_apps
from dlp.errors import DlpError

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG = ROOT / "serve_config.yaml"
MANIFEST = ROOT / "cluster" / "rayservice.yaml"
OVERRIDES = ROOT / "cluster" / "rayservice-overrides.yaml"


def _copy(tmp_path: Path) -> tuple[Path, Path, Path]:
    paths = []
    for src in (SERVE_CONFIG, MANIFEST, OVERRIDES):
        dst = tmp_path / src.name
        shutil.copy(src, dst)
        paths.append(dst)
    return paths[0], paths[1], paths[2]


def _cli(*argv: str) -> int:
    return main(["cluster", *argv])


def test_committed_manifest_is_in_sync() -> None:
    assert drift(SERVE_CONFIG, MANIFEST, OVERRIDES) == [], "run `dlp cluster render`"


def test_embedded_config_is_a_valid_serve_config_with_gpu_workers() -> None:
    embedded = embedded_config(yaml.safe_load(MANIFEST.read_text()))
    schema = ServeDeploySchema.model_validate(embedded)
    (app,) = schema.applications
    assert app.import_path == "deployments.app:build_app"
    assert app.args["worker"]["num_gpus"] == 1 and app.args["engine"]["device"] == "cuda"
    # everything else is serve_config.yaml's, untouched
    local = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]
    assert app.args["limits"] == local["args"]["limits"]
    assert [d["name"] for d in embedded["applications"][0]["deployments"]] == [
        d["name"] for d in local["deployments"]
    ]


def test_drift_is_detected_and_render_fixes_it(tmp_path: Path, capsys) -> None:
    config, manifest, overrides = _copy(tmp_path)
    args = ["--config", str(config), "--manifest", str(manifest), "--overrides", str(overrides)]
    assert _cli("check", *args) == 0
    data = yaml.safe_load(config.read_text())
    worker = next(d for d in data["applications"][0]["deployments"] if d["name"] == "LoraWorker")
    worker["autoscaling_config"]["max_replicas"] = 3
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    assert _cli("check", *args) == 1
    assert "run `dlp cluster render`" in capsys.readouterr().out
    before = manifest.read_text()
    assert _cli("render", *args) == 0
    assert _cli("check", *args) == 0
    after = manifest.read_text()
    # Only the serveConfigV2 block changed: comments and the cluster spec survive.
    assert after.replace("max_replicas: 3", "max_replicas: 8") == before
    embedded = embedded_config(yaml.safe_load(after))
    got = next(d for d in embedded["applications"][0]["deployments"] if d["name"] == "LoraWorker")
    assert got["autoscaling_config"]["max_replicas"] == 3


def test_hand_edit_of_the_manifest_is_drift(tmp_path: Path) -> None:
    config, manifest, overrides = _copy(tmp_path)
    manifest.write_text(manifest.read_text().replace("route_prefix: /", "route_prefix: /v2"))
    assert drift(config, manifest, overrides)


def test_print_gives_the_full_gpu_serve_config(capsys) -> None:
    assert (
        _cli("render", "--print", "--config", str(SERVE_CONFIG), "--overrides", str(OVERRIDES)) == 0
    )
    printed = yaml.safe_load(capsys.readouterr().out)
    ServeDeploySchema.model_validate(printed)
    local = yaml.safe_load(SERVE_CONFIG.read_text())
    assert printed["http_options"] == local["http_options"]
    assert printed["applications"][0]["args"]["worker"]["num_gpus"] == 1


def test_override_of_an_unknown_deployment_is_an_error() -> None:
    apps = expected_apps(SERVE_CONFIG, None)
    bad = {"applications": [{"name": "dlp", "deployments": [{"name": "LoraWrker"}]}]}
    with pytest.raises(DlpError, match="LoraWrker"):
        apply_overrides(apps, bad)


def test_bad_inputs_name_the_field(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("http_options: {port: 8000}\n")
    assert _cli("check", "--config", str(cfg), "--manifest", str(MANIFEST)) == 2
    assert "applications" in capsys.readouterr().err
    manifest = tmp_path / "rs.yaml"
    manifest.write_text("apiVersion: ray.io/v1\nkind: RayService\nspec: {}\n")
    assert _cli("render", "--manifest", str(manifest), "--config", str(SERVE_CONFIG)) == 2
    assert "serveConfigV2" in capsys.readouterr().err


def _deployment(name: str) -> dict:
    app = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]
    return next(d for d in app["deployments"] if d["name"] == name)


def test_router_autoscaling_agrees_with_app_args() -> None:
    # serve_config's deployments section overrides what app.py builds from args.router;
    # the two must say the same thing or one of them silently lies.
    args = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["args"]["router"]
    auto = _deployment("Router")["autoscaling_config"]
    for key in ("min_replicas", "max_replicas", "target_ongoing_requests"):
        assert auto[key] == args[key], key


def test_worker_autoscaling_fits_the_gpu_node_groups() -> None:
    auto = _deployment("LoraWorker")["autoscaling_config"]
    rs = yaml.safe_load(MANIFEST.read_text())["spec"]["rayClusterConfig"]
    gpu_group = next(g for g in rs["workerGroupSpecs"] if g["groupName"] == "gpu")
    launcher = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    gpu_type = launcher["available_node_types"]["gpu_worker"]
    # one worker per GPU node: more replicas than nodes would wait forever
    assert auto["max_replicas"] == gpu_group["maxReplicas"] == gpu_type["max_workers"]
    assert auto["min_replicas"] >= 1
    assert auto["upscale_delay_s"] < auto["downscale_delay_s"]
