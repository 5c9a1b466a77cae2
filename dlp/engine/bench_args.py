"""Arguments of `dlp bench fusion` / benchmarks/fusion_bench.py (no torch import here, so
`dlp --help` stays fast)."""

from __future__ import annotations

import argparse

SHAPE_NAMES = ("qwen2-1.5b", "llama3-8b")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument(
        "--shapes",
        default=None,
        help=f"comma list of {', '.join(SHAPE_NAMES)} (GPU default: both) or smollm2 (CPU)",
    )
    parser.add_argument("--batch", type=int, default=None, help="concurrent requests (GPU 64)")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (GPU 128)")
    parser.add_argument("--new", type=int, default=None, help="new tokens (GPU 128)")
    parser.add_argument("--adapters", type=int, default=None, help="resident adapters (GPU 26)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per variant")
    parser.add_argument("--no-scale", action="store_true", help="skip the 1000-adapter run")
    parser.add_argument(
        "--scale-only",
        action="store_true",
        help="only the 1000-adapter run and the cold loads (item 6), none of the variants",
    )
    parser.add_argument(
        "--scale-catalogue",
        type=int,
        default=None,
        help="adapters in the scale run's catalogue (GPU 1000)",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds (GPU 560, CPU 1800); later variants are skipped past it",
    )
    parser.add_argument(
        "--compile-mode",
        default=None,
        choices=["default", "max-autotune-no-cudagraphs"],
        help="torch.compile mode of the engine's decode layer",
    )
    parser.add_argument(
        "--compile-scope",
        default=None,
        choices=["auto", "layer", "step"],
        help="compile one block for every layer or the whole decode step (default: auto)",
    )
    parser.add_argument(
        "--decode-attention",
        default=None,
        choices=["auto", "matmul", "triton", "triton_rope"],
        help="decode attention of the engine variants (default: auto)",
    )
    parser.add_argument(
        "--decode-gemm",
        default=None,
        choices=["auto", "cublas", "triton", "triton_pdl"],
        help="decode GEMMs of the engine variants (default: auto)",
    )
    parser.add_argument(
        "--residual-norm",
        type=int,
        default=None,
        metavar="PROGRAMS",
        help="PDL step: the residual add + input norm kernel's programs a row (0: Inductor's"
        " own kernel; default: the engine's, dlp.engine.residual_norm.SPLIT_N = 1)",
    )
    parser.add_argument(
        "--overlap-steps",
        action="store_true",
        help="queue decode step N+1 before handling step N's tokens",
    )
    parser.add_argument("--out", default=None, help="JSON path (PNG written beside it)")
    parser.add_argument(
        "--plot-only", default=None, metavar="JSON", help="only draw the PNG of an existing report"
    )
    parser.add_argument(
        "--merge-scale",
        default=None,
        metavar="JSON",
        help="add the scale run of this --scale-only report to the report at --out (same"
        " engine settings), recompute its headline and redraw its PNG; nothing is run",
    )
