"""`dlp data prepare | stats | tasks`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dlp.data.tasks import POOL


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser(
        "data",
        help="prepare and inspect the BIG-bench task data",
        description="Task data: BIG-bench task files from the PyPI sdist bigbench==1.0.0, "
        "as Parquet with deterministic train/validation/test splits.",
    )
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(func=lambda _args: (data.print_help(), 2)[1])

    prep = sub.add_parser(
        "prepare",
        help="download the sdist (via pip) and write tasks.parquet",
        description="Download bigbench==1.0.0 with `pip download --no-deps --no-binary "
        ":all:` into the cache (never installed), extract the pool's task.json "
        "files, strip task boilerplate from inputs, split and write "
        "OUT/tasks.parquet. Reuses an identical earlier result.",
    )
    prep.add_argument(
        "--out", type=Path, default=None, help="output dir (default: <cache>/data/bigbench26)"
    )
    prep.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache root (overrides $DLP_CACHE_DIR and ~/.cache/dlp)",
    )
    prep.add_argument(
        "--archive",
        type=Path,
        default=None,
        help="use this local bigbench sdist (.tar.gz) instead of downloading "
        "(also $DLP_BIGBENCH_ARCHIVE)",
    )
    prep.add_argument(
        "--tasks",
        nargs="+",
        metavar="TASK",
        default=None,
        help=f"subset of the {len(POOL)} pool tasks (default: all; see `dlp data tasks`)",
    )
    prep.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    prep.add_argument(
        "--max-train-per-task",
        type=int,
        default=1000,
        metavar="N",
        help="train cap per task, keeps tasks balanced (default 1000)",
    )
    prep.add_argument(
        "--max-validation-per-task",
        type=int,
        default=100,
        metavar="N",
        help="validation cap per task (default 100)",
    )
    prep.add_argument(
        "--max-test-per-task",
        type=int,
        default=200,
        metavar="N",
        help="test cap per task (default 200)",
    )
    prep.add_argument("--force", action="store_true", help="rebuild even if up to date")
    prep.set_defaults(func=_prepare)

    stats = sub.add_parser(
        "stats",
        help="print per-task, per-split counts",
        description="Print per-task, per-split example counts of a "
        "prepared dir (or its tasks.parquet).",
    )
    stats.add_argument(
        "dir",
        type=Path,
        nargs="?",
        default=None,
        help="prepared dir (default: <cache>/data/bigbench26)",
    )
    stats.set_defaults(func=_stats)

    tasks = sub.add_parser(
        "tasks", help="list the task pool", description="List the pool's tasks and their kind."
    )
    tasks.set_defaults(func=_tasks)


def _prepare(args: argparse.Namespace) -> int:
    from dlp.data.prepare import prepare
    from dlp.data.splits import SplitConfig
    from dlp.errors import DlpError
    from dlp.paths import cache_dir, data_dir

    for flag in ("max_train_per_task", "max_validation_per_task", "max_test_per_task"):
        if getattr(args, flag) < 1:
            raise DlpError(f"--{flag.replace('_', '-')} must be at least 1")
    root = cache_dir(args.cache_dir)
    out = args.out or data_dir(root)
    cfg = SplitConfig(
        seed=args.seed,
        max_train=args.max_train_per_task,
        max_validation=args.max_validation_per_task,
        max_test=args.max_test_per_task,
    )
    done = prepare(
        out, cache_root=root, archive=args.archive, tasks=args.tasks, cfg=cfg, force=args.force
    )
    print(done / "tasks.parquet")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from dlp.data.dataset import load_tasks, task_names
    from dlp.data.prepare import count_table
    from dlp.paths import cache_dir, data_dir

    table = load_tasks(args.dir or data_dir(cache_dir()))
    counts = count_table(table)
    kinds = dict(zip(table["task"].to_pylist(), table["kind"].to_pylist(), strict=True))
    width = max([len(t) for t in counts] + [5])
    print(f"{'task':<{width}}  {'kind':<10} {'train':>6} {'valid':>6} {'test':>6} {'total':>6}")
    totals = [0, 0, 0]
    for task in task_names(table):
        c = counts[task]
        row = [c["train"], c["validation"], c["test"]]
        totals = [a + b for a, b in zip(totals, row, strict=True)]
        print(
            f"{task:<{width}}  {kinds[task]:<10} {row[0]:>6} {row[1]:>6} {row[2]:>6} {sum(row):>6}"
        )
    print(
        f"{'all (' + str(len(counts)) + ' tasks)':<{width}}  {'':<10} {totals[0]:>6} "
        f"{totals[1]:>6} {totals[2]:>6} {sum(totals):>6}"
    )
    sys.stdout.flush()
    return 0


def _tasks(_args: argparse.Namespace) -> int:
    for spec in POOL:
        print(f"{spec.name}\t{spec.kind}")
    return 0
