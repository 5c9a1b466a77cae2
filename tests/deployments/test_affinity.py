"""Issue 5 item 2: a hot adapter stays on the replica that holds it (it does not load on
every replica), and spreads to the other replica once the first one is saturated.

The app has two LoRA worker replicas; each response names the replica that served it. A
replica only loads an adapter for a request it serves, so "served only by replica X" means
"loaded only on replica X".
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from servekit import ADMIN_TOKEN, Served, write_adapter

pytestmark = [pytest.mark.serve, pytest.mark.timeout(600)]


def _complete(url: str, model: str, max_tokens: int) -> dict:
    r = httpx.post(
        f"{url}/v1/completions",
        json={
            "model": model,
            "prompt": "Write a short story about a cat.",
            "max_tokens": max_tokens,
            "temperature": 0,
        },
        timeout=300,
    )
    assert r.status_code == 200, r.text
    return r.json()["dlp"]


def test_hot_adapter_sticks_then_spreads_under_load(served: Served) -> None:
    write_adapter(served.assets.root / "uploads_affinity", "hot", seed=21)
    r = httpx.post(
        f"{served.url}/v1/adapters",
        json={"name": "hot", "path": "uploads_affinity/hot"},
        headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=120,
    )
    assert r.status_code == 201, r.text
    time.sleep(2.0)  # a few routing-stats periods: the registering replica publishes "hot"

    # Sequential traffic never saturates a replica: every request goes where "hot" lives.
    sequential = [_complete(served.url, "hot", 2)["replica"] for _ in range(8)]
    assert len(set(sequential)) == 1, sequential
    home = sequential[0]

    # A burst larger than spill_queue_len (2) per replica: the other replica takes a share.
    with ThreadPoolExecutor(12) as pool:
        burst = list(pool.map(lambda _: _complete(served.url, "hot", 24)["replica"], range(12)))
    counts = {rep: burst.count(rep) for rep in set(burst)}
    assert len(counts) == 2, counts
    assert counts[home] >= 1

    httpx.delete(
        f"{served.url}/v1/adapters/hot",
        headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=60,
    )
