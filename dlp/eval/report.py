"""quality.json helpers: issue-7 target checks, the machine line, and the three PNG plots."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

SYSTEM_COLORS = {
    "base": "#9e9e9e",
    "oracle": "#2e7d32",
    "dlp": "#1565c0",
    "dlp_renorm": "#42a5f5",
    "top1": "#7e57c2",
    "composite": "#ef6c00",
    "dlp_prompt": "#90caf9",
}


def machine() -> str:
    import torch

    cpu = f"{platform.machine()} {platform.system()}, torch {torch.__version__}"
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}; {cpu}"
    return f"CPU only; {cpu}"


def target_checks(result: dict[str, Any], router_top1: float | None) -> dict[str, Any]:
    """Issue 7's targets, each with the measured values and whether it holds."""
    mcq, rl = result["mcq_accuracy"], result["generative_rougeL"]
    r1, bleu, mixed = result["generative_rouge1"], result["generative_bleu"], result["mixed_task"]

    def diff(table: dict[str, Any], a: str, b: str) -> float | None:
        if table.get(a) is None or table.get(b) is None:
            return None
        return round(table[a] - table[b], 3)

    exact = (result.get("exact_deltas_vs_oracle") or {}).get("deltas", {}).get("dlp")
    where = "full test split (exact paired deltas)" if exact else "evaluated examples"
    mcq_d = exact["mcq_accuracy"] if exact else diff(mcq, "dlp", "oracle")
    checks = {
        "router_top1_ge_98.5": {"value": router_top1, "holds": _ge(router_top1, 98.5)},
        "dlp_mcq_minus_oracle_ge_-0.5": {"value": mcq_d, "holds": _ge(mcq_d, -0.5), "on": where},
    }
    for name, table in (("rougeL", rl), ("rouge1", r1), ("bleu", bleu)):
        key = {"rougeL": "generative_rougeL", "rouge1": "generative_rouge1"}.get(name)
        d = exact[key] if exact and key else diff(table, "dlp", "oracle")
        on = where if exact and key else "evaluated examples"
        checks[f"dlp_{name}_minus_oracle_ge_-1"] = {"value": d, "holds": _ge(d, -1.0), "on": on}
    d = diff(mixed, "dlp", "composite")
    checks["mixed_dlp_gt_composite"] = {"value": d, "holds": d is not None and d > 0}
    return checks


def _ge(value: float | None, bound: float) -> bool:
    return value is not None and value >= bound


def plot_all(result: dict[str, Any], out_dir: Path, stem: str = "quality") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        _plot_per_task(result, out_dir / f"{stem}_per_task.png"),
        _plot_sweep(result, out_dir / f"{stem}_p_sweep.png"),
    ]
    if result.get("mixed_task"):
        paths.append(_plot_mixed(result, out_dir / f"{stem}_mixed.png"))
    return paths


