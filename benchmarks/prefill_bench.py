"""Cost of one prefill forward vs the rows it holds: eager vs torch.compile'd, same engine.

    python benchmarks/prefill_bench.py --device cuda --out results/prefill_h200.json

A server admits requests in small groups (answers go out and new requests come back
staggered), so the fixed cost of a prefill call matters as much as its cost per token. This
builds the serving engine's model (random weights of a named shape, the worker's pool
layout), then times ``DecodeRunner.prefill`` + the first-token argmax for 1..64 rows of
``--tokens`` tokens, eager and compiled, each a median of ``--repeats`` synchronised calls,
and records a profile of one small compiled call. JSON + PNG.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROWS = (1, 2, 5, 8, 16, 32, 64)


def _time_prefill(engine: Any, rows: int, tokens: int, repeats: int, host: bool) -> float:
    """ms per call: from device tensors, or (``host``) from host lists as the engine calls
    it (``prefill_host``: staged inputs, greedy tokens read back)."""
    import numpy as np
    import torch

    dev = engine.device
    ids = torch.randint(0, engine.model.shape.vocab, (rows, tokens), device=dev)
    lengths = torch.full((rows,), tokens, device=dev)
    index = torch.arange(rows, device=dev)
    scales = None
    if engine.model.lora:
        scales = torch.zeros(rows, engine.pool.n_slots, device=dev)
    prompts, row_list = ids.tolist(), index.tolist()
    host_scales = None if scales is None else np.zeros(tuple(scales.shape), np.float32)
    times = []
    for _ in range(repeats + 1):
        _sync(dev)
        start = time.perf_counter()
        if host:
            engine.runner.prefill_host(prompts, row_list, host_scales)
        else:
            engine.runner.prefill(ids, lengths, index, scales).argmax(-1).tolist()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[1:])


def _graph_diff(engine: Any, tokens: int) -> float:
    """Largest |logit| difference, graph replay vs the direct compiled call (5 rows)."""
    import torch

    dev = engine.device
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, engine.model.shape.vocab, (5, tokens), generator=gen).to(dev)
    lengths = torch.tensor([tokens, tokens - 3, tokens - 17, 5, tokens], device=dev)
    index = torch.tensor([7, 3, 9, 1, 0], device=dev)
    scales = None
    if engine.model.lora:
        scales = torch.zeros(5, engine.pool.n_slots, device=dev)
    graph = engine.runner.prefill(ids, lengths, index, scales)
    limit, engine.runner.graph_tokens = engine.runner.graph_tokens, 0
    direct = engine.runner.prefill(ids, lengths, index, scales)
    engine.runner.graph_tokens = limit
    return float((graph - direct).abs().max())


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _profile(engine: Any, rows: int, tokens: int) -> dict[str, list[dict[str, Any]]]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    dev = engine.device
    ids = torch.randint(0, engine.model.shape.vocab, (rows, tokens), device=dev)
    lengths = torch.full((rows,), tokens, device=dev)
    index = torch.arange(rows, device=dev)
    scales = torch.zeros(rows, engine.pool.n_slots, device=dev) if engine.model.lora else None
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            engine.runner.prefill(ids, lengths, index, scales).argmax(-1).tolist()
    events = prof.key_averages()
    out: dict[str, list[dict[str, Any]]] = {}
    for key in ("cpu_time_total", "device_time_total"):
        top = sorted(events, key=lambda e: getattr(e, key, 0) or 0, reverse=True)[:15]
        out[key] = [
            {
                "name": e.key[:90],
                "calls": e.count,
                "cpu_ms": e.cpu_time_total / 1e3,
                "device_ms": (getattr(e, "device_time_total", 0) or 0) / 1e3,
            }
            for e in top
        ]
    return out


def plot(report: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, series in report["ms_per_call"].items():
        ax.plot(list(map(int, series)), list(series.values()), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"rows in the prefill ({report['tokens']} tokens each)")
    ax.set_ylabel("ms per prefill call")
    ax.set_title(f"prefill cost, {report['shape']} ({report['machine']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen2-1.5b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile-rows", type=int, default=5)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)

    import torch
    from tqdm.auto import tqdm

    from dlp.engine.config import EngineConfig
    from dlp.engine.engine import Engine
    from dlp.engine.model import prefill_layer
    from dlp.engine.runner import PREFILL_GRAPH_TOKENS
    from dlp.engine.shapes import PUBLISHED_SHAPES as NAMED_SHAPES

    on_cuda = a.device.startswith("cuda")
    config = EngineConfig(
        model_config=dict(NAMED_SHAPES[a.shape]),
        dtype="bfloat16" if on_cuda else "float32",
        device=a.device,
        max_batch=max(ROWS),
        max_seq_len=a.max_seq_len,
        pool_slots=32,
        max_rank=16,
        cuda_graph=False,
    )
    engine = Engine.from_config(config)
    start = time.perf_counter()
    engine.runner.warm_prefill()
    warm_s = time.perf_counter() - start
    compiled_fn = engine.runner.prefill_fn
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": torch.cuda.get_device_name(0) if on_cuda else "cpu",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "shape": a.shape,
        "tokens": a.tokens,
        "max_seq_len": a.max_seq_len,
        "compile_warmup_s": warm_s,
        "prefill_compiled": engine.runner.prefill_compiled,
        "ms_per_call": {},
    }
    variants = {"eager": prefill_layer}
    if engine.runner.prefill_compiled:
        variants["compiled"] = compiled_fn
    if on_cuda:
        variants["compiled + CUDA graphs"] = compiled_fn
        variants["compiled + CUDA graphs, staged host inputs"] = compiled_fn
    with torch.no_grad():
        for name, fn in variants.items():
            engine.runner.prefill_fn = fn
            if name.endswith("graphs"):  # captured once, reused by the staged variant
                start = time.perf_counter()
                engine.runner.graph_tokens = PREFILL_GRAPH_TOKENS
                engine.runner.capture_prefill_graphs()
                report["graph_capture_s"] = time.perf_counter() - start
                report["graph_vs_direct_max_abs_diff"] = _graph_diff(engine, a.tokens)
            report["ms_per_call"][name] = {
                str(n): _time_prefill(engine, n, a.tokens, a.repeats, host=name.endswith("inputs"))
                for n in tqdm(ROWS, desc=f"prefill {name}")
            }
            report[f"profile_{name}"] = _profile(engine, a.profile_rows, a.tokens)
    if "compiled" in variants:
        counters = torch._dynamo.utils.counters
        report["dynamo"] = {k: dict(v) for k, v in counters.items() if k in ("stats", "frames")}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2))
    plot(report, a.out.with_suffix(".png"))
    for name, series in report["ms_per_call"].items():
        print(name, " ".join(f"{n}:{ms:.1f}" for n, ms in series.items()))
    for name in variants:
        print(f"-- {name}: top CPU")
        for e in report[f"profile_{name}"]["cpu_time_total"][:10]:
            print(f"  {e['cpu_ms']:8.1f} {e['device_ms']:8.1f} {e['calls']:6d} {e['name']}")
        print(f"-- {name}: top device")
        for e in report[f"profile_{name}"]["device_time_total"][:8]:
            print(f"  {e['cpu_ms']:8.1f} {e['device_ms']:8.1f} {e['calls']:6d} {e['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
