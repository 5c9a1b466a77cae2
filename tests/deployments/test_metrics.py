"""Issue 5 item 6: the app's metrics reach Ray's Prometheus endpoint."""

from __future__ import annotations

import time

import httpx
import pytest
from servekit import Served

pytestmark = [pytest.mark.serve, pytest.mark.timeout(300)]

EXPECTED = (
    "ray_dlp_requests_total",
    "ray_dlp_completion_tokens_total",
    "ray_dlp_adapters_per_request",
    "ray_dlp_router_batch_latency_ms",
    "ray_dlp_router_batch_size",
    "ray_dlp_worker_batch_size",
    "ray_dlp_worker_mixes_per_batch",
    "ray_dlp_pool_events",
)


def test_metrics_are_exported(served: Served) -> None:
    import ray

    node = ray._private.worker.global_worker.node
    url = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    for _ in range(3):
        r = httpx.post(
            f"{served.url}/v1/completions",
            json={"model": "dlp", "prompt": "Metrics please", "max_tokens": 8},
            timeout=120,
        )
        assert r.status_code == 200
    deadline = time.monotonic() + 120
    missing: list[str] = list(EXPECTED)
    while missing and time.monotonic() < deadline:
        try:
            text = httpx.get(url, timeout=10).text
        except httpx.HTTPError:
            text = ""
        missing = [m for m in EXPECTED if m not in text]
        if missing:
            time.sleep(3)
    assert not missing, f"not exported after 120s: {missing}"
    assert 'event="loads"' in text
