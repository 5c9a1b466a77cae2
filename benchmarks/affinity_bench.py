"""Adapter-aware request routing vs Serve's default router, side by side in one run (issue 9).

    PYTHONPATH=. .venv/bin/python benchmarks/affinity_bench.py         # CPU: embedded SmolLM2
    # GPU (2 GPUs: 2 apps x 2 workers x 0.5 GPU), Qwen2-1.5B shape with random weights:
    PYTHONPATH=. python3 benchmarks/affinity_bench.py --model-shape qwen2-1.5b \
        --tokenizer-dir DIR --worker-num-gpus 0.5 --worker-num-cpus 1 --ray-num-cpus 16 \
        --engine-device cuda --engine-dtype bfloat16 --max-batch 32 --pool-slots 8 \
        --max-ongoing-requests 64 --spill-queue-len 32 --requests 2000 --concurrency 64 \
        --max-tokens 16 --out $OUT/affinity_gpu.json

One local Ray cluster holds two copies of `deployments.app:build_app` (apps `affinity` and
`default`, route prefixes /affinity and /default), identical except `worker.request_router`:
the adapter-affinity router (deployments/request_router.py) vs Serve's own
power-of-two-choices router. Each app has 2 LoRA worker replicas whose adapter pool holds
fewer slots than there are adapters, so a replica that sees many different adapters evicts
and reloads them.

Workload: a seeded Zipf distribution (exponent s) over a fixed list of explicit mixes of
1..max_mix adapters; the same request sequence goes to both apps at the same time (two
closed loops, same concurrency, so both compete for the same cores), as
`adapters: {name: weight}` over HTTP, EOS ignored so every request does the same work.

Measured per app: adapter loads into device slots (each worker replica's pool counters,
read through `LoraWorker.stats` before and after the load; the difference), loads per
request, slot hits, evictions, disk reads (host tier loads), requests and distinct adapters
per replica, throughput, latency p50/p99, errors. JSON + PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # cluster/ and benchmarks/ helpers are imported from the root
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")

OUT = ROOT / "benchmarks" / "results" / "affinity_cpu.json"
ROUTERS = ("adapter_affinity", "default")
APP_NAMES = {"adapter_affinity": "affinity", "default": "default"}


# --- workload --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    mixes: list[dict[str, float]]  # mix rank k (0 = most popular) -> {adapter: weight}
    probs: list[float]  # Zipf probability of each rank
    sequence: list[int]  # mix rank of each request, in sending order
    prompts: list[str]  # one per request


def zipf_workload(
    adapters: list[str], n_mixes: int, max_mix: int, s: float, n_requests: int, seed: int
) -> Workload:
    """Distinct random mixes of 1..max_mix adapters, ranked; request i uses rank k with
    probability proportional to 1 / (k+1)^s."""
    from benchmarks.serve_bench import _prompts

    rng = random.Random(seed)
    mixes: list[dict[str, float]] = []
    seen: set[tuple[str, ...]] = set()
    # Every adapter appears in some mix first (the catalogue is all in use), then random mixes.
    order = adapters[:]
    rng.shuffle(order)
    while len(mixes) < n_mixes:
        size = rng.randint(1, min(max_mix, len(adapters)))
        if order:
            names = tuple(sorted(order[:size]))
            order = order[size:]
        else:
            names = tuple(sorted(rng.sample(adapters, size)))
        if names in seen:
            continue
        seen.add(names)
        weights = [rng.uniform(0.2, 1.0) for _ in names]
        total = sum(weights)
        mixes.append({n: round(w / total, 3) for n, w in zip(names, weights, strict=True)})
    rng.shuffle(mixes)  # popularity unrelated to the construction order
    raw = [1.0 / (k + 1) ** s for k in range(n_mixes)]
    probs = [r / sum(raw) for r in raw]
    sequence = rng.choices(range(n_mixes), weights=probs, k=n_requests)
    return Workload(mixes, probs, sequence, _prompts(n_requests, 12, seed))


# --- apps ------------------------------------------------------------------------------------


def make_assets(scratch: Path, n_adapters: int, a: argparse.Namespace) -> tuple[dict, list[str]]:
    """Random r=8 PEFT adapters + an untrained router, from the existing helpers: the embedded
    model (cluster/autoscale_harness.py) or a named shape (benchmarks/serve_bench.py)."""
    if a.model_shape:
        from benchmarks.serve_bench import _assets
        from dlp.data.tasks import POOL

        if a.tokenizer_dir is None:
            raise SystemExit("--model-shape needs --tokenizer-dir (the embedded tokenizer files)")
        names = [spec.name for spec in POOL]
        if n_adapters > len(names):
            raise SystemExit(f"--adapters: at most {len(names)} with --model-shape")
        return _assets(scratch, a.tokenizer_dir, a.model_shape), names[:n_adapters]
    from cluster.autoscale_harness import _quick_assets

    names = [f"adapter_{i:02d}" for i in range(n_adapters)]
    return _quick_assets(scratch, names), names


def app_args(assets: dict[str, str], router: str, a: argparse.Namespace) -> dict[str, Any]:
    engine: dict[str, Any] = {
        "device": a.engine_device,
        "dtype": a.engine_dtype,
        "max_batch": a.max_batch,
        "pool_slots": a.pool_slots,
    }
    if a.model_shape:
        engine["shape"] = a.model_shape
    return {
        **assets,
        "limits": {
            "max_context_tokens": 512,
            "max_tokens_cap": max(64, a.max_tokens),
            "default_max_tokens": 8,
            "max_adapters_per_mix": a.max_mix,
            "max_queued_requests": 1024,
        },
        "engine": engine,
        "worker": {
            "num_replicas": 2,
            "num_cpus": a.worker_num_cpus,
            "num_gpus": a.worker_num_gpus,
            "max_ongoing_requests": a.max_ongoing_requests,
            "spill_queue_len": a.spill_queue_len,
            "routing_stats_period_s": a.routing_stats_period_s,
            "request_router": router,
        },
        "router": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.05},
        "ingress": {"num_cpus": 0.05, "request_timeout_s": 600},
    }


def replica_stats(app: str, replicas: int, timeout_s: float = 120) -> dict[str, dict[str, Any]]:
    """``LoraWorker.stats()`` of every worker replica of ``app``. Calls go through the app's
    own handle (and so its own router): repeat until each replica has answered once."""
    from ray import serve

    handle = serve.get_deployment_handle("LoraWorker", app_name=app)
    out: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while len(out) < replicas:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{app}: stats from {sorted(out)} only")
        for call in [handle.stats.remote() for _ in range(2 * replicas)]:
            s = call.result(timeout_s=60)
            out[s["replica"]] = s
    return out


def pool_stats(app: str, replicas: int = 2, timeout_s: float = 120) -> dict[str, dict[str, Any]]:
    """Pool counters of every worker replica, read while no load runs, so the counters do
    not move between the answers."""
    out: dict[str, dict[str, Any]] = {}
    for rid, s in replica_stats(app, replicas, timeout_s).items():
        pool = s.get("pool") or {}
        out[rid] = {
            k: pool.get(k, 0) for k in ("hits", "loads", "evictions", "host_loads", "waits")
        } | {"resident": pool.get("resident", []), "slots": pool.get("slots")}
    return out


def wait_ready(url: str, timeout_s: float) -> None:
    """Base-model requests (no adapter: nothing is loaded) until the app answers."""
    from dlp.loadgen import post_until_answered

    body = {"model": "dlp", "prompt": "Hello", "max_tokens": 1, "adapters": {}}
    post_until_answered(url, body, time.monotonic() + timeout_s)


# --- load ------------------------------------------------------------------------------------


async def closed_loop(
    url: str, work: Workload, concurrency: int, max_tokens: int, label: str, position: int
) -> tuple[list[Any], float]:
    """`concurrency` clients take the next request of the shared sequence when theirs ends."""
    import httpx
    from tqdm.auto import tqdm

    from dlp.loadgen import RequestRecord

    records: list[Any] = []
    bar = tqdm(total=len(work.sequence), desc=f"{label:>16}", unit="req", position=position)
    nxt = iter(range(len(work.sequence)))
    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:

        async def one_client() -> None:
            for i in nxt:
                mix = work.mixes[work.sequence[i]]
                key = ",".join(sorted(mix))
                rec = RequestRecord(task=key, stream=False, start=time.perf_counter() - t0)
                body = {
                    "model": "dlp",
                    "prompt": work.prompts[i],
                    "adapters": mix,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                }
                try:
                    r = await client.post("/v1/completions", json=body)
                    if r.status_code != 200:
                        rec.status = str(r.status_code)
                    else:
                        obj = r.json()
                        info = obj.get("dlp") or {}
                        rec.replica = info.get("replica")
                        rec.mix = info.get("mix")
                        rec.completion_tokens = int(obj["usage"]["completion_tokens"])
                except Exception as exc:  # every failure is data for the report
                    rec.status = type(exc).__name__
                rec.end = time.perf_counter() - t0
                records.append(rec)
                bar.update(1)

        await asyncio.gather(*(one_client() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    bar.close()
    return records, wall


def measure(
    records: list[Any], wall_s: float, before: dict, after: dict, work: Workload
) -> dict[str, Any]:
    from dlp.loadgen import summarize

    summary = summarize(records, wall_s)
    ok = [r for r in records if r.ok]
    per_replica: dict[str, dict[str, Any]] = {}
    for rid in sorted(after):
        b = before.get(rid, {})
        delta = {k: after[rid][k] - b.get(k, 0) for k in ("hits", "loads", "evictions")}
        delta["disk_reads"] = after[rid]["host_loads"] - b.get("host_loads", 0)
        served = [r for r in ok if r.replica == rid]
        delta["requests"] = len(served)
        delta["distinct_adapters"] = len({n for r in served for n in r.task.split(",")})
        delta["distinct_mixes"] = len({r.task for r in served})
        delta["resident_after"] = after[rid]["resident"]
        per_replica[rid] = delta
    loads = sum(d["loads"] for d in per_replica.values())
    hits = sum(d["hits"] for d in per_replica.values())
    n_ok = len(ok)
    return {
        "requests": len(records),
        "ok": n_ok,
        "errors": sum(summary["errors"].values()),
        "error_kinds": summary["errors"],
        "adapter_loads": loads,
        "loads_per_request": loads / n_ok if n_ok else math.nan,
        "slot_hits": hits,
        "slot_hit_rate": hits / (hits + loads) if hits + loads else math.nan,
        "evictions": sum(d["evictions"] for d in per_replica.values()),
        "disk_reads": sum(d["disk_reads"] for d in per_replica.values()),
        "adapter_uses_expected": sum(len(work.mixes[k]) for k in work.sequence),
        "requests_per_replica": [d["requests"] for d in per_replica.values()],
        "per_replica": per_replica,
        "throughput_rps": summary["throughput_rps"],
        "tokens_per_s": summary["tokens_per_s"],
        "latency_ms": summary["latency_ms"],
        "wall_s": wall_s,
    }


# --- report ----------------------------------------------------------------------------------


def plot(rep: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = rep["results"]
    names = list(res)
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    lpr = [res[n]["loads_per_request"] or 0 for n in names]
    bars = ax[0].bar(names, lpr, color=["tab:green", "tab:gray"])
    ax[0].bar_label(bars, fmt="%.3f")
    ax[0].set(title="adapter loads per request (lower is better)", ylabel="loads / request")
    width = 0.35
    for j, n in enumerate(names):
        counts = res[n]["requests_per_replica"]
        xs = [i + (j - 0.5) * width for i in range(len(counts))]
        b = ax[1].bar(xs, counts, width, label=n)
        ax[1].bar_label(b)
    ax[1].set(title="requests per worker replica", xticks=[0, 1], xticklabels=["r1", "r2"])
    ax[1].legend()
    for j, key in enumerate(("p50", "p99")):
        xs = [i + (j - 0.5) * width for i in range(len(names))]
        vals = [(res[n]["latency_ms"][key] or 0) / 1000 for n in names]
        b = ax[2].bar(xs, vals, width, label=key)
        ax[2].bar_label(b, fmt="%.1f")
    ax[2].set(title="latency (s)", xticks=range(len(names)), xticklabels=names)
    ax[2].legend()
    s = rep["settings"]
    fig.suptitle(
        f"{s['requests']} requests, Zipf s={s['zipf_s']} over {s['mixes']} mixes of "
        f"{s['adapters']} adapters, {s['pool_slots']} pool slots, concurrency "
        f"{s['concurrency']} per app, 2 worker replicas per app ({rep['machine']})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from dlp.engine.shapes import PUBLISHED_SHAPES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=400, help="requests per app")
    p.add_argument("--concurrency", type=int, default=12, help="clients in flight per app")
    p.add_argument("--adapters", type=int, default=24)
    p.add_argument("--mixes", type=int, default=40, help="distinct mixes in the Zipf list")
    p.add_argument("--max-mix", type=int, default=3, help="adapters per mix: 1..this")
    p.add_argument("--zipf-s", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--pool-slots", type=int, default=6, help="device adapter slots per replica")
    p.add_argument("--max-batch", type=int, default=4, help="engine rows per decode step")
    p.add_argument("--max-ongoing-requests", type=int, default=8, help="per worker replica")
    p.add_argument("--spill-queue-len", type=int, default=4)
    p.add_argument("--routing-stats-period-s", type=float, default=0.5)
    p.add_argument("--worker-num-cpus", type=float, default=0.5)
    p.add_argument("--worker-num-gpus", type=float, default=0.0, help="0.5 on 2 GPUs")
    p.add_argument("--engine-device", default="cpu", help="cpu, cuda")
    p.add_argument("--engine-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--model-shape", choices=sorted(PUBLISHED_SHAPES), default=None)
    p.add_argument("--tokenizer-dir", type=Path, default=None, help="with --model-shape")
    p.add_argument("--ray-num-cpus", type=int, default=4, help="logical CPUs of the cluster")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    if a.mixes < 1 or a.adapters < a.max_mix or a.requests < 1 or a.concurrency < 1:
        p.error("need --mixes >= 1, --adapters >= --max-mix, --requests/--concurrency >= 1")
    if a.pool_slots < a.max_mix:
        p.error("--pool-slots must hold one whole mix (>= --max-mix)")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    command = " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv])

    import ray
    from ray import serve

    from deployments.app import build_app
    from dlp.loadgen import clean_nans, machine
    from dlp.ports import free_port

    scratch = Path(tempfile.mkdtemp(prefix="dlp-affinity-"))
    assets, adapters = make_assets(scratch, a.adapters, a)
    work = zipf_workload(adapters, a.mixes, a.max_mix, a.zipf_s, a.requests, a.seed)
    ray.init(address="local", num_cpus=a.ray_num_cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    urls = {r: f"{base}/{APP_NAMES[r]}" for r in ROUTERS}
    results: dict[str, Any] = {}
    try:
        t_start = time.perf_counter()
        for r in ROUTERS:
            app = build_app(app_args(assets, r, a))
            serve.run(app, name=APP_NAMES[r], route_prefix=f"/{APP_NAMES[r]}")
        for r in ROUTERS:
            wait_ready(urls[r], 600)
        print(f"apps ready in {time.perf_counter() - t_start:.0f}s", flush=True)
        time.sleep(2 * a.routing_stats_period_s + 1)
        before = {r: pool_stats(APP_NAMES[r]) for r in ROUTERS}

        async def both() -> list[tuple[list[Any], float]]:
            return await asyncio.gather(
                *(
                    closed_loop(urls[r], work, a.concurrency, a.max_tokens, r, i)
                    for i, r in enumerate(ROUTERS)
                )
            )

        runs = asyncio.run(both())
        after = {r: pool_stats(APP_NAMES[r]) for r in ROUTERS}
        for r, (records, wall) in zip(ROUTERS, runs, strict=True):
            results[r] = measure(records, wall, before[r], after[r], work)
    finally:
        serve.shutdown()
        ray.shutdown()

    lpr = {r: results[r]["loads_per_request"] for r in ROUTERS}
    top = Counter(work.sequence).most_common(1)[0][1] / len(work.sequence)
    rep: dict[str, Any] = {
        "command": command,
        "machine": machine(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "loads_per_request": lpr,
        "ratio_loads_per_request_affinity_to_default": (
            lpr["adapter_affinity"] / lpr["default"] if lpr["default"] else None
        ),
        "settings": {
            "requests": a.requests,
            "concurrency": a.concurrency,
            "adapters": a.adapters,
            "mixes": a.mixes,
            "max_mix": a.max_mix,
            "zipf_s": a.zipf_s,
            "seed": a.seed,
            "max_tokens": a.max_tokens,
            "pool_slots": a.pool_slots,
            "max_batch": a.max_batch,
            "worker_replicas": 2,
            "max_ongoing_requests": a.max_ongoing_requests,
            "spill_queue_len": a.spill_queue_len,
            "routing_stats_period_s": a.routing_stats_period_s,
            "worker_num_cpus": a.worker_num_cpus,
            "worker_num_gpus": a.worker_num_gpus,
            "engine_device": a.engine_device,
            "engine_dtype": a.engine_dtype,
            "model": a.model_shape or "embedded SmolLM2-135M-Instruct",
            "ray_num_cpus": a.ray_num_cpus,
            "both_apps_loaded_at_once": True,
        },
        "workload": {
            "top_mix_share": top,
            "distinct_mixes_sent": len(set(work.sequence)),
            "mixes": work.mixes,
            "zipf_probs": work.probs,
        },
        "results": results,
    }
    rep = clean_nans(rep)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rep, indent=1) + "\n")
    plot(rep, a.out.with_suffix(".png"))
    head = {
        r: {
            k: results[r][k]
            for k in (
                "loads_per_request",
                "adapter_loads",
                "slot_hit_rate",
                "evictions",
                "disk_reads",
                "requests_per_replica",
                "throughput_rps",
                "latency_ms",
                "errors",
            )
        }
        for r in ROUTERS
    }
    print(json.dumps(clean_nans(head), indent=1))
    print(f"wrote {a.out} and {a.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
