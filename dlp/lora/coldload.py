"""Measure the pool's cold load (host tier -> device slot) on model-shaped modules.

No model weights are needed: only the shapes of the target linear layers. ``SHAPES`` holds the
backbones the benchmarks use. Target: < 2 ms per r=8 q/v adapter on an 8B-shaped model (GPU).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from dlp.lora.adapter import random_adapter
from dlp.lora.pool import AdapterPool

# name -> (layers, hidden, q_out, kv_out)
SHAPES: dict[str, tuple[int, int, int, int]] = {
    "llama3-8b": (32, 4096, 4096, 1024),
    "qwen2-1.5b": (28, 1536, 1536, 256),
    "smollm2-135m": (30, 576, 576, 192),
}


def qv_shapes(shape: str) -> dict[str, tuple[int, int]]:
    layers, hidden, q_out, kv_out = SHAPES[shape]
    out = {}
    for layer in range(layers):
        prefix = f"model.layers.{layer}.self_attn"
        out[f"{prefix}.q_proj"] = (hidden, q_out)
        out[f"{prefix}.v_proj"] = (hidden, kv_out)
    return out


@dataclass
class ColdLoadResult:
    shape: str
    device: str
    rank: int
    adapter_bytes: int
    samples_ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    def as_dict(self) -> dict[str, object]:
        return {
            "shape": self.shape,
            "device": self.device,
            "rank": self.rank,
            "adapter_bytes": self.adapter_bytes,
            "median_ms": self.median_ms,
            "min_ms": min(self.samples_ms),
            "samples_ms": self.samples_ms,
        }


def measure_cold_load(
    shape: str = "llama3-8b",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    rank: int = 8,
    max_rank: int = 16,
    repeats: int = 20,
    n_slots: int = 2,
) -> ColdLoadResult:
    """Time ``acquire`` of an adapter that is in the host tier but not on the device.

    Each sample evicts a slot and copies one adapter in (the host copy already exists, as
    after registration), synchronising the device so the copy is really done.
    """
    shapes = qv_shapes(shape)
    device = torch.device(device)
    pool = AdapterPool(shapes, max_rank=max_rank, n_slots=n_slots, device=device, dtype=dtype)
    names = [f"cold{i}" for i in range(n_slots + 1)]
    for i, name in enumerate(names):
        pool.add(random_adapter(name, shapes, rank=rank, seed=i, dtype=dtype))
        pool.release(pool.acquire_sync([name]))  # warm the host tier (and the staging buffer)
    samples = []
    adapter_bytes = 0
    for i in range(repeats):
        name = names[i % len(names)]  # n_slots + 1 names over n_slots slots: always a miss
        _sync(device)
        start = time.perf_counter()
        lease = pool.acquire_sync([name])
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
        adapter_bytes = pool.stats()["bytes_loaded"] // max(1, pool.stats()["loads"])
        pool.release(lease)
    return ColdLoadResult(shape, str(device), rank, adapter_bytes, samples)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