def _plot_per_task(result: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    per_task = result["per_task"]
    tasks = list(per_task)
    systems = list(next(iter(per_task.values()))["systems"]) if tasks else []
    values = np.array(
        [
            [
                per_task[t]["systems"][s].get(
                    "accuracy", per_task[t]["systems"][s].get("rougeL", float("nan"))
                )
                for s in systems
            ]
            for t in tasks
        ]
    )
    fig, ax = plt.subplots(figsize=(max(10, 0.55 * len(tasks)), 5.5))
    width = 0.8 / max(1, len(systems))
    x = np.arange(len(tasks))
    for j, s in enumerate(systems):
        ax.bar(x + j * width, values[:, j], width, label=s, color=SYSTEM_COLORS.get(s))
    ax.set_xticks(x + 0.4 - width / 2)
    labels = [f"{t} ({'acc' if per_task[t]['kind'] == 'mcq' else 'R-L'})" for t in tasks]
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("MCQ accuracy / ROUGE-L (%)")
    ax.set_title("Per-task quality on the test split")
    ax.legend(ncol=len(systems), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 1.12))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_sweep(result: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    sweep = result.get("p_sweep", {})
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for family, style in (("dlp", "-o"), ("dlp_renorm", "--s")):
        pts = sorted(
            (float(k.split("@")[1]), v) for k, v in sweep.items() if k.split("@")[0] == family
        )
        if not pts:
            continue
        ps = [p for p, _ in pts]
        label = "softmax weights" if family == "dlp" else "renormalised weights"
        for ax, key in zip(
            axes, ("mcq_accuracy", "generative_rougeL", "mean_adapters"), strict=True
        ):
            ax.plot(ps, [v[key] for _, v in pts], style, label=label)
    oracle = result["mcq_accuracy"].get("oracle")
    if oracle is not None:
        axes[0].axhline(oracle, color=SYSTEM_COLORS["oracle"], lw=1, label="oracle")
    oracle_rl = result["generative_rougeL"].get("oracle")
    if oracle_rl is not None:
        axes[1].axhline(oracle_rl, color=SYSTEM_COLORS["oracle"], lw=1, label="oracle")
    for ax, title in zip(
        axes, ("MCQ accuracy (%)", "generative ROUGE-L", "adapters per request"), strict=True
    ):
        ax.set_xlabel("top-p threshold p")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_mixed(result: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    mixed = {k: v for k, v in result["mixed_task"].items() if v is not None}
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(mixed)
    ax.bar(names, [mixed[n] for n in names], color=[SYSTEM_COLORS.get(n) for n in names])
    for i, n in enumerate(names):
        ax.text(i, mixed[n], f"{mixed[n]:.1f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("mean per-part score (acc / ROUGE-L, %)")
    ax.set_title("Mixed-task prompts (2-3 tasks per prompt)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown(result: dict[str, Any]) -> str:
    """Averages and per-task tables of a quality.json, as Markdown for benchmarks/README.md."""

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}"

    systems = list(result["mcq_accuracy"])
    lines = [
        f"| system | MCQ acc ({len(result['mcq_tasks'])} tasks) | ROUGE-L "
        f"({len(result['generative_tasks'])} tasks) | ROUGE-1 | BLEU | routed to own task | "
        "adapters / request | mixed-task |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in systems:
        lines.append(
            f"| {s} | {f(result['mcq_accuracy'][s])} | {f(result['generative_rougeL'][s])} | "
            f"{f(result['generative_rouge1'][s])} | {f(result['generative_bleu'][s])} | "
            f"{f(result['router_accuracy'][s])} | {f(result['mean_adapters'][s])} | "
            f"{f(result['mixed_task'].get(s))} |"
        )
    extra = [s for s in result["mixed_task"] if s not in systems]
    for s in extra:
        lines.append(f"| {s} | | | | | | | {f(result['mixed_task'][s])} |")
    lines += [
        "",
        "| task | kind | n | router top-1 | " + " | ".join(systems) + " |",
        "|---|---|---|---|" + "---|" * len(systems),
    ]
    for task, info in result["per_task"].items():
        metric = "accuracy" if info["kind"] == "mcq" else "rougeL"
        cells = " | ".join(f(info["systems"][s][metric]) for s in systems)
        kind = "MCQ acc" if info["kind"] == "mcq" else "ROUGE-L"
        lines.append(f"| {task} | {kind} | {info['n']} | {f(info['router_top1'])} | {cells} |")
    lines += [
        "",
        "| p | "
        + " | ".join(("MCQ softmax", "MCQ renorm", "R-L softmax", "R-L renorm", "adapters softmax"))
        + " |",
        "|---|---|---|---|---|---|",
    ]
    sweep = result.get("p_sweep", {})
    ps = sorted({k.split("@")[1] for k in sweep}, key=float)
    for p in ps:
        a, b = sweep.get(f"dlp@{p}", {}), sweep.get(f"dlp_renorm@{p}", {})
        lines.append(
            f"| {p} | {f(a.get('mcq_accuracy'))} | {f(b.get('mcq_accuracy'))} | "
            f"{f(a.get('generative_rougeL'))} | {f(b.get('generative_rougeL'))} | "
            f"{f(a.get('mean_adapters'))} |"
        )
    return "\n".join(lines) + "\n"
