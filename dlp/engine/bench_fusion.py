"""Fusion benchmark: our engine vs transformers / PEFT, side by side in one process.

Variants (issue 4, item 5), all greedy, all generating exactly ``new`` tokens per request:
  a  engine, base model only            e  PEFT, one adapter for all rows
  b  engine, one adapter for all rows   f  PEFT mixed batch (``adapter_names``; a row's mix is
  c  engine, per-row DLP mixes             an add_weighted_adapter 'cat' adapter)
  d  transformers generate, base        g  PEFT add_weighted_adapter per distinct mix, one
                                           generate per group
Plus item 6: engine throughput with 1000 registered adapters (Zipf popularity, pool smaller
than the catalogue) vs 8, and the time of a cold adapter load from the host tier.

GPU shapes are real architectures with random bf16 weights (timings do not depend on values).
The CPU run uses the embedded default (SmolLM2-135M) with smaller sizes.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlp.engine import residual_norm
from dlp.engine.bench_args import add_arguments  # noqa: F401  (re-export for the script)
from dlp.engine.config import EngineConfig
from dlp.engine.engine import Engine
from dlp.engine.shapes import PUBLISHED_SHAPES
from dlp.engine.types import GenerationRequest, SamplingParams
from dlp.errors import DlpError
from dlp.routing.mix import AdapterMix
from dlp.routing.select import select_top_p

log = logging.getLogger(__name__)

HBM_BYTES_PER_S = 4.3e12  # measured device-to-device copy on the H200 (shared/GPU.md)

SHAPES: dict[str, dict[str, Any]] = dict(PUBLISHED_SHAPES)

# Same architectures, tiny sizes: the benchmark's own tests run every code path on the CPU.
SHAPES["tiny-qwen2"] = {
    **SHAPES["qwen2-1.5b"],
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "eos_token_id": 511,
    "bos_token_id": 0,
}
SHAPES["tiny-llama3"] = {
    **SHAPES["llama3-8b"],
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "eos_token_id": 511,
    "bos_token_id": 0,
}


@dataclass
class BenchConfig:
    device: str = "cuda"
    shapes: tuple[str, ...] = ("qwen2-1.5b", "llama3-8b")
    batch: int = 64
    prompt: int = 128
    new: int = 128
    adapters: int = 26
    rank: int = 8
    pool_slots: int = 32
    repeats: int = 3
    f_new: int = 32  # (f) loops over adapters per layer: measured on fewer tokens
    g_new: int = 32  # (g) is one eager generate per mix: measured on fewer tokens
    g_time_s: float = 25.0  # ... and on as many groups as fit in this time
    scale: bool = True
    scale_only: bool = False  # only item 6 (the scale engine), no variants
    scale_shape: str = "qwen2-1.5b"
    scale_catalogue: int = 1000
    scale_requests: int = 256
    scale_slots: int = 128
    zipf: float = 1.1
    time_limit_s: float = 560.0
    seed: int = 0
    out: str = "benchmarks/results/fusion_h200.json"
    compile: bool | None = None
    compile_mode: str | None = None  # EngineConfig.compile_mode of the engine variants
    compile_scope: str = "auto"  # EngineConfig.compile_scope of the engine variants
    decode_attention: str = "auto"  # EngineConfig.decode_attention of the engine variants
    decode_gemm: str = "auto"  # EngineConfig.decode_gemm of the engine variants
    overlap_steps: bool = False  # EngineConfig.overlap_steps of the engine variants
    # PDL step: the residual add + input norm kernel's programs a row (0: Inductor's own
    # kernel; default: the engine's, residual_norm.SPLIT_N)
    residual_norm_programs: int = residual_norm.SPLIT_N


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def make_mixes(
    n_rows: int, labels: list[str], seed: int, max_adapters: int = 3
) -> list[AdapterMix]:
    """Router-like top-p mixes (p = 0.6, softmax weights as in the released code) of 1-3
    adapters, from random peaked probability vectors."""
    rng = np.random.default_rng(seed)
    mixes = []
    for _ in range(n_rows):
        logits = rng.normal(size=len(labels)) * 2.2
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        mixes.append(select_top_p(probs, labels, p=0.6, max_adapters=max_adapters))
    return mixes


def zipf_mixes(n_rows: int, labels: list[str], s: float, seed: int) -> list[AdapterMix]:
    """1-3 adapters per request drawn by Zipf popularity, random weights."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(labels) + 1) ** s
    p /= p.sum()
    mixes = []
    for _ in range(n_rows):
        k = min(int(rng.integers(1, 4)), len(labels))
        idx = rng.choice(len(labels), size=k, replace=False, p=p)
        w = rng.uniform(0.2, 1.0, size=k)
        mixes.append(
            AdapterMix.from_weights({labels[i]: float(x) for i, x in zip(idx, w, strict=True)})
        )
    return mixes


