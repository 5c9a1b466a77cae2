"""`dlp train-adapters`: one PEFT LoRA per task plus a composite adapter (see adapters.py)."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from dlp.cli import positive_int
from dlp.errors import DlpError


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="converted base model dir (default: the embedded SmolLM2 in the cache)",
    )
    p.add_argument(
        "--gguf",
        type=Path,
        default=None,
        help="read the weights from this GGUF (tokenizer from --model)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="dir with tasks.parquet (default: the prepared data in the cache)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-adapters",
        help="train one LoRA per task (PEFT, r=8, q/v) and a composite r=64 adapter",
        description=(
            "Train one PEFT LoRA adapter per task on the base model (r=8, alpha=16, q_proj and "
            "v_proj, loss on the answer tokens only, seeded) plus a composite adapter (r=64) "
            "on all tasks together. Writes OUT/<task>/ and OUT/composite/ in the PEFT format "
            "and OUT/training.json (recipe, steps, loss curves)."
        ),
    )
    p.add_argument("--tasks", default="all", help="comma-separated task names, or 'all' (default)")
    p.add_argument("--out", type=Path, required=True, help="output dir for the adapters")
    add_model_args(p)
    p.add_argument(
        "--epochs",
        type=_positive_float,
        default=2.0,
        help="passes over each task's training data (default 2)",
    )
    p.add_argument("--min-steps", type=positive_int, default=20)
    p.add_argument(
        "--max-steps",
        type=positive_int,
        default=300,
        help="cap on steps per task adapter (default 300)",
    )
    p.add_argument("--composite-max-steps", type=positive_int, default=3000)
    p.add_argument("--composite-batch-size", type=positive_int, default=16)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--lr", type=_positive_float, default=1e-3)
    p.add_argument(
        "--max-train-examples",
        type=positive_int,
        default=None,
        help="use at most this many training examples per task",
    )
    p.add_argument("--no-composite", action="store_true", help="skip the composite adapter")
    p.add_argument(
        "--skip-existing",
        action="store_true",
        help="keep adapters already complete in --out (resume an interrupted run)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_train_adapters)


def parse_tasks(text: str, available: list[str]) -> list[str]:
    if text.strip() == "all":
        return available
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise DlpError("tasks: give 'all' or a comma-separated list of task names")
    unknown = [t for t in tasks if t not in available]
    if unknown:
        raise DlpError(f"tasks: unknown task(s) {', '.join(unknown)}")
    return tasks


def run_train_adapters(args: argparse.Namespace) -> int:
    from dlp.paths import cache_dir, data_dir, ensure_writable_dir
    from dlp.training.adapters import TrainPlan, train_all
    from dlp.training.examples import examples_from_table, load_table, task_names
    from dlp.training.model_io import load_model

    out = ensure_writable_dir(args.out)
    table = load_table(args.data or data_dir(cache_dir()))
    tasks = parse_tasks(args.tasks, task_names(table))
    train = examples_from_table(table, "train", tasks)
    if args.max_train_examples:
        train = _cap_per_task(train, args.max_train_examples)
    plan = TrainPlan()
    task_recipe = replace(plan.task, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    composite = (
        None
        if args.no_composite
        else replace(plan.composite, seed=args.seed, batch_size=args.composite_batch_size)
    )
    plan = replace(
        plan,
        task=task_recipe,
        composite=composite,
        epochs=args.epochs,
        min_steps=args.min_steps,
        max_steps=args.max_steps,
        composite_max_steps=args.composite_max_steps,
        skip_existing=args.skip_existing,
    )
    model, tokenizer = load_model(args.model, args.gguf, args.device)
    command = "dlp " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = train_all(model, tokenizer, train, tasks, out, plan, command=command)
    for name, info in report["adapters"].items():
        if info["skipped"]:
            print(f"{name}: kept (already trained)")
            continue
        print(
            f"{name}: {info['steps']} steps in {info['seconds']:.1f}s, loss "
            f"{info['first_loss']:.3f} -> {info['last_loss']:.3f}"
        )
    print(f"adapters written to {out} ({report['seconds']:.0f}s)")
    return 0


def _cap_per_task(examples: list, cap: int) -> list:
    seen: dict[str, int] = {}
    out = []
    for ex in examples:
        if seen.get(ex.task, 0) < cap:
            out.append(ex)
            seen[ex.task] = seen.get(ex.task, 0) + 1
    return out


def main(argv: list[str] | None = None) -> int:
    """Run without the other command groups (they may need packages absent here)."""
    from dlp.cli import run_group

    return run_group(register, argv)


if __name__ == "__main__":
    sys.exit(main())
