"""One decode step of the engine against its memory floor, for several ways of compiling it.

    python benchmarks/decode_step_bench.py --device cuda --out results/decode_step_h200.json

Issue 4 asks for a decode step of the base model (variant (a) of the fusion benchmark:
batch 64, context 128 + 128) within 2x the HBM floor ((weight bytes + KV bytes read) / 4.3
TB/s). At the Qwen2-1.5B shape a step is bound by kernel count and small-GEMM efficiency,
not bytes, so this compares, in one process on one model:

- ``compile_scope``: one compiled block for every layer, or the whole step as one graph;
- ``attention``: two GEMMs + softmax over the whole static cache, or the length-aware
  Triton kernel (``dlp.engine.decode_attention``), also with the rotary embedding and the
  KV-cache write inside it (``triton_rope``: the compiled step's two rope and cache-write
  kernels a layer, 80 us of a 1.9 ms step on the H200, are gone);
- ``compile_mode``: Inductor's default, or ``max-autotune-no-cudagraphs``;
- ``gemm``: cuBLAS (``F.linear``), or the weight-streaming Triton GEMMs
  (``dlp.engine.skinny_gemm``, silu * up fused into gate/up), also with every kernel of the
  step a programmatic dependent launch (``triton_pdl``, which also fuses the post-attention
  norm into the o and gate/up GEMMs; ``+unfused`` keeps its kernel; by default o writes its
  rows times the norm weight and gate/up applies the rstd after its product, which
  ``+unprescaled`` turns off: gate/up then normalises each x tile it loads).

``--gemm-configs`` takes the GEMM configs a ``pdl_bench.py --sweep`` run found; a variant
name may also carry one GEMM's config for itself, ``+ROLE=BNxBKxSPLITxWARPSxSTAGES`` with ROLE
one of ``qkv``, ``qkvl`` (q/k/v with the LoRA A rows), ``o``, ``gu``, ``down`` (e.g.
``step+rope+pdl+gu=64x64x1x4x5``), to compare configs inside the real step.

Each variant is captured as the engine's CUDA graph and timed by CUDA events (median of
``--iters`` replays) with and without the LoRA path, on the same random KV cache, its logits
compared with the first variant's. A profile of graph replays lists each variant's kernels
per step, and a timeline of one replay from the profiler's trace: each kernel's start, end
and the time it adds to the step (its end minus the previous kernel's end), summed per
kernel of the layer (the layers' kernels repeat around the attention kernel).
``--interleave N`` keeps every variant's graph and times step (a) again in N alternating
rounds, so that variants are also compared under the same conditions (the GPU's state drifts
over a run: one variant timed first and last can differ by a few percent).
JSON + PNG.
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

# name -> (compile_scope, compile_mode, attention, gemm)
VARIANTS: dict[str, tuple[str, str | None, str, str]] = {
    "layer": ("layer", None, "matmul", "cublas"),
    "layer+gemm": ("layer", None, "matmul", "triton"),
    "layer+kernel+gemm": ("layer", None, "triton", "triton"),
    "step+kernel+gemm": ("step", None, "triton", "triton"),
    "layer+kernel": ("layer", None, "triton", "cublas"),
    "step+kernel": ("step", None, "triton", "cublas"),
    # Rotary embedding and the KV-cache write inside the attention kernel (decode_attention_rope).
    "layer+rope": ("layer", None, "triton_rope", "cublas"),
    "step+rope": ("step", None, "triton_rope", "cublas"),
    "step+rope+gemm": ("step", None, "triton_rope", "triton"),
    # Every kernel a programmatic dependent launch: ours through their ops, Inductor's by its
    # triton.enable_pdl option (benchmarks/pdl_bench.py measures the GEMM chain alone).
    "step+rope+pdl": ("step", None, "triton_rope", "triton_pdl"),
    "layer+rope+pdl": ("layer", None, "triton_rope", "triton_pdl"),
    # PDL with the norm kernels (the runner fuses them into the GEMMs with triton_pdl).
    "step+rope+pdl+unfused": ("step", None, "triton_rope", "triton_pdl"),
    "step+rope+pdl+prescaled": ("step", None, "triton_rope", "triton_pdl"),
    "step+rope+pdl+unprescaled": ("step", None, "triton_rope", "triton_pdl"),
    "step": ("step", None, "matmul", "cublas"),
    "layer+kernel+autotune": ("layer", "max-autotune-no-cudagraphs", "triton", "cublas"),
    "step+kernel+autotune": ("step", "max-autotune-no-cudagraphs", "triton", "cublas"),
}


GEMM_ROLES = ("qkv", "qkvl", "o", "gu", "down")


def split_variant(name: str) -> tuple[str, dict[str, Any]]:
    """``base+role=BNxBKxSPLITxWxS...`` -> (base variant, {role: GemmConfig}); a part
    ``argmax=CHUNKSxBLOCK`` sets the greedy kernels' pieces a row and logits a load
    (``dlp.engine.greedy_kernel``), as ``{"argmax": (chunks, block)}``, and
    ``attn=BLOCKNxWARPSxSTAGES`` the attention kernel's launch (``{"attn": (64, 4, 3)}``),
    ``packed=gu.down`` the GEMMs whose weights are packed K step by K step
    (``runner.PACKED_WEIGHTS``, ``{"packed": ("gu", "down")}``; ``packed=``: none);
    ``norm=N`` the residual add + norm kernel's programs a row (``residual_norm.SPLIT_N``, 0:
    Inductor's kernel) and ``blas=cublas`` the BLAS library of the lm_head GEMM (torch's
    ``preferred_blas_library``)."""
    from dlp.engine.skinny_gemm import GemmConfig

    parts = name.split("+")
    overrides: dict[str, Any] = {}
    for part in [p for p in parts if "=" in p]:
        role, _, spec = part.partition("=")
        if role == "packed":
            roles = tuple(spec.split(".")) if spec else ()
            if not set(roles) <= set(GEMM_ROLES) - {"qkvl"} or len(set(roles)) != len(roles):
                raise ValueError(f"{part!r}: want packed=ROLE[.ROLE...], ROLE in qkv, o, gu, down")
            overrides[role] = roles
            continue
        if role == "norm":
            if not spec.isdigit():
                raise ValueError(f"{part!r}: want norm=PROGRAMS_A_ROW (0: Inductor's kernel)")
            overrides[role] = int(spec)
            continue
        if role == "blas":
            if spec not in ("cublas", "cublaslt"):
                raise ValueError(f"{part!r}: want blas=cublas or blas=cublaslt")
            overrides[role] = spec
            continue
        if role in ("argmax", "attn"):
            sizes = spec.split("x")
            want = 2 if role == "argmax" else 3
            if len(sizes) != want or not all(v.isdigit() and int(v) > 0 for v in sizes):
                form = "CHUNKSxBLOCK" if role == "argmax" else "BLOCKNxWARPSxSTAGES"
                raise ValueError(f"{part!r}: want {role}={form}, ints > 0")
            overrides[role] = tuple(int(v) for v in sizes)
            continue
        if role not in GEMM_ROLES:
            raise ValueError(f"{part!r}: want ROLE=BNxBKxSPLITxWARPSxSTAGES, ROLE in {GEMM_ROLES}")
        overrides[role] = GemmConfig.parse(spec)
    return "+".join(p for p in parts if "=" not in p), overrides


def _fill_cache(model: Any, seed: int) -> None:
    """The same random K/V in every variant's cache, so their logits are comparable."""
    import torch

    gen = torch.Generator(device=model.k_caches[0].device).manual_seed(seed)
    for cache in model.k_caches + model.v_caches:
        cache.copy_(torch.randn(cache.shape, generator=gen, device=cache.device) * 0.5)