# --------------------------------------------------------------------- engine variants
async def _engine_run(engine: Engine, reqs: list[GenerationRequest]) -> dict[str, Any]:
    before = engine.stats()
    _sync(engine.device)
    start = time.perf_counter()
    results = await asyncio.gather(*(engine.generate(r) for r in reqs))
    _sync(engine.device)
    elapsed = time.perf_counter() - start
    after = engine.stats()
    tokens = sum(r.completion_tokens for r in results)
    steps = after["decode_steps"] - before["decode_steps"]
    decode_s = after["decode_s"] - before["decode_s"]
    return {
        "time_s": elapsed,
        "tokens": tokens,
        "tokens_per_s": tokens / elapsed,
        "decode_steps": steps,
        "engine_ms_per_step": 1e3 * decode_s / max(1, steps),
        "prefill_s": after["prefill_s"] - before["prefill_s"],
    }


async def engine_variant(engine: Engine, reqs: list[GenerationRequest], repeats: int) -> dict:
    _reset_peak(engine.device)
    await _engine_run(engine, reqs)  # warm-up
    runs = [await _engine_run(engine, reqs) for _ in range(repeats)]
    best = min(runs, key=lambda r: r["time_s"])
    best["time_s_runs"] = [r["time_s"] for r in runs]
    best["peak_gb"] = _peak_gb(engine.device)
    return best


def time_decode_step(
    engine: Engine, lora: bool, iters: int = 50, position: int | None = None
) -> float | None:
    """Median ms of one captured decode step (graph replay), CUDA events. ``position``:
    every row's, so the step reads the keys ``0 .. position`` of each row (else the rows'
    last staged positions, those of the run's last step)."""
    runner = engine.runner
    if not runner.captured:
        return None
    if position is not None:
        runner.positions[: engine.config.max_batch].fill_(position)
        if runner.overlap:  # rows then take the host's position, not the last step's + 1
            runner.step_inputs.device("override").fill_(1)
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        runner.step(engine.config.max_batch, lora=lora)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def requests_for(
    prompts: torch.Tensor, mixes: list[AdapterMix], new: int, tag: str
) -> list[GenerationRequest]:
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    return [
        GenerationRequest(
            request_id=f"{tag}{i}",
            mix=m,
            prompt_token_ids=tuple(prompts[i].tolist()),
            sampling=params,
        )
        for i, m in enumerate(mixes)
    ]


# --------------------------------------------------------------------- HF / PEFT variants
def hf_generate(
    model, input_ids: torch.Tensor, new: int, repeats: int = 1, **kwargs
) -> dict[str, Any]:
    device = input_ids.device
    mask = torch.ones_like(input_ids)
    gen = dict(
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        attention_mask=mask,
        **kwargs,
    )
    with torch.no_grad():
        model.generate(
            input_ids=input_ids[:, :16],
            **{**gen, "max_new_tokens": 2, "min_new_tokens": 2, "attention_mask": mask[:, :16]},
        )
        _reset_peak(device)
        elapsed = math.inf
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            out = model.generate(input_ids=input_ids, **gen)
            _sync(device)
            elapsed = min(elapsed, time.perf_counter() - start)
    tokens = (out.shape[1] - input_ids.shape[1]) * out.shape[0]
    return {
        "time_s": elapsed,
        "tokens": tokens,
        "tokens_per_s": tokens / elapsed,
        "peak_gb": _peak_gb(device),
        "new_tokens": new,
    }


def _mix_adapter_name(mix: AdapterMix) -> str:
    return "mix_" + "_".join(f"{n}_{round(w * 1000)}" for n, w in mix.entries)


