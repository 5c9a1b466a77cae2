"""Serving overhead on one GPU: HTTP through the Ray Serve app vs the engine alone, same run.

    python benchmarks/serve_bench.py --tokenizer-dir DIR --out results/serve_h200.json

1. Builds random r=8 q/v adapters (one per pool task) for a Qwen2-1.5B-shaped model with
   random bf16 weights, and an untrained MiniMLP router over them (routing decisions are then
   arbitrary but real: the same code path, the same number of distinct mixes).
2. Serves `deployments.app:build_app` with the documented GPU override (worker num_gpus=1,
   engine on cuda in bf16) and drives it over HTTP, closed loop at saturation
   (dlp.loadgen), recording each request's mix.
3. Shuts Serve down, builds the same engine in this process (the worker's own
   EngineConfig) and replays the same prompts with the same mixes at the same concurrency.
Reports ratio_http_to_engine_throughput (completion tokens/s, HTTP / engine) as JSON + PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _prompts(n: int, words: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    vocab = [
        "the",
        "a",
        "model",
        "adapter",
        "route",
        "serve",
        "token",
        "batch",
        "river",
        "stone",
        "light",
        "paper",
        "window",
    ]
    return [" ".join(rng.choice(vocab) for _ in range(words)) + f" ({i})" for i in range(n)]


def _assets(
    scratch: Path, tokenizer_dir: Path, shape: str, extra_adapters: int = 0
) -> dict[str, str]:
    """Cache dir with the embedded tokenizer, random adapters for ``shape`` (one per pool
    task, which the untrained router picks from, plus ``extra_adapters`` named `extra_NN`
    for explicit mixes), untrained router."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dlp.config import NAMED_SHAPES
    from dlp.data.tasks import POOL
    from dlp.lora.adapter import base_linear_shapes, random_adapter, save_adapter
    from dlp.paths import model_dir
    from dlp.routing.router import MiniMLPRouter, RouterConfig, load_tokenizer

    cache = scratch / "cache"
    tok_dir = model_dir(cache)
    tok_dir.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, tok_dir / name)
    cfg = dict(NAMED_SHAPES[shape])
    model_type = cfg.pop("model_type")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))
    shapes = base_linear_shapes(model)
    names = [spec.name for spec in POOL]
    root = scratch / "adapter_root"
    for i, name in enumerate(names):
        adapter = random_adapter(name, shapes, rank=8, seed=i + 1, b_std=0.02)
        save_adapter(adapter, root / "initial" / name, base_model_name=shape)
    for i in range(len(names), len(names) + extra_adapters):
        adapter = random_adapter(f"extra_{i:02d}", shapes, rank=8, seed=1000 + i, b_std=0.02)
        save_adapter(adapter, root / "initial" / f"extra_{i:02d}", base_model_name=shape)
    tokenizer = load_tokenizer(tok_dir)
    torch.manual_seed(0)
    rcfg = RouterConfig(vocab_size=len(tokenizer), embed_dim=16, hash_buckets=256, hidden=(32,))
    router = MiniMLPRouter(names, tokenizer, rcfg, tokenizer_ref=str(tok_dir))
    return {
        "cache_dir": str(cache),
        "adapters_dir": str(root / "initial"),
        "adapter_root": str(root),
        "router_dir": str(router.save(scratch / "router")),
    }


def _app_args(assets: dict[str, str], a: argparse.Namespace) -> dict[str, Any]:
    # The documented GPU override of serve_config.yaml's args (README "Serving").
    on_gpu = a.device.startswith("cuda")
    return {
        **assets,
        "limits": {
            "max_context_tokens": 2048,
            "max_tokens_cap": 1024,
            "max_queued_requests": 4096,
            "max_adapter_rank": 16,
        },
        "engine": {
            "shape": a.shape,
            "device": a.device,
            "dtype": "bfloat16",
            "max_batch": a.batch,
            "pool_slots": a.slots,
            "admit_min_rows": a.admit_min_rows,
            "admit_max_wait_steps": a.admit_max_wait_steps,
            "overlap_steps": a.overlap_steps,
            "overlap_queue_ahead": a.queue_ahead,
            "spare_rows": a.spare_rows,
            "compile_scope": a.compile_scope,
            "decode_attention": a.decode_attention,
            "decode_gemm": a.decode_gemm,
        },
        "worker": {
            "num_gpus": 1 if on_gpu else 0,
            "num_cpus": 1,
            "max_ongoing_requests": 4 * a.batch,
            "engine_process": a.engine_process,
        },
        "ingress": {"num_replicas": a.ingress_replicas},
    }


