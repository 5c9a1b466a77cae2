"""The `dlp` console script. Each command group lives in its own module and registers itself.

A module in COMMAND_MODULES exposes ``register(subparsers)``; it must not import torch at
module import time so that ``dlp --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from typing import Any

from dlp.errors import DlpError

COMMAND_MODULES = (
    "dlp.setup_cli",
    "dlp.data.cli",
    "dlp.routing.cli",
    "dlp.engine.cli",
    "dlp.training.cli",
    "dlp.eval.cli",
    "dlp.bench_cli",
    "dlp.serve_cli",
    "dlp.cluster_cli",
    "dlp.demo_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlp", description="DLP-LoRA serving: routed, weighted multi-LoRA fusion."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # command group not written yet
                continue
            raise
        module.register(subparsers)
    return parser


def positive_int(text: str) -> int:
    """argparse type for counts: a clear usage error instead of a traceback for 0 or less."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def run_group(register: Callable[[Any], None], argv: list[str] | None = None) -> int:
    """Run one command group on its own, without importing the others (used on machines that
    lack some of their packages, e.g. the GPU machine without Ray or pydantic)."""
    parser = argparse.ArgumentParser(prog="dlp")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DlpError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except DlpError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
