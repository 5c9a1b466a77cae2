"""The decode step's GEMMs at batch 64: cuBLAS (``F.linear``) against the weight-streaming
Triton kernel (``dlp.engine.skinny_gemm``) over a sweep of its configs.

    python benchmarks/gemm_bench.py --out results/gemm_h200.json

For each linear layer of the Qwen2-1.5B and Llama-3-8B shapes (q/k/v merged, the same with the
LoRA A rows of 32 slots appended as variant (c) runs it, o, gate/up with ``silu(g) * u``, down)
it times, in one process on one GPU:

- ``cublas``: ``F.linear`` (+ ``silu * up`` for gate/up), the engine's path today;
- every kernel config of the sweep: the kernel alone (``kernel_us``: what a compiled step pays,
  as the split-K sum fuses into the next pointwise kernel there) and the whole call with the
  sum (``call_us``);
- the config :func:`pick_config` chooses today (``picked``).

Each variant is a CUDA graph of calls that cycle through enough copies of the weight (>= 512 MB)
that none is read from L2, as in a real step where every layer has its own weights; the median
of ``--iters`` replays divided by the calls is one call's time. Effective bandwidth is weight
bytes / time. Results are checked against cuBLAS. JSON + PNG.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROWS = 64
L2_DEFEAT_BYTES = 512 << 20
MAX_COPIES = 160

BLOCK_NS = (32, 64, 128)
BLOCK_KS = (64, 128, 256)
SPLITS = (1, 2, 3, 4, 6, 8)
WARPS = (4, 8)
STAGES = (3, 5)


def layer_gemms(shape: str, lora_a_rows: int = 512) -> list[dict[str, Any]]:
    """(name, N, K, silu, bias) of one decoder layer's GEMMs for a published shape. With silu,
    N is the intermediate size (the weight has 2N rows)."""
    from dlp.engine.shapes import PUBLISHED_SHAPES, decode_gemm_shapes

    cfg = PUBLISHED_SHAPES[shape]
    gemms = decode_gemm_shapes(cfg, lora_a_rows)
    bias = cfg["model_type"] == "qwen2"  # Qwen2 has q/k/v biases, Llama none
    names = {"qkv": "qkv", "qkvl": "qkv+lora_a", "o": "o", "gu": "gate_up+silu", "down": "down"}
    return [
        {
            "name": names[role],
            "n": n,
            "k": k,
            "silu": silu,
            "bias": bias and role in ("qkv", "qkvl"),
        }
        for role, (n, k, silu) in gemms.items()
    ]


def _configs(silu: bool) -> list[Any]:
    from dlp.engine.skinny_gemm import GemmConfig

    out = []
    grid = itertools.product(BLOCK_NS, BLOCK_KS, SPLITS, WARPS, STAGES)
    for bn, bk, split, warps, stages in grid:
        if silu and bn > 64:  # two accumulators: 2 x 64 x 128 fp32 already fill the registers
            continue
        out.append(GemmConfig(bn, bk, split, warps, stages))
    return out


def bench_shape(spec: dict[str, Any], device: Any, iters: int, full: bool) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from dlp.engine import skinny_gemm as sg
    from dlp.engine.cuda_timing import graph_replay_us

    n, k, silu = spec["n"], spec["k"], spec["silu"]
    rows_w = 2 * n if silu else n
    weight_bytes = rows_w * k * 2
    copies = max(2, min(MAX_COPIES, math.ceil(L2_DEFEAT_BYTES / weight_bytes)))
    gen = torch.Generator(device=device).manual_seed(0)
    ws = [
        torch.randn(rows_w, k, device=device, generator=gen, dtype=torch.bfloat16) * k**-0.5
        for _ in range(copies)
    ]
    bias = (
        torch.randn(rows_w, device=device, generator=gen, dtype=torch.bfloat16)
        if spec["bias"]
        else None
    )
    x = torch.randn(ROWS, k, device=device, generator=gen, dtype=torch.bfloat16)

    def cublas(i: int) -> torch.Tensor:
        y = F.linear(x, ws[i % copies], bias)
        return F.silu(y[:, :n]) * y[:, n:] if silu else y

    ref = cublas(0).float()
    cublas_us = graph_replay_us(cublas, copies, iters)

    def run_config(cfg: Any) -> dict[str, Any] | None:
        def kernel(i: int) -> torch.Tensor:
            return sg.launch_partials(x, ws[i % copies], bias, ROWS, n, k, cfg, silu)

        def call(i: int) -> torch.Tensor:
            return sg.finish_partials(kernel(i), n, silu, x.dtype)

        try:
            err = (call(0).float() - ref).abs().max().item()
            kernel_us = graph_replay_us(kernel, copies, iters)
            call_us = graph_replay_us(call, copies, iters) if cfg.split_k > 1 else kernel_us
        except Exception as exc:  # e.g. out of shared memory: skip this config
            return {"config": cfg.as_dict(), "failed": f"{type(exc).__name__}: {str(exc)[:120]}"}
        return {
            "config": cfg.as_dict(),
            "kernel_us": kernel_us,
            "call_us": call_us,
            "max_abs_err_vs_cublas": err,
        }

    picked_cfg = sg.pick_config(ROWS, n, k, silu)
    picked = run_config(picked_cfg)
    sweep = []
    if full:
        from tqdm.auto import tqdm

        for cfg in tqdm(_configs(silu), desc=spec["name"], leave=False):
            res = run_config(cfg)
            if res is not None:
                sweep.append(res)
    ok = [r for r in sweep if "kernel_us" in r and r["max_abs_err_vs_cublas"] < 0.1]
    ok.sort(key=lambda r: r["kernel_us"])
    best = ok[0] if ok else picked
    ref_scale = ref.abs().max().item()
    out = {
        **spec,
        "rows": ROWS,
        "weight_bytes": weight_bytes,
        "weight_copies": copies,
        "ref_abs_max": ref_scale,
        "cublas_us": cublas_us,
        "cublas_tbps": weight_bytes / cublas_us / 1e6,
        "picked": picked,
        "best": best,
        "best_tbps": weight_bytes / best["kernel_us"] / 1e6 if "kernel_us" in best else None,
        "speedup_best_vs_cublas": cublas_us / best["kernel_us"] if "kernel_us" in best else None,
        "failed_configs": sum(1 for r in sweep if "failed" in r),
        "top": ok[:8],
    }
    ws.clear()
    torch.cuda.empty_cache()
    return out


def plot(report: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["gemms"]
    labels = [f"{r['shape']}\n{r['name']}" for r in rows]
    xs = range(len(rows))
    width = 0.28
    series = [
        ("cuBLAS", [r["cublas_tbps"] for r in rows]),
        ("kernel, picked config", [
            r["weight_bytes"] / r["picked"]["kernel_us"] / 1e6 if "kernel_us" in r["picked"] else 0
            for r in rows
        ]),
        ("kernel, best of sweep", [r["best_tbps"] or 0 for r in rows]),
    ]  # fmt: skip
    fig, ax = plt.subplots(figsize=(10, 4))
    for j, (label, vals) in enumerate(series):
        ax.bar([x + (j - 1) * width for x in xs], vals, width, label=label)
    ax.axhline(4.3, color="k", lw=1, label="4.3 TB/s (copy ceiling)")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("weight bytes / time (TB/s)")
    ax.set_title(f"decode GEMMs at M={ROWS}, bf16 ({report['machine']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="qwen2-1.5b,llama3-8b")
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--no-sweep", action="store_true", help="time the picked configs only")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)

    import torch

    from dlp.engine.skinny_gemm import triton

    if not torch.cuda.is_available() or triton is None:
        p.error("needs a CUDA GPU and triton")
    device = torch.device("cuda")
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "gemms": [],
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for shape in a.shapes.split(","):
        for spec in layer_gemms(shape):
            res = bench_shape({"shape": shape, **spec}, device, a.iters, not a.no_sweep)
            report["gemms"].append(res)
            best = res["best"].get("kernel_us", float("nan"))
            print(
                f"{shape:12s} {spec['name']:14s} cublas {res['cublas_us']:6.2f} us"
                f" ({res['cublas_tbps']:.2f} TB/s)  picked"
                f" {res['picked'].get('kernel_us', float('nan')):6.2f}  best {best:6.2f} us"
                f" {res['best']['config']}",
                flush=True,
            )
            a.out.write_text(json.dumps(report, indent=1))
    for shape in a.shapes.split(","):
        mine = [r for r in report["gemms"] if r["shape"] == shape and r["name"] != "qkv+lora_a"]
        report[f"{shape}_layer_us"] = {
            "cublas": sum(r["cublas_us"] for r in mine),
            "best": sum(r["best"].get("kernel_us", r["cublas_us"]) for r in mine),
            "picked": sum(r["picked"].get("kernel_us", r["cublas_us"]) for r in mine),
        }
    a.out.write_text(json.dumps(report, indent=1))
    plot(report, a.out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in report.items() if k.endswith("_layer_us")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