def _time_step(runner: Any, rows: int, lora: bool, iters: int) -> float:
    import torch

    times = []
    for _ in range(iters + 3):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        runner.step(rows, lora=lora)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[3:])


def _profile(runner: Any, rows: int, steps: int = 5) -> dict[str, Any]:
    """Kernels of ``steps`` graph replays of the base step: per-step count and time, and the
    timeline of the last replay (:func:`step_timeline`)."""
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            runner.step(rows, lora=False)
        torch.cuda.synchronize()
    kernels = [
        e
        for e in prof.key_averages()
        if (getattr(e, "device_time_total", 0) or 0) > 0 and e.cpu_time_total == 0
    ]
    kernels.sort(key=lambda e: e.device_time_total, reverse=True)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    return {
        "kernels_per_step": sum(e.count for e in kernels) / steps,
        "kernel_ms_per_step": sum(e.device_time_total for e in kernels) / steps / 1e3,
        "top": [
            {
                "name": e.key[:100],
                "per_step": e.count / steps,
                "us_per_step": e.device_time_total / steps,
            }
            for e in kernels[:25]
        ],
        "timeline": step_timeline(events, steps),
    }


def step_timeline(events: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """The GPU kernels of the last of ``steps`` equal replays in a chrome trace: each
    kernel's start and end (us from the step's first kernel), and ``added_us``, how much it
    moves the step's end (its end minus the latest end before it; under PDL a kernel starts
    before its predecessor ends, so durations overlap and do not add up). ``by_position``
    sums them per kernel of the layer: a kernel's position is its distance from the last
    attention kernel before it (``pre``: before the first), so each layer's q/k/v GEMM, o
    GEMM, ... land in one row each."""
    kernels = sorted(
        (e for e in events if e.get("cat") == "kernel" and e.get("ph") == "X"),
        key=lambda e: e["ts"],
    )
    per_step = len(kernels) // steps if steps else 0
    last = kernels[len(kernels) - per_step :] if per_step else []
    if not last:
        return {"kernels": [], "by_position": {}}
    t0 = last[0]["ts"]
    rows, latest_end, since_attention = [], t0, None
    by_position: dict[str, dict[str, float]] = {}
    for e in last:
        name = e["name"]
        if "attn" in name:
            since_attention = 0
        elif since_attention is not None:
            since_attention += 1
        end = e["ts"] + e["dur"]
        added = max(0.0, end - latest_end)
        latest_end = max(latest_end, end)
        grid = e.get("args", {}).get("grid")
        rows.append(
            {
                "name": name[:60],
                "grid": grid,
                "start_us": round(e["ts"] - t0, 2),
                "end_us": round(end - t0, 2),
                "added_us": round(added, 2),
            }
        )
        position = "pre" if since_attention is None else str(since_attention)
        key = f"{position}:{name[:40]}:{grid}"
        slot = by_position.setdefault(key, {"count": 0, "added_us": 0.0, "dur_us": 0.0})
        slot["count"] += 1
        slot["added_us"] += added
        slot["dur_us"] += e["dur"]
    return {"step_us": round(latest_end - t0, 2), "kernels": rows, "by_position": by_position}


def _variant(
    name: str,
    hf_model: Any,
    lora: dict,
    a: argparse.Namespace,
    compile_: bool = True,
) -> tuple[dict[str, Any], Any, Any]:
    import torch

    from dlp.engine import decode_attention as da
    from dlp.engine import greedy_kernel as gk
    from dlp.engine import residual_norm as rn
    from dlp.engine import runner as runner_mod
    from dlp.engine import skinny_gemm as sg
    from dlp.engine.shapes import decode_gemm_shapes

    base, overrides = split_variant(name)
    argmax = overrides.pop("argmax", (gk.CHUNKS, gk.BLOCK))
    packed = overrides.pop("packed", runner_mod.PACKED_WEIGHTS)
    split_n = overrides.pop("norm", rn.SPLIT_N)
    blas = overrides.pop("blas", None)
    attn_launch = da.DEFAULT_LAUNCH
    if "attn" in overrides:
        attn_launch = da.LaunchConfig(*overrides.pop("attn"))
    # LoRA A rows: q and v, r each per slot
    keys = decode_gemm_shapes(hf_model.config.to_dict(), 2 * a.slots * a.rank)
    measured = dict(sg.MEASURED)
    greedy = gk.CHUNKS, gk.BLOCK
    # Configs are read when the step is traced (in _capture, and any lazy compile after it);
    # the greedy kernels' sizes when the graph captures their launch.
    sg.MEASURED.update({keys[role]: cfg for role, cfg in overrides.items()})
    gk.CHUNKS, gk.BLOCK = argmax
    launch, da.DEFAULT_LAUNCH = da.DEFAULT_LAUNCH, attn_launch
    packed, runner_mod.PACKED_WEIGHTS = runner_mod.PACKED_WEIGHTS, packed
    split_n, rn.SPLIT_N = rn.SPLIT_N, split_n
    library = torch.backends.cuda.preferred_blas_library()
    if blas is not None:
        torch.backends.cuda.preferred_blas_library(blas)
    try:
        return _build_and_time(name, base, hf_model, lora, a, compile_)
    finally:
        torch.backends.cuda.preferred_blas_library(library)
        rn.SPLIT_N = split_n
        sg.MEASURED.clear()
        sg.MEASURED.update(measured)
        gk.CHUNKS, gk.BLOCK = greedy
        da.DEFAULT_LAUNCH = launch
        runner_mod.PACKED_WEIGHTS = packed


def _build_and_time(
    name: str, base: str, hf_model: Any, lora: dict, a: argparse.Namespace, compile_: bool
) -> tuple[dict[str, Any], Any, Any]:
    import torch

    from dlp.engine.model import CompactLM
    from dlp.engine.runner import DecodeRunner

    scope, mode, attention, gemm = VARIANTS[base]
    torch._dynamo.reset()  # each variant compiles from scratch, no cache-limit recompiles
    model = CompactLM(hf_model, a.batch, a.max_seq_len, lora)
    runner = DecodeRunner(
        model,
        n_slots=a.slots,
        compile=compile_,
        cuda_graph=True,
        compile_mode=mode,
        compile_scope=scope,
        attention=attention,
        gemm=gemm,
    )
    if "unfused" in name.split("+"):
        model.decode_fuse_norms = False
    if "prescaled" in name.split("+"):
        model.decode_prescale_norm = model.decode_fuse_norms
    if "unprescaled" in name.split("+"):
        model.decode_prescale_norm = False
    start = time.perf_counter()
    with torch.no_grad():
        runner._capture()
    out: dict[str, Any] = {
        "compile_scope": scope,
        "compile_mode": mode,
        "attention": attention,
        "attn_splits": model.attn_splits,
        "gemm": gemm,
        "decode_gemm": model.decode_gemm,
        "decode_pdl": model.decode_pdl,
        "decode_fuse_norms": model.decode_fuse_norms,
        "decode_packed": list(model.decode_packed),
        "compile_capture_s": time.perf_counter() - start,
        "compile_failed": runner.compile_failed,
    }
    _fill_cache(model, a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    runner.tokens.copy_(torch.randint(0, model.shape.vocab, (a.batch,), generator=gen))
    for key, position in (("", a.position), ("_full_cache", a.max_seq_len - 1)):
        runner.positions.fill_(position)
        out[f"a_ms{key}"] = _time_step(runner, a.batch, False, a.iters)
        out[f"c_ms{key}"] = _time_step(runner, a.batch, True, a.iters)
    runner.positions.fill_(a.position)
    logits, _ = runner.step(a.batch, lora=False)
    return out, logits.float().clone(), runner


def interleaved_times(runners: dict[str, Any], rows: int, rounds: int, iters: int) -> dict:
    """Each variant's step (a) timed again in ``rounds`` alternating rounds: per variant the
    median of its round medians (ms) and the rounds themselves."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            times[name].append(_time_step(runner, rows, False, iters))
    return {n: {"a_ms": statistics.median(t), "rounds": t} for n, t in times.items()}


def _use_gemm_configs(path: Path) -> dict[str, Any]:
    """Put the GEMM configs of a pdl_bench.py sweep (``sweep.best``: per role its (n, k,
    silu) and config) into skinny_gemm's table of measured configs, for this process."""
    from dlp.engine import skinny_gemm as sg

    best = json.loads(path.read_text())["sweep"]["best"]
    for entry in best.values():
        n, k, silu = entry["nk_silu"]
        config = {key: v for key, v in entry.items() if key != "nk_silu"}
        sg.MEASURED[(n, k, bool(silu))] = sg.GemmConfig(**config)
    return {"source": str(path), **best}


def plot(report: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, v in report["variants"].items() if "a_ms" in v]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    xs = range(len(names))
    width = 0.38
    a_ms = [report["variants"][n]["a_ms"] for n in names]
    c_ms = [report["variants"][n]["c_ms"] for n in names]
    ax.bar([x - width / 2 for x in xs], a_ms, width, label="(a) base")
    ax.bar([x + width / 2 for x in xs], c_ms, width, label="(c) LoRA path")
    floor = report["floor_ms"]
    ax.axhline(floor, color="k", lw=1, label=f"HBM floor {floor:.2f} ms")
    ax.axhline(2 * floor, color="r", lw=1, ls="--", label="2x floor (target)")
    ax.set_xticks(list(xs), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("ms per decode step (graph replay)")
    ax.set_title(
        f"{report['shape']}, batch {report['batch']}, context {report['position'] + 1}"
        f" ({report['machine']})",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen2-1.5b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=256, help="prompt 128 + 128 new")
    p.add_argument(
        "--position", type=int, default=192, help="every row's position: the mean context"
    )
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    p.add_argument("--profile", default="layer", help="comma-separated variants to profile")
    p.add_argument("--time-limit", type=float, default=480.0, help="skip variants after this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--gemm-configs",
        type=Path,
        help="a pdl_bench.py report: its sweep's GEMM configs replace skinny_gemm.MEASURED's",
    )
    p.add_argument(
        "--interleave",
        type=int,
        default=0,
        help="keep the variants' graphs and re-time step (a) in this many alternating rounds",
    )
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    try:
        unknown = [n for n in a.variants.split(",") if n and split_variant(n)[0] not in VARIANTS]
    except ValueError as exc:
        p.error(str(exc))
    if unknown:
        p.error(f"unknown variants {unknown} (known: {', '.join(VARIANTS)})")

    import torch
    from tqdm.auto import tqdm

    from dlp.engine.bench_fusion import HBM_BYTES_PER_S, bench_pool, build_model

    if not torch.cuda.is_available() or not a.device.startswith("cuda"):
        p.error("the decode step is timed as a CUDA graph: needs --device cuda and a GPU")
    gemm_configs = _use_gemm_configs(a.gemm_configs) if a.gemm_configs else None
    t0 = time.perf_counter()
    device = torch.device(a.device)
    hf_model, _ = build_model(a.shape, device, torch.bfloat16, a.seed)
    pool = bench_pool(hf_model, a.rank, a.slots, host_budget_bytes=1 << 30)
    lora = {m: (pool.a_stack(m), pool.b_stack(m)) for m in pool.modules}
    weight_bytes = sum(q.numel() * q.element_size() for q in hf_model.parameters())
    cfg = hf_model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2
    kv_bytes = a.batch * (a.position + 1) * kv_per_token
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "shape": a.shape,
        "batch": a.batch,
        "max_seq_len": a.max_seq_len,
        "position": a.position,
        "weight_bytes": weight_bytes,
        "kv_bytes_per_step": kv_bytes,
        "floor_ms": 1e3 * (weight_bytes + kv_bytes) / HBM_BYTES_PER_S,
        "gemm_configs": gemm_configs,
        "variants": {},
        "profiles": {},
        "skipped": [],
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    reference = None
    names = [n for n in a.variants.split(",") if n]
    profiled = set(a.profile.split(","))
    kept: dict[str, Any] = {}  # runners kept for --interleave
    for name in tqdm(names, desc="decode step variants"):
        if time.perf_counter() - t0 > a.time_limit:
            report["skipped"].append(name)
            continue
        try:
            out, logits, runner = _variant(name, hf_model, lora, a)
        except Exception as exc:  # one variant failing must not lose the others' numbers
            report["variants"][name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"{name}: failed: {exc}", flush=True)
            continue
        if reference is None:
            reference = logits
        out["max_abs_logit_diff_vs_first"] = float((logits - reference).abs().max())
        out["argmax_agreement_vs_first"] = float(
            (logits.argmax(-1) == reference.argmax(-1)).float().mean()
        )
        out["a_to_floor"] = out["a_ms"] / report["floor_ms"]
        report["variants"][name] = out
        print(
            f"{name}: a {out['a_ms']:.3f} ms ({out['a_to_floor']:.2f}x floor), c"
            f" {out['c_ms']:.3f} ms; full cache a {out['a_ms_full_cache']:.3f};"
            f" compile {out['compile_capture_s']:.0f} s;"
            f" diff {out['max_abs_logit_diff_vs_first']:.3g}",
            flush=True,
        )
        if name in profiled:
            report["profiles"][name] = _profile(runner, a.batch)
        if a.interleave:  # (its positions are left at --position by _variant)
            kept[name] = runner
        del runner  # its caches and graphs (unless kept)
        torch.cuda.empty_cache()
        a.out.write_text(json.dumps(report, indent=2))  # kept if a later compile runs over
    if len(kept) > 1:
        report["interleaved"] = interleaved_times(kept, a.batch, a.interleave, a.iters)
        for name, v in report["interleaved"].items():
            v["a_to_floor"] = v["a_ms"] / report["floor_ms"]
            print(f"interleaved {name}: a {v['a_ms']:.3f} ms ({v['a_to_floor']:.3f}x floor)")
    kept.clear()
    timed = {n: v for n, v in report["variants"].items() if "a_ms" in v}
    if timed:
        best = min(timed, key=lambda n: timed[n]["a_ms"])
        report["best"] = best
        report["best_a_to_floor"] = timed[best]["a_to_floor"]
    a.out.write_text(json.dumps(report, indent=2))
    if timed:
        plot(report, a.out.with_suffix(".png"))
    for name, prof in report["profiles"].items():
        print(
            f"-- {name}: {prof['kernels_per_step']:.0f} kernels, "
            f"{prof['kernel_ms_per_step']:.3f} ms of kernels per step"
        )
        for k in prof["top"][:15]:
            print(f"  {k['us_per_step']:8.1f} us {k['per_step']:5.0f}x {k['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
