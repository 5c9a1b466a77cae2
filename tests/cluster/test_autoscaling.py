"""Autoscaling shown end to end (the CI version of cluster/autoscale_harness.py).

A private fake multi-node Ray cluster (Ray's autoscaler + fake node provider), the real app
from serve_config.yaml on the embedded default model, closed-loop HTTP load from the test
split. Serve must add a LoRA worker replica, the autoscaler must add the GPU node it needs,
the new replica must answer requests, and after the load both must go back down; nothing of
the cluster may survive the run. About 3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dlp.errors import DlpError

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "cluster"))

from autoscale_harness import PRESETS, harness_config  # noqa: E402
from fake_cluster import FakeCluster, NodeType  # noqa: E402

SAMPLE_KEYS = {
    "t",
    "phase",
    "replicas",
    "replicas_pending",
    "nodes",
    "queue",
    "in_flight",
    "p50_ms",
    "p99_ms",
    "errors_window",
    "errors_total",
    "replicas_serving",
}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_load_scales_replicas_and_nodes_up_then_down(tmp_path: Path) -> None:
    out = tmp_path / "autoscaling.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "cluster" / "autoscale_harness.py"),
            "--short",
            # Random adapters + untrained router: many distinct mixes, so the load spreads over
            # the added replicas instead of sticking to the one that holds a hot mix.
            "--assets",
            "quick",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=840,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert out.exists(), tail
    rep = json.loads(out.read_text())
    assert rep["checks"] == {
        "replicas_scaled_up": True,
        "nodes_scaled_up": True,
        "replicas_scaled_down": True,
        "nodes_scaled_down": True,
    }, tail
    assert proc.returncode == 0, tail

    tl = rep["timeline"]
    assert all(set(s) >= SAMPLE_KEYS for s in tl)
    ts = [s["t"] for s in tl]
    assert ts == sorted(ts) and len(tl) >= 20
    assert rep["app"]["import_path"] == "deployments.app:build_app"

    ev = rep["events"]
    # A replica needs a GPU node: the node comes first; on the way down the replica goes
    # first (Serve) and the node follows once idle (autoscaler).
    assert ev["first_node_added_t"] <= ev["first_replica_added_t"]
    assert ev["replicas_back_t"] <= ev["nodes_back_t"]
    load = rep["load"]
    assert load["started_t"] < ev["first_replica_added_t"] < load["ended_t"]
    # Serve saw the load above its target before it scaled (its own signal, not ours).
    target = rep["app"]["autoscaling_config"]["target_ongoing_requests"]
    assert max(s["queue"] or 0 for s in tl if s["t"] < ev["first_replica_added_t"]) > target

    # Real answers from more than one replica: the added replica served traffic.
    assert load["ok"] > 0 and load["errors"] == {}
    assert rep["replicas_served"] >= 2
    assert max(s["replicas_serving"] for s in tl) >= 2
    assert rep["mixes_served"] >= 1
    # streamed requests went through the app's SSE path and measured time to first token
    assert load["streams"] > 0 and load["ttft_ms"]["p50"] is not None

    # Nothing of the private cluster is left running.
    assert rep["processes_left"] == 0
    temp_dir = rep["cluster_temp_dir"]
    survivors = (
        [
            pid
            for pid in os.listdir("/proc")
            if pid.isdigit()
            and temp_dir in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        ]
        if Path("/proc").exists()
        else []
    )
    assert survivors == []
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_fake_cluster_config_is_a_valid_launcher_config() -> None:
    # The harness's autoscaler reads the same format as cluster/ray-cluster.yaml.
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cluster = FakeCluster({"CPU": 2}, {"gpu_worker": NodeType({"GPU": 1}, 0, 3)}, idle_timeout_s=12)
    cfg = cluster.autoscaling_config("127.0.0.1:1234")
    jsonschema.validate(cfg, schema)
    assert cfg["idle_timeout_minutes"] == pytest.approx(0.2)
    assert cfg["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1
    assert cfg["provider"]["gcs_address"] == "127.0.0.1:1234"


def test_harness_config_uses_serve_config_with_fake_gpu_placement() -> None:
    import yaml

    serve_config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    plan = PRESETS["short"]
    cfg = harness_config(serve_config, plan, 18000, "dlp", "LoraWorker")
    app = cfg["applications"][0]
    assert cfg["proxy_location"] == "HeadOnly" and cfg["http_options"]["port"] == 18000
    assert app["args"]["worker"]["num_gpus"] == 1 and app["args"]["worker"]["num_cpus"] == 0
    worker = next(d for d in app["deployments"] if d["name"] == "LoraWorker")
    original = next(
        d for d in serve_config["applications"][0]["deployments"] if d["name"] == "LoraWorker"
    )
    auto, orig = worker["autoscaling_config"], original["autoscaling_config"]
    # the target and minimum are serve_config.yaml's; only the bounds and delays are the plan's
    assert auto["target_ongoing_requests"] == orig["target_ongoing_requests"]
    assert auto["min_replicas"] == orig["min_replicas"]
    assert auto["max_replicas"] == plan.max_nodes
    assert auto["downscale_delay_s"] == plan.downscale_delay_s
    assert serve_config["applications"][0]["args"]["worker"]["num_gpus"] == 0  # not mutated
    with pytest.raises(DlpError, match="LoraWrker"):
        harness_config(serve_config, plan, 18000, "dlp", "LoraWrker")