COUNTERS = (
    "decode_steps",
    "decode_s",
    "generated_tokens",
    "prefill_calls",
    "prefill_rows",
    "prefill_tokens",
    "prefill_s",
)


def engine_delta(before: dict[str, Any], after: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """What the engine did during one phase: steps, rows per step, prefills and their cost."""
    d = {k: after.get(k, 0) - before.get(k, 0) for k in COUNTERS}
    steps = max(1, d["decode_steps"])
    calls = max(1, d["prefill_calls"])
    return {
        **d,
        "prefill_compiled": after.get("prefill_compiled"),
        "decode_path": after.get("decode_path"),
        "rows_per_step": d["generated_tokens"] / steps,
        "decode_ms_per_step": 1e3 * d["decode_s"] / steps,
        "rows_per_prefill": d["prefill_rows"] / calls,
        "prefill_ms_per_call": 1e3 * d["prefill_s"] / calls,
        "share_prefill": d["prefill_s"] / wall_s,
        "share_decode": d["decode_s"] / wall_s,
    }


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median throughput (the lower middle one of an even count), with
    every run's throughput beside it."""
    ranked = sorted(runs, key=lambda r: r["tokens_per_s"])
    median = dict(ranked[(len(ranked) - 1) // 2])
    median["runs_tokens_per_s"] = [r["tokens_per_s"] for r in runs]
    return median


def _phase(records: list, wall: float, before: dict, after: dict) -> dict[str, Any]:
    from dlp.loadgen import summarize

    tokens = sum(r.completion_tokens for r in records if r.ok)
    return {
        "summary": summarize(records, wall),
        "wall_s": wall,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "errors": sum(1 for r in records if not r.ok),
        "engine_stats": engine_delta(before, after, wall),
    }


async def _handle_load(handle: Any, prompts: list[str], a: argparse.Namespace) -> tuple:
    """Closed loop through the app's Python handle (ingress + router + worker, no HTTP)."""
    from deployments.api_models import GenerateRequest
    from dlp.loadgen import RequestRecord

    work = iter(enumerate(prompts))
    records: list[RequestRecord] = []
    t0 = time.perf_counter()

    async def client() -> None:
        for _, text in work:
            rec = RequestRecord(task="synthetic", stream=False, start=time.perf_counter() - t0)
            try:
                out = await handle.generate.remote(
                    GenerateRequest(model="dlp", prompt=text, max_tokens=a.max_tokens)
                )
                rec.completion_tokens = out.completion_tokens
            except Exception as exc:  # counted, never fatal
                rec.status = type(exc).__name__
            rec.end = time.perf_counter() - t0
            records.append(rec)

    await asyncio.gather(*(client() for _ in range(a.concurrency)))
    return records, time.perf_counter() - t0


def run_http(args_dict: dict[str, Any], prompts: list[str], a: argparse.Namespace) -> dict:
    import ray
    from ray import serve

    from deployments.app import build_app
    from dlp.loadgen import LoadConfig, Prompt, run_load, run_load_processes

    # Logical CPUs: ingress, router, registry and worker each ask for some.
    ray.init(num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": a.port})
    serve.run(build_app(args_dict), name="dlp", route_prefix="/")
    worker = serve.get_deployment_handle("LoraWorker", app_name="dlp")
    url = f"http://127.0.0.1:{a.port}"
    items = [Prompt(task="synthetic", text=t) for t in prompts]
    # Warm-up: every prompt once at low cost, so each adapter the router picks is registered
    # on the worker before the timed phases (the engine-alone run registers all at start).
    warm = LoadConfig(url=url, concurrency=a.batch, max_requests=len(items), max_tokens=2)
    asyncio.run(run_load(warm, items, progress=False))
    cfg = LoadConfig(
        url=url,
        concurrency=a.concurrency,
        max_requests=len(items),
        max_tokens=a.max_tokens,
        timeout_s=600,
        duration_s=3600,
    )
    out: dict[str, Any] = {}
    if a.single_client_phase:
        before = worker.stats.remote().result()
        result = asyncio.run(run_load(cfg, items))
        after = worker.stats.remote().result()
        out["http"] = _phase(result.records, result.wall_s, before, after)
        out["mixes"] = [rec.mix for rec in result.records]
    if a.client_procs > 1:
        # The same requests from several client processes: one Python HTTP client is itself
        # a bottleneck at a few hundred connections. Repeated: runs through a server spread
        # by about +-6% (session 6), as much as the changes being measured.
        runs = []
        for _ in range(a.repeats):
            before = worker.stats.remote().result()
            procs_cfg = cfg.model_copy(update={"processes": a.client_procs})
            procs = run_load_processes(procs_cfg, items)
            after = worker.stats.remote().result()
            runs.append(_phase(procs.records, procs.wall_s, before, after))
            runs[-1]["client_procs"] = a.client_procs
            # The engine-alone run replays the mixes the router chose; any HTTP phase has them.
            out.setdefault("mixes", [rec.mix for rec in procs.records])
        out["http_procs"] = _median_run(runs)
    if a.handle_phase:
        app = serve.get_app_handle("dlp")
        before = worker.stats.remote().result()
        records, wall = asyncio.run(_handle_load(app, prompts, a))
        after = worker.stats.remote().result()
        out["app_handle"] = _phase(records, wall, before, after)
    serve.shutdown()
    ray.shutdown()
    return out


def run_engine(args_dict: dict, prompts: list[str], mixes: list, a: argparse.Namespace) -> dict:
    """The worker's engine in this process, same prompts and mixes, same concurrency.

    ``engine``: every client sends its next request the moment its last one ends (what an
    in-process caller does). ``engine_jitter*``: each client waits 0-``--jitter-ms`` first, as
    answers and new requests do through a server, with the configured admission and with
    admit-each (the engine before grouped admission), to show what staggered arrivals cost.
    """
    import random

    from deployments.worker import engine_config_dict
    from dlp.config import load_app_config
    from dlp.engine.config import EngineConfig
    from dlp.engine.engine import Engine
    from dlp.engine.types import GenerationRequest, SamplingParams
    from dlp.routing.mix import AdapterMix

    cfg = load_app_config(args_dict)
    econf = EngineConfig(**engine_config_dict(cfg), adapter_root=cfg.adapters_dir)
    configured = (econf.admit_min_rows, econf.admit_max_wait_steps)

    async def go() -> dict[str, Any]:
        sampling = SamplingParams(max_tokens=a.max_tokens)
        ids = iter(range(10**9))

        async def one(engine: Any, i: int, text: str, max_tokens: int | None = None) -> int:
            mix = AdapterMix.from_weights(mixes[i % len(mixes)] or {})
            req = GenerationRequest(
                request_id=f"e{next(ids)}",
                mix=mix,
                prompt=text,
                sampling=SamplingParams(max_tokens=max_tokens) if max_tokens else sampling,
            )
            res = await engine.generate(req)
            return res.completion_tokens

        async def phase(engine: Any, jitter_ms: float) -> dict[str, Any]:
            rng = random.Random(1)
            work = iter(enumerate(prompts))
            counts: list[int] = []

            async def client() -> None:
                for i, text in work:
                    if jitter_ms:
                        await asyncio.sleep(rng.uniform(0, jitter_ms) / 1e3)
                    counts.append(await one(engine, i, text))

            before = engine.stats()
            t0 = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(a.concurrency)))
            wall = time.perf_counter() - t0
            tokens = sum(counts)
            return {
                "wall_s": wall,
                "completion_tokens": tokens,
                "tokens_per_s": tokens / wall,
                "engine_stats": engine_delta(before, engine.stats(), wall),
            }

        async def warm(engine: Any) -> None:
            await asyncio.gather(*(one(engine, i, t, 8) for i, t in enumerate(prompts[: a.batch])))

        engine = Engine.from_config(econf)
        await engine.start()
        await warm(engine)
        out = {"engine": _median_run([await phase(engine, 0.0) for _ in range(a.repeats)])}
        if a.jitter_ms:
            out["engine_jitter"] = await phase(engine, a.jitter_ms)
            econf.admit_min_rows, econf.admit_max_wait_steps = 1, 0
            out["engine_jitter_admit_each"] = await phase(engine, a.jitter_ms)
            econf.admit_min_rows, econf.admit_max_wait_steps = configured
        await engine.stop()
        del engine
        if cfg.worker.uses_engine_process(econf.device):
            # The same engine in a child process, with no server around it: what the process
            # boundary itself costs, apart from Serve.
            from dlp.engine.engine_process import EngineProcess

            child = EngineProcess(econf)
            await child.start()
            await warm(child)
            runs = [await phase(child, 0.0) for _ in range(a.repeats)]
            out["engine_in_child"] = _median_run(runs)
            await child.stop()
        return out

    return asyncio.run(go())


def plot(report: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # label, report key, colour: each phase keeps its colour whichever phases ran.
    phases = [
        ("engine alone", "engine", "#888"),
        ("HTTP, 1 proc", "http", "#9c9"),
        ("HTTP, N procs", "http_procs", "#3a7"),
        ("Python handle", "app_handle", "#38c"),
        ("engine, child proc", "engine_in_child", "#bbb"),
    ]
    shown = [(label, key, colour) for label, key, colour in phases if key in report]
    vals = [report[key]["tokens_per_s"] for _, key, _ in shown]
    fig, ax = plt.subplots(figsize=(7.5, 3.5))
    ax.bar([label for label, *_ in shown], vals, color=[colour for *_, colour in shown])
    engine = report["engine"]["tokens_per_s"]
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v / engine:.3f}", ha="center", va="bottom")
    ax.set_ylabel("completion tokens / s")
    ax.set_title(
        f"{report['shape']}, {report['requests']} requests, concurrency {report['concurrency']}"
        "\n(labels: throughput / engine alone)"
    )
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer-dir", type=Path, required=True)
    p.add_argument("--shape", default="qwen2-1.5b")
    p.add_argument("--batch", type=int, default=64, help="engine max_batch (rows)")
    p.add_argument("--slots", type=int, default=32, help="adapter pool slots")
    p.add_argument("--concurrency", type=int, default=128, help="clients in flight")
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-words", type=int, default=100)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke run")
    p.add_argument(
        "--ingress-replicas", type=int, default=1, help="Ingress replicas (FastAPI, CPU)"
    )
    p.add_argument(
        "--admit-min-rows",
        type=int,
        default=None,
        help="engine.admit_min_rows (default: the engine's, max_batch // 8)",
    )
    p.add_argument("--admit-max-wait-steps", type=int, default=16)
    p.add_argument(
        "--overlap-steps",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="engine.overlap_steps: queue step N+1 before handling step N's tokens"
        " (default: the engine's, on for CUDA)",
    )
    p.add_argument(
        "--spare-rows",
        type=int,
        default=0,
        help="engine.spare_rows: KV cache rows that requests are prefilled into ahead",
    )
    p.add_argument(
        "--queue-ahead",
        action="store_true",
        help="engine.overlap_queue_ahead: queue step N+1 before step N has finished",
    )
    p.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="worker.engine_process: the worker's engine in a child process (no GIL shared"
        " with Serve's threads; the app's default, null, turns it on with a CUDA engine); the"
        " engine-alone phase stays in this process, and with the child an engine_in_child"
        " phase runs the same engine alone in a child process",
    )
    p.add_argument("--compile-scope", choices=("auto", "layer", "step"), default="auto")
    p.add_argument(
        "--decode-attention", choices=("auto", "matmul", "triton", "triton_rope"), default="auto"
    )
    p.add_argument(
        "--decode-gemm", choices=("auto", "cublas", "triton", "triton_pdl"), default="auto"
    )
    p.add_argument(
        "--client-procs",
        type=int,
        default=4,
        help="also run the HTTP load from this many client processes (1: skip)",
    )
    p.add_argument(
        "--jitter-ms",
        type=float,
        default=10.0,
        help="engine-alone phases with 0..this ms between a client's requests (0: skip)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run the HTTP (client processes) and engine-alone phases this many times each;"
        " the report keeps the median run and lists every run's tokens/s",
    )
    p.add_argument(
        "--no-single-client-phase",
        dest="single_client_phase",
        action="store_false",
        help="skip the HTTP load from one client process (client-bound at high concurrency)",
    )
    p.add_argument(
        "--no-handle-phase",
        dest="handle_phase",
        action="store_false",
        help="skip the closed loop through the app's Python handle",
    )
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error("--repeats must be 1 or more")
    if not a.single_client_phase and a.client_procs < 2:
        p.error("--no-single-client-phase needs --client-procs of 2 or more: no HTTP phase left")
    prompts = _prompts(a.requests, a.prompt_words, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        assets = _assets(Path(tmp), a.tokenizer_dir, a.shape)
        args_dict = _app_args(assets, a)
        http = run_http(args_dict, prompts, a)
        engines = run_engine(args_dict, prompts, http.pop("mixes"), a)
        engine = engines.pop("engine")
    import torch

    report = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.node(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "shape": a.shape,
        "requests": a.requests,
        "concurrency": a.concurrency,
        "max_tokens": a.max_tokens,
        "app_args": {k: v for k, v in args_dict.items() if k in ("engine", "worker", "ingress")},
        "engine": engine,
        **engines,
    }
    if "http" in http:
        report["http"] = http.pop("http")
        report["ratio_http_to_engine_throughput"] = (
            report["http"]["tokens_per_s"] / engine["tokens_per_s"]
        )
    if "http_procs" in http:
        report["http_procs"] = http.pop("http_procs")
        report["ratio_http_procs_to_engine_throughput"] = (
            report["http_procs"]["tokens_per_s"] / engine["tokens_per_s"]
        )
        # Each HTTP run against the median engine-alone run (with --repeats > 1).
        report["ratio_http_procs_to_engine_per_run"] = [
            t / engine["tokens_per_s"] for t in report["http_procs"]["runs_tokens_per_s"]
        ]
    if "engine_in_child" in report:
        report["ratio_engine_in_child_to_engine_throughput"] = (
            report["engine_in_child"]["tokens_per_s"] / engine["tokens_per_s"]
        )
    if "app_handle" in http:
        report["app_handle"] = http.pop("app_handle")
        report["ratio_handle_to_engine_throughput"] = (
            report["app_handle"]["tokens_per_s"] / engine["tokens_per_s"]
        )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2))
    plot(report, a.out.with_suffix(".png"))
    keys = (
        "ratio_http_to_engine_throughput",
        "ratio_http_procs_to_engine_throughput",
        "ratio_http_procs_to_engine_per_run",
        "ratio_handle_to_engine_throughput",
        "ratio_engine_in_child_to_engine_throughput",
    )
    print(json.dumps({k: report[k] for k in keys if k in report}, indent=2))
    phases = ("http", "http_procs", "app_handle", "engine", "engine_in_child", "engine_jitter")
    for name in (*phases, "engine_jitter_admit_each"):
        if name in report:
            st = report[name]["engine_stats"]
            print(
                f"{name:26s} {report[name]['tokens_per_s']:9.0f} tok/s  rows/step"
                f" {st['rows_per_step']:5.1f}  step {st['decode_ms_per_step']:.2f} ms  prefills"
                f" {st['prefill_calls']} x {st['rows_per_prefill']:.1f} rows,"
                f" {st['prefill_ms_per_call']:.1f} ms, {100 * st['share_prefill']:.0f}% of wall"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
