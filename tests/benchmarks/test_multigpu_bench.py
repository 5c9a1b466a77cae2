"""The two-GPU benchmark (issue 9) end to end, as its CPU smoke run: one Ray cluster that
advertises 2 (fake) GPUs, the app from serve_config.yaml with the GPU override's placement
(worker num_gpus 1) and the engines on the CPU (embedded model, random adapters, untrained
router). Checks what the GPU run reports: one GPU per worker, adapter-aware routing loading
fewer adapters per request than round-robin on the same Zipf workload, both workers serving
the throughput load, and the worker deployment autoscaling 1 -> 2 -> 1. About 4 minutes on
2 cores; the GPU numbers come from the device run (benchmarks/README.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smoke_run_places_routes_scales(tmp_path: Path) -> None:
    out = tmp_path / "multigpu.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "multigpu_bench.py"),
            "--smoke",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rep = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 10_000

    # 1. one worker per GPU, both times the workers started
    for key in ("placement", "placement_after_redeploy"):
        place = rep[key]
        assert place["one_gpu_each"] and place["distinct_gpus"], place
        assert len(place["replicas"]) == 2

    # 2. the same Zipf requests under both routers, every one answered
    routing = rep["routing"]
    for name, res in routing["results"].items():
        assert res["ok"] == res["requests"] == routing["workload"]["requests"], name
        assert sum(res["requests_per_replica"]) == res["requests"]
        assert res["adapter_loads"] > 0
    rr = routing["results"]["round_robin"]["requests_per_replica"]
    assert abs(rr[0] - rr[1]) <= 2, rr  # turns: an even split
    lpr = routing["loads_per_request"]
    assert lpr["adapter_affinity"] < lpr["round_robin"], lpr

    # 3. throughput phases: no errors, both workers served the 2-worker phase
    tp = rep["throughput"]["by_workers"]
    assert tp["2"]["workers"] == 2 and tp["1"]["workers"] == 1
    for phase in tp.values():
        assert phase["errors"] == 0 and phase["completion_tokens"] > 0
    assert all(r["requests"] > 0 for r in tp["2"]["per_replica"].values())
    assert rep["throughput"]["ratio_2_to_1"] > 0

    # 4. autoscaling 1 -> 2 -> 1 under load, every request answered
    auto = rep["autoscaling"]
    assert all(auto["checks"].values()), auto["checks"]
    ev = auto["events"]
    assert ev["second_replica_running_t"] < auto["load"]["ended_t"] < ev["back_to_one_t"]
    assert auto["autoscaling_config"]["max_replicas"] == 2
