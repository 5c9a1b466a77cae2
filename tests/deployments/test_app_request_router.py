"""worker.request_router: validated at the edge, and build_app gives the LoraWorker deployment
the adapter-aware router, plain round-robin, or leaves Serve's own (the baselines of
benchmarks/affinity_bench.py and benchmarks/multigpu_bench.py).

build_app only binds deployments (nothing starts): the bound worker's deployment config is
what Serve deploys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from dlp.config import AppConfig, load_app_config


def _worker_router_config(args: dict[str, Any]) -> Any:
    from deployments.app import build_app

    ingress = build_app(args)._bound_deployment
    workers = [
        a._bound_deployment
        for a in ingress.init_args
        if getattr(getattr(a, "_bound_deployment", None), "name", None) == "LoraWorker"
    ]
    assert len(workers) == 1
    return workers[0]._deployment_config.request_router_config


def _args(tmp_path: Path, **worker: Any) -> dict[str, Any]:
    return {
        "router_dir": str(tmp_path),
        "adapters_dir": str(tmp_path),
        "adapter_root": str(tmp_path),
        "engine": {"pool_slots": 5},
        "limits": {"max_adapters_per_mix": 5},
        "worker": {"spill_queue_len": 3, "routing_stats_period_s": 0.5, **worker},
    }


def test_default_is_adapter_affinity() -> None:
    assert AppConfig().worker.request_router == "adapter_affinity"
    cfg = load_app_config({"worker": {"request_router": "default"}})
    assert cfg.worker.request_router == "default"


def test_unknown_router_is_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError) as info:
        load_app_config({"worker": {"request_router": "random"}})
    errors = info.value.errors()
    assert [e["loc"] for e in errors] == [("worker", "request_router")]


def test_build_app_uses_the_affinity_router(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("DLP_APP_ARGS", raising=False)
    rrc = _worker_router_config(_args(tmp_path))
    assert rrc.request_router_class == "deployments.request_router.AdapterAffinityRouter"
    assert rrc.request_router_kwargs == {"spill_queue_len": 3, "pool_slots": 5, "memory_s": 2.0}
    assert rrc.request_routing_stats_period_s == 0.5


def test_build_app_default_leaves_serves_router(tmp_path: Path, monkeypatch) -> None:
    from ray.serve.config import RequestRouterConfig

    monkeypatch.delenv("DLP_APP_ARGS", raising=False)
    rrc = _worker_router_config(_args(tmp_path, request_router="default"))
    # exactly what a deployment without a request_router_config gets
    assert rrc.request_router_class == RequestRouterConfig().request_router_class
    assert "AdapterAffinity" not in rrc.request_router_class
    assert rrc.request_router_kwargs == {}


def test_build_app_round_robin(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("DLP_APP_ARGS", raising=False)
    rrc = _worker_router_config(_args(tmp_path, request_router="round_robin"))
    assert rrc.request_router_class == "deployments.request_router.RoundRobinRouter"
    assert rrc.request_router_kwargs == {}
