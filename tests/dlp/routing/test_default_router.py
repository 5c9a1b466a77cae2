"""The embedded default router on the real 26-task test split (needs `dlp setup` first)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dlp.data.dataset import load_tasks
from dlp.paths import cache_dir, data_dir, router_dir
from dlp.routing.bench import measure_latency
from dlp.routing.router import CONFIG_FILE, MiniMLPRouter, RouterService

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_router() -> MiniMLPRouter:
    path = router_dir(cache_dir())
    if (
        not (path / CONFIG_FILE).is_file()
        or not (data_dir(cache_dir()) / "tasks.parquet").is_file()
    ):
        pytest.skip("default router or task data not built (run `dlp setup`)")
    return MiniMLPRouter.load(path)


def test_default_router_accuracy_on_test_split(default_router: MiniMLPRouter) -> None:
    table = load_tasks(data_dir(cache_dir()), split="test")
    texts = table.column("input").to_pylist()
    truth = table.column("task").to_pylist()
    assert len(default_router.labels) == 26 and set(truth) == set(default_router.labels)
    pred = default_router.predict_proba(texts).argmax(1)
    accuracy = float(
        np.mean([default_router.labels[p] == t for p, t in zip(pred, truth, strict=True)])
    )
    assert accuracy >= 0.985, f"test accuracy {accuracy:.4f} < 0.985"


def test_default_router_size_and_metadata(default_router: MiniMLPRouter) -> None:
    assert 4_500_000 <= default_router.num_parameters() <= 5_500_000
    meta = json.loads((router_dir(cache_dir()) / CONFIG_FILE).read_text())
    assert meta["parameters"] == default_router.num_parameters()
    assert meta["config"]["vocab_size"] == 49152
    assert meta["metadata"]["seed"] == 0 and meta["metadata"]["best_epoch"] >= 1


def test_default_router_latency_batch32(default_router: MiniMLPRouter) -> None:
    texts = load_tasks(data_dir(cache_dir()), split="validation").column("input").to_pylist()
    latency = measure_latency(RouterService(default_router), texts, batches=30, sizes=(32,))
    # The target is < 1 ms per request on one core; CI shares its cores, so allow 2x.
    assert latency["batch32"]["median_ms_per_request"] < 2.0, latency
