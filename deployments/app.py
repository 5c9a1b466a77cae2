"""The Serve application: ``deployments.app:build_app`` (the import path in serve_config.yaml).

    Ingress (FastAPI) -> Router (MiniMLP, batched, autoscaled)
                      -> LoraWorker (engine + adapter pool, adapter-aware request routing)
                      -> AdapterRegistry (catalogue name -> adapter dir)

``args`` is an ``AppConfig`` (dlp/config.py); ``$DLP_APP_ARGS`` (JSON) is merged over it,
which is how the GPU variant overrides the CPU defaults without a second config file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from deployments.ingress import Ingress
from deployments.registry import AdapterRegistry
from deployments.request_router import AdapterAffinityRouter, RoundRobinRouter
from deployments.router import RouterDeployment
from deployments.worker import LoraWorker, engine_config_dict
from dlp.config import AppConfig, load_app_config

log = logging.getLogger("ray.serve")

APP_NAME = "dlp"


def _router_dir(cfg: AppConfig) -> str:
    if cfg.router_dir:
        return str(Path(cfg.router_dir).expanduser().resolve())
    from dlp.routing.train import ensure_default_router

    return str(ensure_default_router(cfg.resolved_cache_dir()))


def _adapters_dir(cfg: AppConfig) -> str:
    if cfg.adapters_dir:
        return str(Path(cfg.adapters_dir).expanduser().resolve())
    from dlp.training.demo_adapters import ensure_demo_adapters

    return str(ensure_demo_adapters(cfg.resolved_cache_dir()))


def _worker_router_options(cfg: AppConfig) -> dict[str, Any]:
    """The worker's request router: adapter-aware, or one of the baselines it is measured
    against: Serve's own power-of-two-choices router (`default`) or plain `round_robin`."""
    if cfg.worker.request_router == "default":
        return {}
    if cfg.worker.request_router == "round_robin":
        return {"request_router_config": RequestRouterConfig(request_router_class=RoundRobinRouter)}
    return {
        "request_router_config": RequestRouterConfig(
            request_router_class=AdapterAffinityRouter,
            request_router_kwargs={
                "spill_queue_len": cfg.worker.spill_queue_len,
                "pool_slots": cfg.engine.pool_slots,
                # own sends count for a few stats periods, until the replicas' stats show them
                "memory_s": max(2.0, 3 * cfg.worker.routing_stats_period_s),
            },
            request_routing_stats_period_s=cfg.worker.routing_stats_period_s,
            request_routing_stats_timeout_s=max(5.0, cfg.worker.routing_stats_period_s),
        )
    }


def build_app(args: AppConfig | dict[str, Any] | None = None) -> Application:
    """Build the app from validated args (Serve passes the ``args`` of the config file)."""
    raw = args.model_dump(exclude_unset=True) if isinstance(args, AppConfig) else (args or {})
    cfg = load_app_config(raw)
    router_dir = _router_dir(cfg)
    adapters_dir = _adapters_dir(cfg)
    adapter_root = str(cfg.resolved_adapter_root())
    limits = cfg.limits

    registry = AdapterRegistry.options(ray_actor_options={"num_cpus": 0.01}).bind(
        adapters_dir, adapter_root
    )
    router = RouterDeployment.options(
        autoscaling_config={
            "min_replicas": cfg.router.min_replicas,
            "max_replicas": cfg.router.max_replicas,
            "target_ongoing_requests": cfg.router.target_ongoing_requests,
            "upscale_delay_s": 5,
            "downscale_delay_s": 30,
        },
        ray_actor_options={"num_cpus": cfg.router.num_cpus},
    ).bind(
        router_dir,
        cfg.router.p,
        cfg.router.weighting,
        limits.max_adapters_per_mix,
        cfg.router.max_batch_size,
        cfg.router.batch_wait_timeout_s,
    )
    worker = LoraWorker.options(
        num_replicas=cfg.worker.num_replicas,
        max_ongoing_requests=cfg.worker.max_ongoing_requests,
        max_queued_requests=limits.max_queued_requests,
        ray_actor_options={"num_cpus": cfg.worker.num_cpus, "num_gpus": cfg.worker.num_gpus},
        **_worker_router_options(cfg),
        health_check_period_s=5,
        health_check_timeout_s=60,
    ).bind(
        engine_config_dict(cfg),
        limits.model_dump(),
        router,
        registry,
        max(1, round(cfg.worker.num_cpus)),
        cfg.worker.uses_engine_process(cfg.engine.device),
    )
    return Ingress.options(
        num_replicas=cfg.ingress.num_replicas,
        max_ongoing_requests=cfg.ingress.max_ongoing_requests,
        # Backpressure is applied at the workers (limits.max_queued_requests), where the
        # ingress answers 503 + Retry-After; the proxy's own 503 (plain text, no Retry-After)
        # is kept for a flood beyond what the ingress itself takes.
        max_queued_requests=max(limits.max_queued_requests, cfg.ingress.max_ongoing_requests),
        ray_actor_options={"num_cpus": cfg.ingress.num_cpus},
    ).bind(router, worker, registry, cfg.model_dump())