def peft_variants(
    model, adapter_dirs: dict[str, Path], input_ids, mixes, cfg: BenchConfig, deadline: Deadline
) -> tuple[dict[str, Any], Any]:
    from peft import PeftModel

    names = list(adapter_dirs)
    peft = PeftModel.from_pretrained(
        model, adapter_dirs[names[0]], adapter_name=names[0], autocast_adapter_dtype=False
    )
    for name in names[1:]:
        peft.load_adapter(adapter_dirs[name], adapter_name=name, autocast_adapter_dtype=False)
    peft.eval()
    # A row's mix as one PEFT adapter: 'cat' is the exact weighted sum (as the engine does).
    row_adapter = []
    for mix in mixes:
        if len(mix) == 1:
            row_adapter.append(mix.names[0])
            continue
        name = _mix_adapter_name(mix)
        if name not in peft.peft_config:
            peft.add_weighted_adapter(
                list(mix.names), list(mix.weights), name, combination_type="cat"
            )
        row_adapter.append(name)
    out: dict[str, Any] = {}
    peft.set_adapter(names[0])
    out["e"] = hf_generate(peft, input_ids, cfg.new, repeats=2)
    if deadline.left() > 60:
        # Per-row adapter loops make (f) ~100x slower than (c): measured on f_new tokens.
        out["f"] = hf_generate(peft, input_ids, cfg.f_new, adapter_names=row_adapter)
    else:
        out["f"] = {"skipped": "time limit"}
    # (g): one generate per distinct mix; on g_new tokens and as many groups as fit g_time_s.
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(row_adapter):
        groups.setdefault(name, []).append(row)
    done_tokens, done_time, done_groups = 0, 0.0, 0
    for name, rows in groups.items():
        if done_time > cfg.g_time_s or deadline.left() < 40:
            break
        peft.set_adapter(name)
        r = hf_generate(peft, input_ids[rows], cfg.g_new)
        done_tokens += r["tokens"]
        done_time += r["time_s"]
        done_groups += 1
    out["g"] = {
        "time_s_measured": done_time,
        "tokens": done_tokens,
        "tokens_per_s": done_tokens / done_time if done_time else None,
        "groups_measured": done_groups,
        "groups": len(groups),
        "new_tokens": cfg.g_new,
        "time_s": (done_time / max(1, done_tokens)) * cfg.batch * cfg.new,
        "note": "time_s extrapolated from the measured groups to batch x new tokens",
    }
    return out, peft


# --------------------------------------------------------------------- per shape
def _random_adapters(model, n: int, rank: int, dtype, seed: int, prefix: str = "t"):
    from dlp.lora.adapter import base_linear_shapes, random_adapter

    shapes = base_linear_shapes(model)
    return [
        random_adapter(
            f"{prefix}{i:03d}",
            shapes,
            rank=rank,
            alpha=2 * rank,
            seed=seed + i,
            dtype=dtype,
            b_std=0.02,
        )
        for i in range(n)
    ]


def build_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape == "smollm2":
        from dlp.base_model import load_base_model

        model, tokenizer = load_base_model(dtype=dtype, device=device)
        return model, tokenizer
    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), None


def mean_decode_position(prompt: int, new: int) -> int:
    """The position of the middle decode step of ``new`` tokens after ``prompt``: it reads
    ``prompt + new // 2 + 1`` keys a row, about the mean over the run's steps
    (:func:`memory_floor_ms`'s ``prompt + (new + 1) / 2``)."""
    return prompt + new // 2


def memory_floor_ms(
    engine: Engine, batch: int, prompt: int, new: int, lora_bytes: int = 0
) -> dict[str, float]:
    model = engine.hf_model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    mean_ctx = prompt + (new + 1) / 2  # keys read by the average decode step
    kv_bytes = batch * mean_ctx * engine.model.kv_bytes_per_token()
    total = weight_bytes + kv_bytes + lora_bytes
    return {
        "weight_bytes": weight_bytes,
        "kv_bytes_per_step": kv_bytes,
        "lora_bytes_per_step": lora_bytes,
        "floor_ms": 1e3 * total / HBM_BYTES_PER_S,
    }


def bench_pool(model, rank: int, slots: int, host_budget_bytes: int = 6 << 30):
    """The benchmarks' adapter pool: r=``rank`` LoRA on q/v (the issue's setting)."""
    from dlp.lora.pool import AdapterPool

    return AdapterPool.for_model(
        model,
        target_modules=("q_proj", "v_proj"),
        max_rank=rank,
        n_slots=slots,
        host_budget_bytes=host_budget_bytes,
    )


