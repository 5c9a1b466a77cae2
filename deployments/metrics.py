"""Application metrics (ray.serve.metrics -> Prometheus on each node's metrics port).

One object per deployment kind, created in the replica constructor. Serve adds the
deployment / replica / application tags itself.
"""

from __future__ import annotations

from collections.abc import Mapping

from ray.serve.metrics import Counter, Gauge, Histogram

_LATENCY_MS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000]
_SMALL_COUNTS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128]


class IngressMetrics:
    def __init__(self) -> None:
        self.requests = Counter(
            "dlp_requests_total",
            description="requests answered by the ingress, by endpoint and status",
            tag_keys=("endpoint", "status"),
        )
        self.prompt_tokens = Counter("dlp_prompt_tokens_total", description="prompt tokens")
        self.completion_tokens = Counter(
            "dlp_completion_tokens_total", description="generated tokens"
        )
        self.adapters_per_request = Histogram(
            "dlp_adapters_per_request",
            description="adapters in the mix each request used",
            boundaries=[0.5, 1.5, 2.5, 3.5, 4.5, 6.5, 8.5, 16.5],
        )
        self.mix_source = Counter(
            "dlp_mix_source_total",
            description="how the mix was chosen (routed, explicit, model)",
            tag_keys=("source",),
        )

    def finished(self, endpoint: str, status: int) -> None:
        self.requests.inc(tags={"endpoint": endpoint, "status": str(status)})

    def generated(self, prompt_tokens: int, completion_tokens: int, n_adapters: int) -> None:
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
        if completion_tokens:
            self.completion_tokens.inc(completion_tokens)
        self.adapters_per_request.observe(n_adapters)


class RouterMetrics:
    def __init__(self) -> None:
        self.latency_ms = Histogram(
            "dlp_router_batch_latency_ms",
            description="router forward + top-p selection time per batch",
            boundaries=_LATENCY_MS,
        )
        self.batch_size = Histogram(
            "dlp_router_batch_size", description="texts per router batch", boundaries=_SMALL_COUNTS
        )


class WorkerMetrics:
    def __init__(self) -> None:
        self.batch_size = Histogram(
            "dlp_worker_batch_size",
            description="rows in one engine step",
            boundaries=_SMALL_COUNTS,
        )
        self.mixes_per_batch = Histogram(
            "dlp_worker_mixes_per_batch",
            description="distinct adapter mixes in one engine step",
            boundaries=_SMALL_COUNTS,
        )
        self.pool = Gauge(
            "dlp_pool_events",
            description="adapter pool counters since replica start (hits, loads, evictions)",
            tag_keys=("event",),
        )
        self.pool_resident = Gauge(
            "dlp_pool_resident_adapters", description="adapters resident on the device"
        )
        self.requests = Counter(
            "dlp_worker_requests_total",
            description="generations finished by this replica, by finish reason",
            tag_keys=("finish_reason",),
        )

    def step(self, rows: int, mixes: int) -> None:
        self.batch_size.observe(rows)
        self.mixes_per_batch.observe(mixes)

    def pool_stats(self, stats: Mapping[str, float], resident: int) -> None:
        for event in ("hits", "loads", "evictions"):
            if event in stats:
                self.pool.set(float(stats[event]), tags={"event": event})
        self.pool_resident.set(resident)
