"""The decode step's non-GEMM kernels on the GPU: attention launch settings and the argmax.

    python benchmarks/decode_ops_bench.py --out results/decode_ops_h200.json

In the H200 profile of the Qwen2-1.5B decode step (``results/decode_step_h200_rope.json``,
batch 64, 193 keys a row) the attention kernel with the rotary embedding inside took 242 us a
step (8.6 us a layer for 12.6 MB of K/V, ~5x its bytes at 4.3 TB/s) and the greedy argmax
34 us (one program per row over 151,936 logits). This measures, in one process, each in a
CUDA graph of a step's worth of calls (28 layers' own caches, so L2 does not hold them):

- ``decode_attention_rope`` for every ``LaunchConfig`` (keys per block, warps, stages) and
  split count of the sweep, its output checked against the default config's;
- ``argmax`` against a two-stage argmax (``greedy_tokens`` here), eager and compiled,
  checked equal.

JSON (sorted sweep, best config) + PNG.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BLOCK_NS = (32, 64, 128)
WARPS = (2, 4, 8)
STAGES = (1, 2, 3)
SPLITS = (1, 2, 3)


def attention_sweep(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from tqdm.auto import tqdm

    from dlp.engine.cuda_timing import graph_replay_us
    from dlp.engine.decode_attention import LaunchConfig, decode_attention_rope

    dev = torch.device("cuda")
    b, heads, kvh, d, layers = args.batch, 12, 2, 128, 28
    gen = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=dev, generator=gen, dtype=torch.bfloat16)

    caches = [(rand(b, kvh, args.max_seq, d), rand(b, kvh, args.max_seq, d)) for _ in range(layers)]
    q, k_new, v_new = rand(b, heads, d), rand(b, kvh, d), rand(b, kvh, d)
    angles = torch.rand(b, d // 2, device=dev, generator=gen) * 6.28
    cos = torch.cat([angles.cos()] * 2, -1).to(torch.bfloat16)
    sin = torch.cat([angles.sin()] * 2, -1).to(torch.bfloat16)
    lengths = torch.full((b,), args.length, device=dev, dtype=torch.int32)
    kv_bytes = layers * 2 * b * kvh * args.length * d * 2

    def step(cfg: LaunchConfig, splits: int) -> torch.Tensor:
        out = q
        for kc, vc in caches:
            out = decode_attention_rope(
                q, k_new, v_new, cos, sin, kc, vc, lengths, d**-0.5, splits, launch=cfg
            )
        return out

    ref = step(LaunchConfig(), 1).float()
    rows = []
    grid = list(itertools.product(BLOCK_NS, WARPS, STAGES, SPLITS))
    for block_n, warps, stages, splits in tqdm(grid, desc="attention configs"):
        cfg = LaunchConfig(block_n, warps, stages)
        row: dict[str, Any] = {"block_n": block_n, "num_warps": warps, "num_stages": stages}
        row["splits"] = splits
        try:
            err = (step(cfg, splits).float() - ref).abs().max().item()
            row["us_per_step"] = graph_replay_us(
                lambda _, c=cfg, s=splits: step(c, s), iters=args.iters
            )
            row["max_abs_diff_vs_default"] = err
        except Exception as exc:  # e.g. out of resources for this tile: skip it
            row["failed"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        rows.append(row)
    ok = sorted((r for r in rows if "us_per_step" in r), key=lambda r: r["us_per_step"])
    key = ("block_n", "num_warps", "num_stages", "splits")
    default = next(r for r in rows if tuple(r[k] for k in key) == (64, 4, 3, 1))
    return {
        "batch": b,
        "length": args.length,
        "max_seq": args.max_seq,
        "kv_bytes_per_step": kv_bytes,
        "kv_floor_us": kv_bytes / 4.3e12 * 1e6,
        "default": default,
        "best": ok[0] if ok else None,
        "sweep": ok,
        "failed": [r for r in rows if "failed" in r],
    }


def greedy_tokens(logits: Any, max_chunks: int = 32) -> Any:
    """``logits.argmax(-1)`` for [rows, V] in two stages: the max of each of ``chunks`` equal
    pieces of the vocabulary, then the best piece, so ``rows * chunks`` programs share the
    reduction where ``argmax`` may run one a row. Ties resolve to the first index, as
    ``argmax`` does. (The experiment: no faster on the H200, so the engine keeps ``argmax``.)"""
    rows, vocab = logits.shape
    chunks = max_chunks
    while chunks > 1 and vocab % chunks:
        chunks //= 2
    if chunks < 4:
        return logits.argmax(dim=-1)
    width = vocab // chunks
    best_in_chunk, index_in_chunk = logits.view(rows, chunks, width).max(dim=-1)
    chunk = best_in_chunk.argmax(dim=-1, keepdim=True)
    return (index_in_chunk.gather(-1, chunk) + chunk * width).squeeze(-1)


def argmax_compare(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from dlp.engine.cuda_timing import graph_replay_us

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(1)
    out: dict[str, Any] = {}
    for vocab in (151936, 128256):
        logits = torch.randn(args.batch, vocab, device=dev, generator=gen, dtype=torch.bfloat16)
        ties = torch.randint(0, 3, (args.batch, vocab), device=dev, generator=gen).float()
        equal = all(
            torch.equal(greedy_tokens(x), x.argmax(-1)) for x in (logits, logits.float(), ties)
        )
        fns = {
            "argmax": lambda x: x.argmax(-1),
            "greedy_tokens": greedy_tokens,
        }
        for name in list(fns):
            fns[f"compiled_{name}"] = torch.compile(fns[name], fullgraph=True, dynamic=False)
        equal = equal and torch.equal(fns["compiled_greedy_tokens"](logits), logits.argmax(-1))
        row: dict[str, Any] = {"equal_to_argmax": bool(equal)}
        for name, fn in fns.items():
            row[f"{name}_us"] = graph_replay_us(lambda _, f=fn, x=logits: f(x), iters=args.iters)
        out[str(vocab)] = row
        print(vocab, json.dumps(out[str(vocab)]), flush=True)
    return out


def plot(report: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    att = report["attention"]
    top = [*att["sweep"][:12], att["default"]]
    labels = [f"n{r['block_n']} w{r['num_warps']} s{r['num_stages']} x{r['splits']}" for r in top]
    labels[-1] += " (default)"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.barh(labels[::-1], [r["us_per_step"] for r in top][::-1], color="tab:blue")
    ax1.axvline(att["kv_floor_us"], color="k", ls="--", label="K/V bytes / 4.3 TB/s")
    ax1.set_xlabel("us per step (28 layers)")
    ax1.set_title(f"attention + rope, batch {att['batch']}, {att['length']} keys")
    ax1.legend()
    am = report["argmax"]
    names = ["argmax_us", "greedy_tokens_us", "compiled_argmax_us", "compiled_greedy_tokens_us"]
    for i, (vocab, r) in enumerate(am.items()):
        ax2.bar([j + 0.4 * i for j in range(len(names))], [r[n] for n in names], 0.4, label=vocab)
    ax2.set_xticks([j + 0.2 for j in range(len(names))])
    ax2.set_xticklabels([n.replace("_us", "").replace("_", "\n") for n in names], fontsize=8)
    ax2.set_ylabel("us per step")
    ax2.set_title("greedy argmax over the vocabulary")
    ax2.legend(title="vocab")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=193, help="keys a row (position 192 + 1)")
    ap.add_argument("--max-seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/decode_ops_h200.json"))
    args = ap.parse_args(argv)
    import torch

    report: dict[str, Any] = {
        "command": "python benchmarks/decode_ops_bench.py " + " ".join(sys.argv[1:]),
        "machine": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "argmax": argmax_compare(args),
    }
    report["attention"] = attention_sweep(args)
    print("attention default", report["attention"]["default"])
    print("attention best", report["attention"]["best"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
