"""CLI: `dlp train-router`, `dlp route TEXT`, `dlp bench router`.

No torch import at module import time: the commands import their modules when they run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dlp.errors import DlpError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-router",
        help="train the MiniMLP router on the task data",
        description=(
            "Train the MiniMLP router (sentence -> task) on the train split, early-stop on the "
            "validation split, report test accuracy, and save router.safetensors + router.json."
        ),
    )
    p.add_argument("--data", type=Path, default=None, help="task data dir (tasks.parquet)")
    p.add_argument("--out", type=Path, default=None, help="output dir for the router")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=5, help="maximum epochs")
    p.add_argument("--patience", type=int, default=2, help="epochs without improvement")
    p.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="tokenizer dir (default: the embedded base model's)",
    )
    p.add_argument("--cache-dir", type=Path, default=None, help="cache root for the defaults")
    p.set_defaults(func=_train_router)

    r = subparsers.add_parser(
        "route",
        help="route text to an adapter mix and print it as JSON",
        description="Run the router and the top-p rule on TEXT; print the mix as JSON.",
    )
    r.add_argument("text", nargs="+", metavar="TEXT", help="one or more request texts")
    r.add_argument("--router", type=Path, default=None, help="router dir (default: cached)")
    r.add_argument("--p", type=float, default=None, help="top-p threshold in (0, 1] (0.6)")
    r.add_argument("--max-adapters", type=int, default=None, help="cap on adapters per mix")
    r.add_argument("--weighting", choices=("softmax", "renorm"), default=None)
    r.add_argument("--cache-dir", type=Path, default=None, help="cache root for the defaults")
    r.set_defaults(func=_route)

    from dlp.bench_cli import bench_subparsers

    b = bench_subparsers(subparsers).add_parser(
        "router",
        help="router accuracy, size and CPU latency -> benchmarks/results/router.json + PNG",
        description=(
            "Evaluate the router on the test split (overall, per task, confusion matrix PNG), "
            "and measure routing latency per request at batch 1 and 32 on one CPU core."
        ),
    )
    b.add_argument(
        "--router",
        type=Path,
        default=None,
        help="router dir (default: the cached default, trained if missing)",
    )
    b.add_argument("--data", type=Path, default=None, help="task data dir (tasks.parquet)")
    b.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    b.add_argument(
        "--retrain",
        action="store_true",
        help="train a fresh default router first (measures training time now)",
    )
    b.add_argument("--latency-batches", type=int, default=200, help="timed batches per batch size")
    b.add_argument("--cache-dir", type=Path, default=None, help="cache root for the defaults")
    b.set_defaults(func=_bench_router)


def _train_router(args: argparse.Namespace) -> int:
    from dlp.paths import cache_dir, data_dir, router_dir
    from dlp.routing.train import train_router

    root = cache_dir(args.cache_dir)
    data = args.data or data_dir(root)
    out = args.out or router_dir(root)
    if args.epochs < 1:
        raise DlpError("--epochs must be >= 1")
    if args.patience < 1:
        raise DlpError("--patience must be >= 1")
    if args.tokenizer is not None and not args.tokenizer.is_dir():
        raise DlpError(f"--tokenizer {args.tokenizer} is not a directory")
    report = train_router(
        data,
        out,
        seed=args.seed,
        epochs=args.epochs,
        patience=args.patience,
        tokenizer_ref=args.tokenizer.resolve() if args.tokenizer else None,
    )
    summary = {
        "out": str(out),
        "parameters": report.parameters,
        "epochs_run": report.epochs_run,
        "best_epoch": report.best_epoch,
        "val_accuracy": round(report.val_accuracy, 5),
        "test_accuracy": None if report.test_accuracy is None else round(report.test_accuracy, 5),
        "training_time_s": report.training_time_s,
    }
    print(json.dumps(summary, indent=2))
    return 0


def _route(args: argparse.Namespace) -> int:
    from dlp.paths import cache_dir, router_dir
    from dlp.routing.router import RouterService

    directory = args.router or router_dir(cache_dir(args.cache_dir))
    service = RouterService.from_dir(directory)
    # route() validates p / max_adapters / weighting before it runs the model.
    decisions = service.route(
        args.text, p=args.p, max_adapters=args.max_adapters, weighting=args.weighting
    )
    rows = [{"text": t, **d.as_dict()} for t, d in zip(args.text, decisions, strict=True)]
    print(json.dumps(rows[0] if len(rows) == 1 else rows, indent=2))
    return 0


def _bench_router(args: argparse.Namespace) -> int:
    from dlp.routing.bench import run_router_bench

    # Rebuilt from the parsed flags (not sys.argv) so the report names the command exactly.
    command = "dlp bench router"
    for flag, value in (
        ("--router", args.router),
        ("--data", args.data),
        ("--cache-dir", args.cache_dir),
    ):
        if value is not None:
            command += f" {flag} {value}"
    if args.out != Path("benchmarks/results"):
        command += f" --out {args.out}"
    if args.latency_batches != 200:
        command += f" --latency-batches {args.latency_batches}"
    if args.retrain:
        command += " --retrain"
    result = run_router_bench(
        router=args.router,
        data=args.data,
        out_dir=args.out,
        retrain=args.retrain,
        latency_batches=args.latency_batches,
        cache_root=args.cache_dir,
        command=command,
    )
    headline = {
        k: result[k]
        for k in (
            "test_accuracy",
            "parameters",
            "latency_ms_per_request_batch1",
            "latency_ms_per_request_batch32",
            "training_time_s",
        )
    }
    print(json.dumps(headline, indent=2))
    print(f"wrote {args.out / 'router.json'} and {args.out / 'router_confusion.png'}")
    return 0
