"""`dlp eval`: quality of base / oracle / DLP / top-1 / composite on the test split."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from pathlib import Path

from dlp.cli import positive_int
from dlp.errors import DlpError

DEFAULT_OUT = Path("benchmarks/results/quality.json")


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    from dlp.training.cli import add_model_args

    p = subparsers.add_parser(
        "eval",
        help="score base / oracle / DLP / top-1 / composite on the test split",
        description=(
            "Evaluate on the test split, each task with its own metric (MCQ: log-likelihood "
            "of each choice -> accuracy; generative: BLEU on words and ROUGE-1/ROUGE-L), for "
            "the systems base, oracle (the task's own adapter), dlp (routed top-p fusion, "
            "softmax weights), dlp_renorm, top1 and composite; a sweep over p; and mixed-task "
            "prompts. Writes a JSON report and PNG plots."
        ),
    )
    p.add_argument(
        "--adapters",
        type=Path,
        default=None,
        help="dir with one adapter dir per task + composite/ (default: cache)",
    )
    add_model_args(p)
    p.add_argument(
        "--router",
        type=Path,
        default=None,
        help="router dir (default: the trained router in the cache)",
    )
    p.add_argument(
        "--router-probs",
        type=Path,
        default=None,
        help="JSON of router outputs: read it if it exists (skips the router), "
        "or with --route-only write it",
    )
    p.add_argument(
        "--route-only",
        action="store_true",
        help="only run the router on the test inputs and mixed prompts and write "
        "--router-probs (CPU; the LLM part can then run on another machine)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON report ({DEFAULT_OUT})")
    p.add_argument("--plots", type=Path, default=None, help="PNG dir (default: next to --out)")
    p.add_argument(
        "--tasks", default="all", help="comma-separated task names to evaluate, or 'all'"
    )
    p.add_argument(
        "--max-per-task",
        type=positive_int,
        default=None,
        help="evaluate at most this many test examples per task",
    )
    p.add_argument("--mixed", type=int, default=200, help="number of mixed-task prompts")
    p.add_argument("--p", type=_probability, default=0.6, help="top-p threshold (0.6)")
    p.add_argument(
        "--sweep-per-task",
        type=positive_int,
        default=None,
        help="run the p sweep on the first N test examples of each task (all)",
    )
    p.add_argument(
        "--no-composite", action="store_true", help="leave out the composite adapter system"
    )
    p.add_argument(
        "--deltas-full",
        action="store_true",
        help="also measure dlp/dlp_renorm/top1 minus oracle exactly on the whole test split, "
        "scoring only the requests where their mixes differ",
    )
    p.add_argument(
        "--deltas-sweep", action="store_true", help="with --deltas-full: also for every p"
    )
    p.add_argument(
        "--batch-tokens",
        type=positive_int,
        default=16384,
        help="padded tokens per scoring batch (memory / speed)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_eval)


def _cap(examples: list, cap: int | None) -> list:
    if cap is None:
        return examples
    seen: dict[str, int] = {}
    out = []
    for ex in examples:
        if seen.get(ex.task, 0) < cap:
            out.append(ex)
            seen[ex.task] = seen.get(ex.task, 0) + 1
    return out


def run_eval(args: argparse.Namespace) -> int:
    from dlp.eval.mixed import build_mixed
    from dlp.eval.routing_probs import RouterOutputs, route_examples, router_summary
    from dlp.paths import adapters_dir, cache_dir, data_dir, router_dir
    from dlp.training.examples import examples_from_table, load_table

    if args.mixed < 0:
        raise DlpError(f"mixed: must be >= 0, got {args.mixed}")
    root = cache_dir()
    table = load_table(args.data or data_dir(root))
    from dlp.training.cli import parse_tasks
    from dlp.training.examples import task_names

    tasks = parse_tasks(args.tasks, task_names(table))
    full_test = examples_from_table(table, "test", tasks)
    test = _cap(full_test, args.max_per_task)
    if not test:
        raise DlpError("data: the test split is empty")

    if args.route_only or args.router_probs is None or not args.router_probs.is_file():
        if args.route_only and args.router_probs is None:
            raise DlpError("router-probs: --route-only needs a file to write")
        mixed = build_mixed(test, args.mixed, args.seed) if args.mixed else []
        # The whole test split, not only the capped sample: --deltas-full and the router's
        # top-1 accuracy read every example's outputs (routing all of it takes seconds).
        routing = route_examples(args.router or router_dir(root), full_test, mixed)
        if args.router_probs is not None:
            routing.save(args.router_probs)
            print(f"router outputs written to {args.router_probs}")
            print(json.dumps(router_summary(routing), indent=1))
        if args.route_only:
            return 0
    else:
        routing = RouterOutputs.load(args.router_probs)
        if args.mixed == 0:
            routing.mixed = []
    routing_full = routing
    if sorted(tasks) != sorted(routing.labels):
        # Only some tasks' adapters take part: route as a server with just those registered.
        routing = routing.restrict(sorted(tasks))
        routing.mixed = routing.mixed[: args.mixed]
    return _evaluate(args, table, test, routing, adapters_dir(root), full_test, routing_full)


def _evaluate(args, table, test, routing, default_adapters: Path, full_test, routing_full) -> int:
    from dlp.eval.lora_mix import MultiLoraModel
    from dlp.eval.report import machine, plot_all, target_checks
    from dlp.eval.run import EvalSettings, answer_caps, evaluate, paired_deltas
    from dlp.eval.systems import SYSTEMS
    from dlp.paths import cache_dir, data_dir
    from dlp.training.adapters import COMPOSITE_NAME
    from dlp.training.examples import examples_from_table
    from dlp.training.model_io import load_model

    adapters = args.adapters or default_adapters
    tasks = sorted({ex.task for ex in test})
    systems = [s for s in SYSTEMS if not (args.no_composite and s == "composite")]
    names = [*tasks] if args.no_composite else [*tasks, COMPOSITE_NAME]
    dirs = [adapters / n for n in names]
    absent = [str(d) for d in dirs if not d.is_dir()]
    if absent:
        raise DlpError(f"adapters: missing adapter dir(s) {', '.join(absent[:3])}")
    model, tokenizer = load_model(args.model, args.gguf, args.device)
    mlm = MultiLoraModel.from_dirs(model, dirs, names)
    settings = EvalSettings(
        p=args.p, sweep_per_task=args.sweep_per_task, max_tokens_per_batch=args.batch_tokens
    )
    caps = answer_caps(examples_from_table(table, "train"), tokenizer, settings.max_new_tokens)
    result = evaluate(mlm, tokenizer, test, routing, settings, caps, systems, pool=full_test)
    if args.deltas_full:
        result["exact_deltas_vs_oracle"] = paired_deltas(
            mlm, tokenizer, full_test, routing, settings, caps, sweep=args.deltas_sweep
        )
    router_top1 = _router_top1(full_test, routing_full)
    report = {
        "command": "dlp " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": machine(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "router_top1": router_top1,
        **result,
        "router": routing.meta,
        "router_labels": routing.labels,
        "router_top1_note": "top-1 over all router labels on the whole test split of the "
        "evaluated tasks",
        "targets": target_checks(result, router_top1),
    }
    data_file = (args.data or data_dir(cache_dir())) / "tasks.parquet"
    if data_file.is_file():
        from dlp.hashing import sha256_file

        report["data_sha256"] = sha256_file(data_file)
    training = adapters / "training.json"
    if training.is_file():
        info = json.loads(training.read_text())
        report["training"] = {
            "command": info.get("command"),
            "plan": info.get("plan"),
            "seconds": info.get("seconds"),
            "adapters": {
                k: {kk: v[kk] for kk in ("examples", "steps", "first_loss", "last_loss")}
                for k, v in info.get("adapters", {}).items()
            },
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plots = plot_all(report, args.plots or args.out.parent)
    _print_summary(report)
    print(f"report written to {args.out}; plots: {', '.join(str(p) for p in plots)}")
    return 0


def _router_top1(test, routing) -> float:
    import numpy as np

    from dlp.eval.mixed import example_key

    labels = routing.labels
    hits = [labels[int(np.argmax(routing.get(example_key(ex))))] == ex.task for ex in test]
    return round(100.0 * sum(hits) / len(hits), 3)


def _print_summary(report: dict) -> None:
    print(f"router top-1: {report['router_top1']:.2f}%")
    print(f"{'system':<12}{'MCQ acc':>9}{'ROUGE-L':>9}{'ROUGE-1':>9}{'BLEU':>8}{'mixed':>8}")
    for s in report["mcq_accuracy"]:
        row = [
            report["mcq_accuracy"][s],
            report["generative_rougeL"][s],
            report["generative_rouge1"][s],
            report["generative_bleu"][s],
            report["mixed_task"].get(s),
        ]
        print(f"{s:<12}" + "".join(f"{v:>9.2f}" if v is not None else f"{'-':>9}" for v in row))
    for name, check in report["targets"].items():
        print(f"target {name}: {check['value']} -> {'holds' if check['holds'] else 'MISSED'}")


def main(argv: list[str] | None = None) -> int:
    """Run without the other command groups (they may need packages absent here)."""
    from dlp.cli import run_group

    return run_group(register, argv)


if __name__ == "__main__":
    sys.exit(main())
