"""Where a decode GEMM's time goes, program by program, on the GPU.

    python benchmarks/gemm_timeline.py --configs gu=32x64x1x4x5,gu=64x64x1x8x4 \
        --out results/gemm_timeline_h200.json

Each config of a decode-step GEMM (Qwen2-1.5B shape, M = 64, bf16, the mode the PDL step runs
it in: q/k/v as split pieces with bias, o adding the residual, gate/up with silu * up reading
its input through the RMSNorm (``gu_plain``: the same without the norm), down as split
pieces) is timed alone (CUDA graph, weights cycled through >= 512 MB so nothing comes from
L2) and then launched with
``launch_partials(trace=...)``: every program writes its SM and the GPU's global timer at its
start, after its K loop and at its end. From that: how long the launch takes to reach every
program, the K loop's time per program and the bytes a program streams a microsecond, how
many programs share an SM at once, and the tail (the last programs running while the rest
are done). The decode step's timeline (``decode_step_bench.py``) says gate/up adds ~22 us a
layer for 55 MB (2.5 TB/s); this says why. JSON + PNG (each program's span, per config).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROWS = 64
L2_DEFEAT_BYTES = 512 << 20
TRACED_LAUNCHES = 5

SHAPE = "qwen2-1.5b"


def gemm_roles() -> dict[str, tuple[int, int, bool]]:
    """role -> (N, K, silu) of the SHAPE layer's decode GEMMs; ``gu_plain`` is gate/up
    without the norm prologue (what reading x through the RMSNorm costs the kernel)."""
    from dlp.engine.shapes import PUBLISHED_SHAPES, decode_gemm_shapes

    shapes = decode_gemm_shapes(PUBLISHED_SHAPES[SHAPE])
    return {role: shapes[role.removesuffix("_plain")] for role in ROLES}


ROLES = ("qkv", "o", "gu", "gu_plain", "down")


def program_stats(trace: Any, weight_bytes: int) -> dict[str, Any]:
    """Summary of one traced launch: trace int64 ``[programs, 4]`` = (SM, start, loop end,
    end) in ns of the global timer."""
    rows = [tuple(int(v) for v in r) for r in trace.tolist()]
    t0 = min(r[1] for r in rows)
    starts = sorted((r[1] - t0) / 1e3 for r in rows)
    ends = sorted((r[3] - t0) / 1e3 for r in rows)
    loops = sorted((r[2] - r[1]) / 1e3 for r in rows)
    epilogues = sorted((r[3] - r[2]) / 1e3 for r in rows)
    # Programs on one SM at once: the most spans of one SM that overlap at any instant.
    per_sm: dict[int, list[tuple[int, int]]] = {}
    for sm, start, _, end in rows:
        per_sm.setdefault(sm, []).append((start, end))
    concurrent = 0
    for spans in per_sm.values():
        edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
        running = 0
        for _, step in edges:
            running += step
            concurrent = max(concurrent, running)

    def pct(xs: list[float], q: float) -> float:  # nearest rank of sorted xs
        return xs[max(0, math.ceil(q * len(xs)) - 1)]

    span = ends[-1]
    per_program = weight_bytes / len(rows)
    return {
        "programs": len(rows),
        "sms": len(per_sm),
        "max_programs_per_sm": concurrent,
        "span_us": span,
        "last_start_us": starts[-1],
        "start_p50_us": pct(starts, 0.5),
        "loop_p10_us": pct(loops, 0.1),
        "loop_p50_us": pct(loops, 0.5),
        "loop_p90_us": pct(loops, 0.9),
        "epilogue_p50_us": pct(epilogues, 0.5),
        "end_p10_us": pct(ends, 0.1),
        "end_p90_us": pct(ends, 0.9),
        "tail_us": span - pct(ends, 0.9),
        "gb_per_s_per_program_p50": per_program / pct(loops, 0.5) / 1e3,
        "tb_per_s_span": weight_bytes / span / 1e6,
        "spans": [[(r[1] - t0) / 1e3, (r[2] - t0) / 1e3, (r[3] - t0) / 1e3, r[0]] for r in rows],
    }


def bench_config(role: str, cfg: Any, device: Any, iters: int) -> dict[str, Any]:
    import torch

    from dlp.engine import skinny_gemm as sg
    from dlp.engine.cuda_timing import graph_replay_us

    n, k, silu = gemm_roles()[role]
    rows_w = 2 * n if silu else n
    weight_bytes = rows_w * k * 2
    copies = max(2, math.ceil(L2_DEFEAT_BYTES / weight_bytes))
    gen = torch.Generator(device=device).manual_seed(0)
    ws = [
        torch.randn(rows_w, k, device=device, generator=gen, dtype=torch.bfloat16) * k**-0.5
        for _ in range(copies)
    ]
    x = torch.randn(ROWS, k, device=device, generator=gen, dtype=torch.bfloat16)
    bias = torch.randn(rows_w, device=device, dtype=torch.bfloat16) if role == "qkv" else None
    norm = residual = None
    if role == "gu":  # the step reads x through the post-attention norm (24 sums-of-squares parts)
        sumsq = x.float().pow(2).reshape(ROWS, 24, k // 24).sum(-1).T.contiguous()
        norm = sg.NormInput(sumsq, torch.ones(k, device=device, dtype=torch.bfloat16), 1e-6)
    split, _ = sg.split_pieces(k, cfg)
    tiles = cfg.column_programs(n)
    scratch = None
    if role == "o":  # the residual epilogue, as skinny_residual launches it
        scratch = torch.empty((split, ROWS, n), dtype=torch.float32, device=device)
        residual = sg.ResidualOut(
            torch.randn(ROWS, n, device=device, dtype=torch.bfloat16),
            torch.zeros(tiles, dtype=torch.int32, device=device),
            torch.empty((ROWS, n), dtype=torch.bfloat16, device=device),
            torch.empty((tiles, ROWS), dtype=torch.float32, device=device),
        )

    def launch(i: int, trace: torch.Tensor | None = None) -> torch.Tensor:
        w = ws[i % copies]
        return sg.launch_partials(
            x, w, bias, ROWS, n, k, cfg, silu, False, scratch, norm, residual, trace
        )

    us = graph_replay_us(launch, copies, iters)
    programs = tiles * split
    launches = []
    for i in range(TRACED_LAUNCHES):
        trace = torch.zeros((programs, 4), dtype=torch.int64, device=device)
        launch(i + 1, trace)
        torch.cuda.synchronize()
        launches.append(program_stats(trace.cpu(), weight_bytes))
    median = sorted(launches, key=lambda s: s["span_us"])[len(launches) // 2]
    summary = {
        key: statistics.median(s[key] for s in launches) for key in launches[0] if key != "spans"
    }
    ws.clear()
    torch.cuda.empty_cache()
    return {
        "role": role,
        "config": cfg.as_dict(),
        "weight_bytes": weight_bytes,
        "graph_us": us,
        "tb_per_s": weight_bytes / us / 1e6,
        "traced": summary,
        "median_launch_spans": median["spans"],
    }


def plot(report: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 2.2 * len(runs)), squeeze=False)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        spans = sorted(run["median_launch_spans"], key=lambda s: s[0])
        for y, (start, loop_end, end, _) in enumerate(spans):
            ax.plot([start, loop_end], [y, y], color="tab:blue", lw=0.8)
            ax.plot([loop_end, end], [y, y], color="tab:red", lw=0.8)
        t = run["traced"]
        ax.set_title(
            f"{run['role']} {run['config']['block_n']}x{run['config']['block_k']}"
            f" split {run['config']['split_k']} w{run['config']['num_warps']}"
            f" s{run['config']['num_stages']}: {run['graph_us']:.1f} us in a graph,"
            f" span {t['span_us']:.1f} us, tail {t['tail_us']:.1f} us,"
            f" <= {t['max_programs_per_sm']:.0f} programs/SM",
            fontsize=8,
        )
        ax.set_ylabel("program", fontsize=7)
    axes[-1, 0].set_xlabel("us from the first program's start (blue: K loop, red: epilogue)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--configs",
        default="qkv=32x64x4x4x5,o=64x64x4x4x5,gu=32x64x1x4x5,down=64x128x4x4x5",
        help="comma-separated ROLE=BNxBKxSPLITxWARPSxSTAGES[xPROGRAMS] (roles: qkv, o, gu,"
        " gu_plain, down; PROGRAMS: the output columns shared evenly by that many programs)",
    )
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    from dlp.engine.skinny_gemm import GemmConfig

    specs = []
    for item in [c for c in a.configs.split(",") if c]:
        role, _, spec = item.partition("=")
        if role not in ROLES:
            p.error(f"{item!r}: role must be one of {', '.join(ROLES)}")
        try:
            specs.append((role, GemmConfig.parse(spec)))
        except ValueError as exc:
            p.error(str(exc))

    import torch
    from tqdm.auto import tqdm

    if not torch.cuda.is_available():
        p.error("the timeline reads the GPU's global timer: needs a CUDA GPU")
    device = torch.device("cuda")
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": ROWS,
        "sms": torch.cuda.get_device_properties(0).multi_processor_count,
        "runs": [],
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for role, cfg in tqdm(specs, desc="configs"):
        try:
            run = bench_config(role, cfg, device, a.iters)
        except Exception as exc:  # e.g. out of shared memory: keep the other configs
            report["runs"].append({"role": role, "config": cfg.as_dict(), "error": str(exc)[:300]})
            continue
        report["runs"].append(run)
        t = run["traced"]
        print(
            f"{role} {cfg.name()}: {run['graph_us']:.2f} us ({run['tb_per_s']:.2f} TB/s);"
            f" {t['programs']:.0f} programs on {t['sms']:.0f} SMs"
            f" (<= {t['max_programs_per_sm']:.0f} at once); span {t['span_us']:.2f},"
            f" last start {t['last_start_us']:.2f},"
            f" loop p10/50/90 {t['loop_p10_us']:.2f}/{t['loop_p50_us']:.2f}/{t['loop_p90_us']:.2f},"
            f" epilogue {t['epilogue_p50_us']:.2f}, ends p10/p90 {t['end_p10_us']:.2f}/"
            f"{t['end_p90_us']:.2f}, tail {t['tail_us']:.2f} us",
            flush=True,
        )
        a.out.write_text(json.dumps(report, indent=1))
    a.out.write_text(json.dumps(report, indent=1))
    runs = [r for r in report["runs"] if "traced" in r]
    if runs:
        plot({**report, "runs": runs}, a.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
