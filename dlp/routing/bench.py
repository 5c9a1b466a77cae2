"""Router benchmark: test accuracy (overall, per task, confusion), size, CPU routing latency.

Latency is measured the way a CPU ingress replica would pay it: ``RouterService.route`` end
to end (tokenise, hash n-grams, forward, softmax, top-p), on one CPU core (process pinned to
one core and ``torch.set_num_threads(1)``), median over many batches, divided by batch size.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlp.errors import DlpError
from dlp.paths import cache_dir, data_dir
from dlp.routing.router import MiniMLPRouter, RouterService
from dlp.routing.select import select_top_p_batch
from dlp.routing.train import _encode_all, ensure_default_router, evaluate, load_splits


def run_router_bench(
    *,
    router: Path | None = None,
    data: Path | None = None,
    out_dir: Path = Path("benchmarks/results"),
    retrain: bool = False,
    latency_batches: int = 200,
    cache_root: Path | None = None,
    command: str = "dlp bench router",
) -> dict[str, Any]:
    root = cache_dir(cache_root)
    if router is None:
        router = ensure_default_router(root, force=retrain)
    model = MiniMLPRouter.load(router)
    data = data or Path(model.metadata.get("data_dir") or data_dir(root))
    splits = load_splits(data)
    if "test" not in splits:
        raise DlpError(f"task data in {data} has no 'test' split")
    test = splits["test"]
    index = {label: i for i, label in enumerate(model.labels)}
    pairs = [(x, index[t]) for x, t in zip(test.texts, test.labels, strict=True) if t in index]
    texts = [x for x, _ in pairs]
    targets = np.array([y for _, y in pairs], dtype=np.int64)

    result = evaluate(model, _encode_all(model, texts), targets)
    selection = _selection_stats(model, texts, targets)
    latency = measure_latency(RouterService(model), texts, batches=latency_batches)

    confusions = [
        {"true": model.labels[i], "predicted": model.labels[j], "count": int(c)}
        for i, row in enumerate(result.confusion)
        for j, c in enumerate(row)
        if i != j and c > 0
    ]
    confusions.sort(key=lambda e: -e["count"])
    report: dict[str, Any] = {
        "command": command,
        "machine": machine_description(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "test_accuracy": round(result.accuracy, 6),
        "per_task_accuracy": {k: round(v, 6) for k, v in result.per_task_accuracy.items()},
        "parameters": model.num_parameters(),
        "training_time_s": model.metadata.get("training_time_s"),
        "latency_ms_per_request_batch1": latency["batch1"]["median_ms_per_request"],
        "latency_ms_per_request_batch32": latency["batch32"]["median_ms_per_request"],
        "target_test_accuracy": 0.985,
        "paper_test_accuracy": 0.9845,
        "n_test": result.n,
        "errors": int(result.n - round(result.accuracy * result.n)),
        "confusions": confusions,
        "labels": model.labels,
        "confusion_matrix": result.confusion,
        "latency": latency,
        "selection_p0.6": selection,
        "router_dir": str(router),
        "data_dir": str(data),
        "router_config": json.loads((Path(router) / "router.json").read_text())["config"],
        "training": {
            k: model.metadata.get(k)
            for k in ("seed", "best_epoch", "epochs_run", "val_accuracy", "settings")
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "router.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_confusion(
        result.confusion, model.labels, result.accuracy, out_dir / "router_confusion.png"
    )
    return report


def _selection_stats(model: MiniMLPRouter, texts: list[str], targets: np.ndarray) -> dict:
    """How the top-p rule (p = 0.6) behaves on the test split, for both weightings."""
    probs = model.predict_proba(texts)
    out: dict[str, Any] = {}
    for weighting in ("softmax", "renorm"):
        mixes = select_top_p_batch(probs, model.labels, p=0.6, weighting=weighting)
        sizes = np.array([len(m) for m in mixes])
        true_weight = np.array(
            [m.as_dict().get(model.labels[t], 0.0) for m, t in zip(mixes, targets, strict=True)]
        )
        out[weighting] = {
            "mean_adapters": round(float(sizes.mean()), 4),
            "max_adapters": int(sizes.max()),
            "fraction_single_adapter": round(float((sizes == 1).mean()), 4),
            "fraction_mix_contains_true_task": round(float((true_weight > 0).mean()), 6),
            "mean_weight_on_true_task": round(float(true_weight.mean()), 6),
        }
    return out


@contextmanager
def one_cpu_core() -> Iterator[None]:
    """Pin this process to one core and one torch thread; restore both afterwards."""
    threads = torch.get_num_threads()
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        torch.set_num_threads(1)
        if affinity:
            os.sched_setaffinity(0, {min(affinity)})
        yield
    finally:
        torch.set_num_threads(threads)
        if affinity:
            os.sched_setaffinity(0, affinity)


def measure_latency(
    service: RouterService, texts: list[str], batches: int = 200, sizes: tuple[int, ...] = (1, 32)
) -> dict[str, dict[str, float]]:
    """Per-request routing latency (ms) at each batch size, on one CPU core."""
    if not texts:
        raise DlpError("latency needs at least one text")
    rng = np.random.default_rng(0)
    out: dict[str, dict[str, float]] = {}
    with one_cpu_core():
        for size in sizes:
            picks = [rng.choice(len(texts), size=size) for _ in range(batches + 10)]
            timings = []
            for i, pick in enumerate(picks):
                batch = [texts[j] for j in pick]
                start = time.perf_counter()
                service.route(batch)
                elapsed = time.perf_counter() - start
                if i >= 10:  # the first batches warm caches and allocators
                    timings.append(elapsed * 1000.0 / size)
            arr = np.array(timings)
            out[f"batch{size}"] = {
                "median_ms_per_request": round(float(np.median(arr)), 4),
                "p90_ms_per_request": round(float(np.percentile(arr, 90)), 4),
                "mean_ms_per_request": round(float(arr.mean()), 4),
                "batches": batches,
            }
    out["setting"] = {"threads": 1, "cores": 1, "includes": "tokenize+features+mlp+top-p"}
    return out


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    system = f"{platform.system()} {platform.machine()}"
    return f"{system}, {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def plot_confusion(
    confusion: list[list[int]], labels: list[str], accuracy: float, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(confusion, dtype=np.float64)
    rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(12, 10.5))
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("predicted task")
    ax.set_ylabel("true task")
    ax.set_title(f"MiniMLP router, test split: top-1 accuracy {accuracy:.2%} (row-normalised)")
    for i, j in zip(*np.nonzero(counts), strict=True):
        if i != j:  # annotate the errors with their counts; the diagonal is the colour
            ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=6, color="red")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
