"""The `dlp bench` command group, shared by every module that adds a benchmark.

Several modules add `dlp bench <name>` subcommands (load, fusion, router, ...). argparse
refuses a second `add_parser("bench")`, so each of them asks `bench_subparsers(subparsers)`
for the group's sub-subparsers; the first caller creates the group, later callers reuse it.
Modules register in any order, so nothing here depends on who comes first.
"""

from __future__ import annotations

import argparse

BENCH_COMMAND = "bench"


def bench_subparsers(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Return the `dlp bench` group's subparsers, creating the group on first use."""
    existing = subparsers.choices.get(BENCH_COMMAND)
    if existing is not None:
        for action in existing._actions:
            if isinstance(action, argparse._SubParsersAction):
                return action
        raise RuntimeError("a `bench` command exists without subcommands; use bench_subparsers")
    parser = subparsers.add_parser(
        BENCH_COMMAND,
        help="benchmarks (each writes JSON + PNG under benchmarks/results/)",
        description="Benchmarks. Each subcommand writes a JSON report and a PNG next to it.",
    )
    group = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK")

    def _help(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=_help)
    return group


def register(subparsers: argparse._SubParsersAction) -> None:
    """Only creates the group; the benchmarks themselves register from their own modules."""
    bench_subparsers(subparsers)
