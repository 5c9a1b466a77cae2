"""The demo's adapters: install the trained set shipped in the repo, or train small ones.

``dlp setup`` calls :func:`ensure_demo_adapters`. When ``dlp/assets/adapters`` holds the
trained adapters (made by ``dlp train-adapters`` on the GPU machine; see its manifest for the
recipe and command), they are checked against their sha256 and copied into the cache. Only
when no shipped set exists does it train a few small adapters on the CPU, and it says so.
A second call finds the installed set and returns at once.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from dlp.paths import adapters_dir, cache_dir, data_dir, ensure_writable_dir
from dlp.training.adapters import ADAPTER_FILES, LoraRecipe, TrainPlan, train_all
from dlp.training.package import copy_set, read_manifest, write_set

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "assets" / "adapters"
# Fallback set: tasks with short inputs (fast on the CPU), MCQ and generative both.
DEMO_TASKS = (
    "object_counting",
    "sports_understanding",
    "strategyqa",
    "unit_conversion",
    "winowhy",
    "word_sorting",
)
DEMO_RECIPE = LoraRecipe(
    lr=2e-3, batch_size=4, steps=12, max_input_tokens=128, max_answer_tokens=32, dropout=0.0
)


def _complete(directory: Path, manifest: dict) -> bool:
    """Cheap check for the fast path: every listed file is there with a plausible size."""
    return all(
        (directory / name / f).is_file() and (directory / name / f).stat().st_size > 0
        for name in manifest["adapters"]
        for f in ADAPTER_FILES
    )


def ensure_demo_adapters(cache_root: Path | None = None, shipped: Path = SHIPPED_DIR) -> Path:
    """Return the cache's adapter dir, filled with the shipped set or with small CPU ones."""
    root = ensure_writable_dir(cache_root or cache_dir())
    dest = adapters_dir(root)
    installed = read_manifest(dest)
    packaged = read_manifest(shipped)
    if packaged is not None:
        if installed == packaged and _complete(dest, installed):
            return dest
        copy_set(shipped, dest)
        print(
            f"adapters: installed {len(packaged['adapters'])} trained adapters "
            f"(sha256 verified) from {shipped}",
            file=sys.stderr,
        )
        return dest
    if installed is not None and _complete(dest, installed):
        return dest
    train_demo_adapters(root, dest)
    return dest


def train_demo_adapters(root: Path, dest: Path, tasks=DEMO_TASKS, recipe=DEMO_RECIPE) -> None:
    """Small adapters on the CPU (a few dozen examples each): enough for the demo to route to
    real adapters, not a quality result."""
    from dlp.base_model import load_base_model
    from dlp.training.examples import examples_from_table, load_table

    print(
        f"adapters: no trained adapters are shipped; training {len(tasks)} small demo adapters "
        f"on the CPU ({recipe.steps} steps each, about a minute or two)",
        file=sys.stderr,
    )
    started = time.monotonic()
    model, tokenizer = load_base_model(_model_dir(root))
    for p in model.parameters():
        p.requires_grad_(False)
    table = load_table(data_dir(root))
    train = examples_from_table(table, "train", list(tasks))
    plan = TrainPlan(
        task=recipe, composite=None, epochs=1.0, min_steps=recipe.steps, max_steps=recipe.steps
    )
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        report = train_all(
            model,
            tokenizer,
            train,
            list(tasks),
            Path(tmp),
            plan,
            command="dlp setup (CPU fallback: ensure_demo_adapters)",
        )
        write_set(
            Path(tmp),
            dest,
            list(tasks),
            {
                "kind": "demo-cpu",
                "command": report["command"],
                "recipe": report["plan"],
                "note": "small CPU-trained fallback; the trained set replaces it when shipped",
            },
        )
    print(
        f"adapters: demo adapters written to {dest} ({time.monotonic() - started:.0f}s)",
        file=sys.stderr,
    )


def _model_dir(root: Path) -> Path:
    from dlp.base_model import ensure_base_model

    return ensure_base_model(root)