async def run_shape(shape: str, cfg: BenchConfig, deadline: Deadline) -> dict[str, Any]:
    from dlp.lora.adapter import save_adapter

    device = torch.device(cfg.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    model, _tok = build_model(shape, device, dtype, cfg.seed)
    report: dict[str, Any] = {"shape": shape, "build_s": time.perf_counter() - t0}
    adapters = _random_adapters(model, cfg.adapters, cfg.rank, dtype, cfg.seed)
    labels = [a.name for a in adapters]
    slots = cfg.pool_slots
    pool = bench_pool(model, cfg.rank, slots)
    for a in adapters:
        pool.add(a)
    econf = EngineConfig(
        device=cfg.device,
        dtype=str(dtype).replace("torch.", ""),
        max_batch=cfg.batch,
        max_seq_len=cfg.prompt + cfg.new,
        pool_slots=slots,
        max_rank=cfg.rank,
        compile=cfg.compile,
        compile_mode=cfg.compile_mode,
        compile_scope=cfg.compile_scope,
        decode_attention=cfg.decode_attention,
        decode_gemm=cfg.decode_gemm,
        overlap_steps=cfg.overlap_steps,
        max_prefill_tokens=cfg.batch * cfg.prompt,
    )
    if cfg.scale_only:
        if shape == cfg.scale_shape:
            report["scale"] = await scale_engine_run(model, econf, cfg, dtype)
        return report
    engine = Engine(model, None, pool, econf)
    t0 = time.perf_counter()
    await engine.start()
    report["compile_capture_s"] = time.perf_counter() - t0
    log.warning("%s engine started (compile + capture %.1f s)", shape, report["compile_capture_s"])
    report["compiled"] = econf.use_compile and not engine.runner.compile_failed
    report["cuda_graph"] = engine.runner.captured
    report["decode_path"] = engine.runner.decode_path.as_dict()  # the "auto"s resolved
    gen = torch.Generator().manual_seed(cfg.seed)
    vocab = engine.model.shape.vocab
    prompts = torch.randint(0, vocab, (cfg.batch, cfg.prompt), generator=gen)
    mixes = make_mixes(cfg.batch, labels, cfg.seed)
    report["distinct_mixes"] = len({m.key for m in mixes})
    report["adapters_per_mix"] = dict(
        sorted({k: sum(len(m) == k for m in mixes) for k in {len(m) for m in mixes}}.items())
    )
    variants: dict[str, Any] = {}
    base = [AdapterMix.base()] * cfg.batch
    single = [AdapterMix.single(labels[0])] * cfg.batch
    for key, rows in (("a", base), ("b", single), ("c", mixes)):
        variants[key] = await engine_variant(
            engine, requests_for(prompts, rows, cfg.new, key), cfg.repeats
        )
        log.warning("%s %s: %.3f s", shape, key, variants[key]["time_s"])
    # The step at the middle of the run's decode (the keys its average step reads, as the
    # floor counts them); timed at the run's last positions instead it would read a third
    # more KV than the floor (session 14's fusion_h200_pdl.json was timed so).
    step_at = mean_decode_position(cfg.prompt, cfg.new)
    step_a = time_decode_step(engine, lora=False, position=step_at)
    step_c = time_decode_step(engine, lora=True, position=step_at)
    lora_bytes = pool.device_bytes
    floor = memory_floor_ms(engine, cfg.batch, cfg.prompt, cfg.new)
    report["decode_step_position"] = step_at
    report.update(floor)
    report["decode_step_ms"] = {
        "a_graph": step_a,
        "c_graph": step_c,
        "a_engine": variants["a"]["engine_ms_per_step"],
        "c_engine": variants["c"]["engine_ms_per_step"],
    }
    step_ref = step_a if step_a is not None else variants["a"]["engine_ms_per_step"]
    # The floor is the H200's HBM bound; on a CPU the ratio would mean nothing.
    report["decode_step_to_floor"] = step_ref / floor["floor_ms"] if device.type == "cuda" else None
    report["floor_ms_with_lora"] = memory_floor_ms(
        engine, cfg.batch, cfg.prompt, cfg.new, lora_bytes
    )["floor_ms"]

    await engine.stop()
    if cfg.scale and shape == cfg.scale_shape and deadline.left() > 150:
        del engine
        gc.collect()
        report["scale"] = await scale_engine_run(model, econf, cfg, dtype)
        engine = None

    # transformers / PEFT on the same weights (engine buffers freed first).
    del engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    input_ids = prompts.to(device)
    if deadline.left() > 60:
        variants["d"] = hf_generate(model, input_ids, cfg.new, repeats=2)
        log.warning("%s d: %.3f s", shape, variants["d"]["time_s"])
    if deadline.left() > 90:
        with tempfile.TemporaryDirectory() as tmp:
            dirs = {a.name: save_adapter(a, Path(tmp) / a.name) for a in adapters}
            peft_out, peft = peft_variants(model, dirs, input_ids, mixes, cfg, deadline)
            variants.update(peft_out)
            del peft
    report["variants"] = variants
    ta, tc = variants["a"]["time_s"], variants["c"]["time_s"]
    report["ratio_c_to_a_time"] = tc / ta
    report["ratio_b_to_a_time"] = variants["b"]["time_s"] / ta
    if "f" in variants and "tokens_per_s" in variants["f"]:
        report["ratio_c_to_f_throughput"] = (
            variants["c"]["tokens_per_s"] / variants["f"]["tokens_per_s"]
        )
    if "d" in variants:
        report["ratio_d_to_a_time"] = variants["d"]["time_s"] / ta
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return report


async def scale_engine_run(model, econf: EngineConfig, cfg: BenchConfig, dtype) -> dict[str, Any]:
    """Item 6 on its own engine: a pool of scale_slots (the working set of 64 Zipf rows), the
    catalogue much larger than the pool."""
    scale_pool = bench_pool(model, cfg.rank, cfg.scale_slots)
    scale_engine = Engine(model, None, scale_pool, replace(econf, pool_slots=cfg.scale_slots))
    await scale_engine.start()
    try:
        return await run_scale(scale_engine, scale_pool, model, cfg, dtype)
    finally:
        await scale_engine.stop()


async def run_scale(engine: Engine, pool, model, cfg: BenchConfig, dtype) -> dict[str, Any]:
    """Throughput with a large Zipf catalogue vs 8 adapters, same engine, and cold loads."""
    from dlp.lora.adapter import LoraAdapter

    # 1000 adapters: 32 random weight sets reused under distinct names (values do not
    # matter for timing; the pool copies each name separately through its host tier).
    seeds = _random_adapters(model, 32, cfg.rank, dtype, cfg.seed + 1000, prefix="w")
    names = [f"z{i:04d}" for i in range(cfg.scale_catalogue)]
    for i, name in enumerate(names):
        src = seeds[i % len(seeds)]
        pool.add(
            LoraAdapter(
                name=name,
                rank=src.rank,
                alpha=src.alpha,
                use_rslora=False,
                target_modules=src.target_modules,
                weights=src.weights,
            )
        )
    t0 = time.perf_counter()
    for name in names:  # warm the host tier (conversion + pinning), as a serving replica would
        pool.acquire_sync([name]).release()
    warm_s = time.perf_counter() - t0
    rng = np.random.default_rng(cfg.seed + 7)
    n = cfg.scale_requests
    lengths = rng.integers(cfg.new // 2, cfg.new + 1, size=n)
    prompts = torch.randint(
        0, engine.model.shape.vocab, (n, cfg.prompt), generator=torch.Generator().manual_seed(3)
    )
    out: dict[str, Any] = {
        "catalogue": cfg.scale_catalogue,
        "pool_slots": pool.n_slots,
        "requests": n,
        "zipf_s": cfg.zipf,
        "host_warm_s": warm_s,
    }
    for label, catalogue in (("8", names[:8]), (str(cfg.scale_catalogue), names)):
        mixes = zipf_mixes(n, catalogue, cfg.zipf, cfg.seed + 11)
        reqs = [
            GenerationRequest(
                request_id=f"s{label}_{i}",
                mix=m,
                prompt_token_ids=tuple(prompts[i].tolist()),
                sampling=SamplingParams(max_tokens=int(lengths[i]), ignore_eos=True),
            )
            for i, m in enumerate(mixes)
        ]
        stats0 = pool.stats()
        await _engine_run(engine, reqs[: cfg.batch])  # warm-up
        best = None
        for _ in range(2):
            r = await _engine_run(engine, reqs)
            best = r if best is None or r["time_s"] < best["time_s"] else best
        stats1 = pool.stats()
        best["pool_loads"] = stats1["loads"] - stats0["loads"]
        best["pool_evictions"] = stats1["evictions"] - stats0["evictions"]
        best["pool_waits"] = stats1["waits"] - stats0["waits"]
        best["distinct_adapters"] = len({n for m in mixes for n in m.names})
        out[label] = best
    out["ratio_1000_to_8_adapters_throughput"] = (
        out[str(cfg.scale_catalogue)]["tokens_per_s"] / out["8"]["tokens_per_s"]
    )
    out["cold_load_ms"] = cold_load_ms(pool, names)
    return out


def cold_load_ms(pool, names: list[str], n: int = 30) -> dict[str, float]:
    """Host tier -> device slot for one adapter that is not resident (evicts an LRU one)."""
    resident = set(pool.resident())
    cold = [x for x in names if x not in resident][:n]
    times = []
    for name in cold:
        _sync(pool.device)
        t0 = time.perf_counter()
        lease = pool.acquire_sync([name])
        _sync(pool.device)
        times.append(1e3 * (time.perf_counter() - t0))
        lease.release()
    return {
        "median": statistics.median(times),
        "p90": float(np.percentile(times, 90)),
        "n": len(times),
        "adapter_bytes": pool.slot_bytes,
    }


# --------------------------------------------------------------------- report
def headline(shapes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ratio_dlp_to_base_time": {s: r.get("ratio_c_to_a_time") for s, r in shapes.items()},
        "ratio_dlp_to_peft_mixed_throughput": {
            s: r.get("ratio_c_to_f_throughput") for s, r in shapes.items()
        },
        "decode_step_to_floor": {s: r.get("decode_step_to_floor") for s, r in shapes.items()},
        "ratio_1000_to_8_adapters_throughput": None,
        "cold_load_ms": None,
    }
    for r in shapes.values():
        if "scale" in r:
            out["ratio_1000_to_8_adapters_throughput"] = r["scale"][
                "ratio_1000_to_8_adapters_throughput"
            ]
            out["cold_load_ms"] = r["scale"]["cold_load_ms"]["median"]
    return out


# What an engine variant runs with: a scale run merged into a variants report must agree.
ENGINE_SETTINGS = (
    "device",
    "compile",
    "compile_mode",
    "compile_scope",
    "decode_attention",
    "decode_gemm",
    "overlap_steps",
    "residual_norm_programs",
)


def merge_scale(report: dict[str, Any], scale_report: dict[str, Any]) -> dict[str, Any]:
    """``report`` (a --no-scale run) with the scale results of ``scale_report`` (a
    --scale-only run of the same engine settings) added and the headline recomputed: the two
    halves of item 5/6 that no longer fit one call of the GPU machine. Both commands stay in
    the report (``command``, ``scale_command``)."""
    mismatched = {
        k: (report["config"].get(k), scale_report["config"].get(k))
        for k in ENGINE_SETTINGS
        if report["config"].get(k) != scale_report["config"].get(k)
    }
    if mismatched:
        raise DlpError(f"the scale run's engine settings differ from the report's: {mismatched}")
    scaled = {s: r["scale"] for s, r in scale_report["shapes"].items() if "scale" in r}
    if not scaled:
        raise DlpError("the scale report holds no scale run (made with --scale-only?)")
    merged = {**report, "shapes": {s: dict(r) for s, r in report["shapes"].items()}}
    for shape, scale in scaled.items():
        merged["shapes"].setdefault(shape, {"shape": shape})["scale"] = scale
    shapes = {s: r for s, r in merged["shapes"].items() if "variants" in r or "scale" in r}
    merged.update(headline(shapes))
    merged["scale_command"] = scale_report["command"]
    merged["scale_date"] = scale_report["date"]
    return merged


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} CPU, torch {torch.__version__}"


async def run(cfg: BenchConfig, command: str) -> dict[str, Any]:
    deadline = Deadline(cfg.time_limit_s)
    shapes: dict[str, Any] = {}
    for shape in cfg.shapes:
        if deadline.left() < 90:
            shapes[shape] = {"skipped": "time limit"}
            continue
        try:
            shapes[shape] = await run_shape(shape, cfg, deadline)
        except Exception as exc:  # keep the other shape's numbers
            log.exception("shape %s failed", shape)
            shapes[shape] = {"error": f"{type(exc).__name__}: {exc}"}
        # Partial report after every shape: a run stopped later still leaves numbers.
        write_report(_report(cfg, command, shapes), Path(cfg.out))
    return _report(cfg, command, shapes)


def _report(cfg: BenchConfig, command: str, shapes: dict[str, Any]) -> dict[str, Any]:
    report = {
        "command": command,
        "machine": machine(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        **headline({s: r for s, r in shapes.items() if "variants" in r or "scale" in r}),
        "targets": {
            "ratio_dlp_to_base_time": {"llama3-8b": 1.10, "qwen2-1.5b": 1.20},
            "ratio_dlp_to_peft_mixed_throughput": 10.0,
            "decode_step_to_floor": 2.0,
            "ratio_1000_to_8_adapters_throughput": 0.9,
            "cold_load_ms": 2.0,
        },
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "shapes": shapes,
    }
    return report


def write_report(report: dict[str, Any], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=_json_default))
    return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, tuple | set):
        return list(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


def plot(report: dict[str, Any], png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = {s: r for s, r in report["shapes"].items() if "variants" in r}
    if not shapes:
        return _plot_scale(report, png, plt)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    labels = {
        "a": "(a) engine base",
        "b": "(b) engine 1 LoRA",
        "c": "(c) engine DLP mixes",
        "d": "(d) HF base",
        "e": "(e) PEFT 1 LoRA",
        "f": "(f) PEFT mixed",
        "g": "(g) PEFT per mix",
    }
    width = 0.8 / max(1, len(shapes))
    for j, (shape, r) in enumerate(shapes.items()):
        keys = [k for k in labels if k in r["variants"] and r["variants"][k].get("tokens_per_s")]
        xs = [list(labels).index(k) + j * width for k in keys]
        ys = [r["variants"][k]["tokens_per_s"] for k in keys]
        bars = axes[0].bar(xs, ys, width, label=shape)
        for bar, y in zip(bars, ys, strict=True):
            axes[0].text(
                bar.get_x() + bar.get_width() / 2,
                y,
                f"{y:,.0f}",
                ha="center",
                va="bottom",
                fontsize=7,
                rotation=90,
            )
    axes[0].set_xticks([i + width * (len(shapes) - 1) / 2 for i in range(len(labels))])
    axes[0].set_xticklabels(list(labels.values()), rotation=30, ha="right", fontsize=8)
    axes[0].set_yscale("log")
    # Headroom above the tallest bar for its rotated value label (log axis: a factor).
    low, high = axes[0].get_ylim()
    axes[0].set_ylim(low, high * 4)
    axes[0].set_ylabel("generated tokens / s")
    axes[0].set_title(
        f"Throughput ({report['config']['batch']} requests, prompt "
        f"{report['config']['prompt']}, {report['config']['new']} new)"
    )
    axes[0].legend()
    names, floor, a_step, c_step = [], [], [], []
    for shape, r in shapes.items():
        names.append(shape)
        floor.append(r["floor_ms"])
        steps = r["decode_step_ms"]
        a_step.append(steps["a_graph"] or steps["a_engine"])
        c_step.append(steps["c_graph"] or steps["c_engine"])
    x = np.arange(len(names))
    axes[1].bar(x - 0.25, floor, 0.25, label="memory floor")
    axes[1].bar(x, a_step, 0.25, label="(a) decode step")
    axes[1].bar(x + 0.25, c_step, 0.25, label="(c) decode step")
    # Issue 4's target for step (a): 2x the floor, marked over each shape's bars.
    axes[1].hlines(
        [2 * f for f in floor], x - 0.4, x + 0.4, colors="k", linestyles="--", label="2x floor"
    )
    for xi, a, f in zip(x, a_step, floor, strict=True):
        axes[1].text(xi, a, f"{a / f:.3f}x", ha="center", va="bottom", fontsize=8)
    axes[1].set_xticks(x)
    axes[1].set_xticklabels(names)
    axes[1].set_ylabel("ms per decode step")
    axes[1].set_title("Decode step vs the HBM floor (labels: step (a) / floor)")
    axes[1].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"dlp fusion benchmark — {report['machine']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def _plot_scale(report: dict[str, Any], png: Path, plt: Any) -> Path:
    """A --scale-only report: tokens/s with 8 adapters vs the large catalogue, per shape."""
    scaled = {s: r["scale"] for s, r in report["shapes"].items() if "scale" in r}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ticks: list[float] = []
    tick_labels: list[str] = []
    for j, (shape, sc) in enumerate(scaled.items()):
        big = str(sc["catalogue"])
        ys = [sc["8"]["tokens_per_s"], sc[big]["tokens_per_s"]]
        ax.bar([3 * j, 3 * j + 1], ys, color=["tab:blue", "tab:orange"])
        ax.text(3 * j + 0.5, max(ys), f"{shape}: {ys[1] / ys[0]:.3f}x", ha="center", va="bottom")
        ticks += [3 * j, 3 * j + 1]
        tick_labels += ["8 adapters", f"{big} adapters"]
    ax.set_xticks(ticks, tick_labels)
    ax.set_ylabel("generated tokens / s")
    ax.set_title("Throughput with a large Zipf catalogue (pool smaller than it)", fontsize=9)
    fig.suptitle(f"dlp fusion benchmark, scale only — {report['machine']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def main(cfg: BenchConfig, command: str | None = None) -> dict[str, Any]:
    command = command or " ".join(sys.argv)
    split_n, residual_norm.SPLIT_N = residual_norm.SPLIT_N, cfg.residual_norm_programs
    try:  # read when the engines' steps are traced
        report = asyncio.run(run(cfg, command))
    finally:
        residual_norm.SPLIT_N = split_n
    out = Path(cfg.out)
    write_report(report, out)
    try:
        plot(report, out.with_suffix(".png"))
    except ImportError:  # no matplotlib on the device machine: plot later with --plot-only
        log.warning("matplotlib missing: no PNG written")
    return report


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for shape, r in report["shapes"].items():
        if "variants" not in r and "scale" not in r:
            lines.append(f"{shape}: {r}")
            continue
        if "variants" in r:
            v = r["variants"]
            cells = " ".join(
                f"{k}={v[k]['tokens_per_s']:.0f}"
                for k in "abcdefg"
                if k in v and v[k].get("tokens_per_s")
            )
            lines.append(f"{shape}: tok/s {cells}")
            lines.append(
                f"  c/a time {r['ratio_c_to_a_time']:.3f}  c/f thr "
                f"{r.get('ratio_c_to_f_throughput', math.nan):.1f}  step/floor "
                f"{r['decode_step_to_floor'] or math.nan:.2f} (step {r['decode_step_ms']}, floor "
                f"{r['floor_ms']:.3f} ms)"
            )
        if "scale" in r:
            s = r["scale"]
            lines.append(
                f"  {shape} scale {s['catalogue']}/8 "
                f"{s['ratio_1000_to_8_adapters_throughput']:.3f} cold load {s['cold_load_ms']}"
            )
    return lines


# --------------------------------------------------------------------- command line
def config_from_args(args) -> BenchConfig:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        cfg = BenchConfig(device=device)
    elif device == "cpu":
        # Item 7: the same variants on the embedded default, sizes a CPU can do in minutes.
        cfg = BenchConfig(
            device="cpu",
            shapes=("smollm2",),
            batch=8,
            prompt=32,
            new=16,
            adapters=8,
            pool_slots=12,
            repeats=2,
            f_new=8,
            g_new=8,
            g_time_s=30.0,
            scale=False,
            scale_shape="smollm2",
            scale_catalogue=100,
            scale_requests=32,
            scale_slots=48,
            out="benchmarks/results/fusion_cpu.json",
        )
    else:
        raise DlpError(f"--device must be cuda or cpu, got {device!r}")
    if args.shapes:
        shapes = tuple(s.strip() for s in args.shapes.split(",") if s.strip())
        bad = [s for s in shapes if s not in SHAPES and s != "smollm2"]
        if bad:
            raise DlpError(f"--shapes: unknown shape(s) {bad}; known: {[*SHAPES, 'smollm2']}")
        cfg.shapes = shapes
    for name in ("batch", "prompt", "new", "adapters", "repeats"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise DlpError(f"--{name} must be >= 1, got {value}")
            setattr(cfg, name, value)
    if cfg.adapters > cfg.pool_slots:
        cfg.pool_slots = cfg.adapters
    if args.scale_only and args.no_scale:
        raise DlpError("--scale-only and --no-scale exclude each other")
    if args.scale_only:
        cfg.scale = cfg.scale_only = True
    if args.no_scale:
        cfg.scale = False
    elif device == "cpu" and args.scale_catalogue:
        cfg.scale = True
    if args.scale_catalogue:
        cfg.scale_catalogue = args.scale_catalogue
    cfg.scale_shape = cfg.shapes[0] if cfg.scale_shape not in cfg.shapes else cfg.scale_shape
    if args.time_limit is not None:
        cfg.time_limit_s = args.time_limit
    elif device == "cpu":
        cfg.time_limit_s = 1800.0
    if args.compile_mode:
        cfg.compile_mode = args.compile_mode
    if args.compile_scope:
        cfg.compile_scope = args.compile_scope
    if args.decode_attention:
        cfg.decode_attention = args.decode_attention
    if args.decode_gemm:
        cfg.decode_gemm = args.decode_gemm
    cfg.overlap_steps = bool(args.overlap_steps)
    if args.residual_norm is not None:
        if args.residual_norm < 0:
            raise DlpError(f"--residual-norm must be >= 0, got {args.residual_norm}")
        cfg.residual_norm_programs = args.residual_norm
    if args.out:
        cfg.out = args.out
    return cfg


def cli_main(args) -> int:
    if args.merge_scale:
        if not args.out:
            raise DlpError("--merge-scale needs --out: the report to add the scale run to")
        out = Path(args.out)
        report = merge_scale(
            json.loads(out.read_text()), json.loads(Path(args.merge_scale).read_text())
        )
        write_report(report, out)
        print(plot(report, out.with_suffix(".png")))
        for line in summary_lines(report):
            print(line)
        return 0
    if args.plot_only:
        path = Path(args.plot_only)
        report = json.loads(path.read_text())
        print(plot(report, path.with_suffix(".png")))
        return 0
    cfg = config_from_args(args)
    report = main(cfg, command=getattr(args, "command_line", None))
    for line in summary_lines(report):
        print(line)
    print(f"wrote {cfg.out}")
    return 0
