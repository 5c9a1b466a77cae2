"""Helpers for the Serve tests: assets (adapters, router), app args, waits.

The app runs the embedded default model with small random adapters (written here in the
PEFT format) and a router saved untrained (its decisions are still deterministic, and the
tests compare them against the same router run in-process). Two LoRA worker replicas with
fractional CPUs, so adapter-aware routing is exercised by every test.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ADMIN_TOKEN = "test-admin-token-0123456789"
os.environ["DLP_ADMIN_TOKEN"] = ADMIN_TOKEN
# Quieter, faster Serve for tests (the same process also hosts the driver).
os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")

ADAPTERS = ("alpha", "beta", "gamma")
APP_NAME = "dlp"


def base_model_dir() -> Path:
    from dlp.base_model import ensure_base_model

    return ensure_base_model()


def meta_base_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """Linear-layer shapes of the base model without loading its weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dlp.lora.adapter import base_linear_shapes

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return base_linear_shapes(model)


def write_adapter(root: Path, name: str, seed: int, rank: int = 8, **kw: Any) -> Path:
    from dlp.lora.adapter import random_adapter, save_adapter

    shapes = meta_base_shapes(base_model_dir())
    adapter = random_adapter(name, shapes, rank=rank, seed=seed, b_std=0.05, **kw)
    return save_adapter(adapter, root / name, base_model_name="SmolLM2-135M-Instruct")


def write_router(out: Path, labels: tuple[str, ...]) -> Path:
    import torch

    from dlp.routing.router import MiniMLPRouter, RouterConfig, load_tokenizer

    tokenizer = load_tokenizer(base_model_dir())
    torch.manual_seed(0)
    config = RouterConfig(vocab_size=len(tokenizer), embed_dim=16, hash_buckets=256, hidden=(32,))
    router = MiniMLPRouter(list(labels), tokenizer, config, tokenizer_ref=str(base_model_dir()))
    return router.save(out)


@dataclass
class Assets:
    root: Path  # adapter root (registrations must point under it)
    adapters_dir: Path  # initial catalogue
    router_dir: Path
    cache_dir: Path


def app_args(assets: Assets) -> dict[str, Any]:
    return {
        "adapter_root": str(assets.root),
        "adapters_dir": str(assets.adapters_dir),
        "router_dir": str(assets.router_dir),
        "limits": {
            "max_context_tokens": 256,
            "max_tokens_cap": 64,
            "default_max_tokens": 8,
            "max_body_bytes": 64_000,
            "max_adapters_per_mix": 3,
            "max_adapter_rank": 16,
            "max_stop_strings": 2,
            "max_queued_requests": 64,
        },
        "engine": {"max_batch": 4, "pool_slots": 4},
        "worker": {
            "num_replicas": 2,
            "num_cpus": 0.1,
            "max_ongoing_requests": 8,
            "spill_queue_len": 2,
            "routing_stats_period_s": 0.5,
        },
        "router": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.1},
        "ingress": {"num_cpus": 0.1, "request_timeout_s": 120},
    }


@dataclass
class Served:
    url: str
    assets: Assets


def wait_healthy(url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/healthz", timeout=5)
            if r.status_code == 200:
                # A first generation proves the workers are up, not only the ingress.
                g = httpx.post(
                    f"{url}/v1/completions",
                    json={"model": "alpha", "prompt": "Hi", "max_tokens": 1},
                    timeout=120,
                )
                if g.status_code == 200:
                    return
                if g.status_code not in (404, 503):  # not a start-up state: fail now
                    raise RuntimeError(f"app unhealthy: {g.status_code} {g.text}")
                last = g.text
            else:
                last = r.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(1)
    raise TimeoutError(f"app at {url} not healthy after {timeout_s}s: {last}")
