"""Two LoRA workers on two GPUs of one host (issue 9): placement, adapter-aware vs round-robin
routing, throughput with 2 workers vs 1, and autoscaling 1 -> 2 -> 1, in one run.

    # 2 GPUs (nvidia-h200-x2), Qwen2-1.5B shape with random bf16 weights:
    python3 benchmarks/multigpu_bench.py --tokenizer-dir .gpu_tok --out $OUT/multigpu.json
    # CPU smoke run: Ray advertises 2 (fake) GPUs, the engines run on the CPU (embedded model):
    PYTHONPATH=. .venv/bin/python benchmarks/multigpu_bench.py --smoke --out /tmp/multigpu.json

One Ray cluster, one Serve app deployed from serve_config.yaml with its documented GPU
override (worker.num_gpus=1, engine on cuda in bf16; the same schema `serve deploy` sends),
re-deployed between phases the way an operator changes a running app:

1. **placement**: LoraWorker `num_replicas: 2`; each replica reports the GPU ids Ray gave it
   (`LoraWorker.stats()["placement"]`), and nvidia-smi lists the processes on each GPU.
2. **routing**: a Zipf workload of explicit mixes (1..3 adapters) over a catalogue larger
   than a replica's device pool (`--adapters` registered, `--pool-slots` per replica), first
   with plain round-robin, then with the adapter-aware router (the default). Changing
   `worker.request_router` changes the app's args, so Serve restarts every replica: each
   router gets freshly started workers and the same warm-up. Adapter loads per request
   from the replicas' pool counters, before and after each phase.
3. **throughput**: closed-loop HTTP load from several client processes (`model: dlp`: the
   router picks the mixes), the same requests with 2 workers and then with 1
   (`num_replicas: 2 -> 1`); completion tokens/s and the ratio.
4. **autoscaling**: LoraWorker back to serve_config.yaml's `num_replicas: auto`, at most 2
   replicas (one per GPU), target = engine.max_batch (the yaml's rule), shorter delays (in
   the JSON); idle, then load until the second replica has served for `--hold-s`, then
   idle until it is gone. Timeline of replicas, requests in flight, Serve's queue, tokens/s,
   latency and GPU utilisation, one sample a second.

Writes JSON + PNG (`benchmarks/results/multigpu.json` on the H200 pair).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "cluster"):  # benchmarks.*, cluster.* and fake_cluster imports
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")

APP = "dlp"
WORKER = "LoraWorker"
N_GPUS = 2


# --- settings --------------------------------------------------------------------------------


def settings(a: argparse.Namespace) -> dict[str, Any]:
    """Everything a run is made of; the smoke preset shrinks it to minutes on 2 CPU cores."""
    if a.smoke:
        return {
            "device": "cpu",
            "dtype": "float32",
            "shape": None,
            "max_batch": 4,
            "pool_slots": 4,
            "adapters": 10,
            "mixes": 16,
            "zipf_requests": 80,
            "zipf_concurrency": 6,
            "zipf_max_tokens": 4,
            "tp_requests": 48,
            "tp_concurrency": 8,
            "tp_max_tokens": 8,
            "client_procs": 2,
            "prompt_words": 12,
            "ingress_replicas": 1,
            "max_context_tokens": 256,
            "auto_concurrency": 12,
            "auto_max_tokens": 8,
            "hold_s": 8.0,
            "idle_s": 3.0,
            "upscale_delay_s": 2.0,
            "downscale_delay_s": 6.0,
            "look_back_period_s": 11.0,
        }
    return {
        "device": "cuda",
        "dtype": "bfloat16",
        "shape": a.shape,
        "max_batch": a.max_batch,
        "pool_slots": a.pool_slots,
        "adapters": a.adapters,
        "mixes": a.mixes,
        "zipf_requests": a.zipf_requests,
        "zipf_concurrency": a.zipf_concurrency,
        "zipf_max_tokens": 32,
        "tp_requests": a.tp_requests,
        "tp_concurrency": a.tp_concurrency,
        "tp_max_tokens": 128,
        "client_procs": a.client_procs,
        "prompt_words": 100,
        "ingress_replicas": a.ingress_replicas,
        "max_context_tokens": 512,
        "auto_concurrency": a.auto_concurrency,
        "auto_max_tokens": 128,
        "hold_s": a.hold_s,
        "idle_s": 5.0,
        "upscale_delay_s": None,  # serve_config.yaml's (10 s)
        "downscale_delay_s": 15.0,  # the yaml's 5 min would only idle the device
        "look_back_period_s": 15.0,  # above Serve's metrics_interval_s (10 s)
    }


# --- assets ----------------------------------------------------------------------------------


def make_assets(scratch: Path, s: dict[str, Any], a: argparse.Namespace) -> tuple[dict, list]:
    """Random r=8 q/v adapters (the catalogue) and an untrained MiniMLP router.

    GPU: the 26 pool tasks' adapters and router of benchmarks/serve_bench.py for the named
    shape, plus `extra_NN` adapters up to --adapters (explicit mixes only: the router knows
    the 26). Smoke: the embedded model's quick assets (cluster/autoscale_harness.py)."""
    if s["shape"] is None:
        from cluster.autoscale_harness import _quick_assets

        names = [f"adapter_{i:02d}" for i in range(s["adapters"])]
        return _quick_assets(scratch, names), names
    from benchmarks.serve_bench import _assets
    from dlp.data.tasks import POOL

    if a.tokenizer_dir is None:
        raise SystemExit("--tokenizer-dir is needed (the embedded tokenizer files)")
    names = [spec.name for spec in POOL]
    extra = max(0, s["adapters"] - len(names))
    assets = _assets(scratch, a.tokenizer_dir, s["shape"], extra_adapters=extra)
    names += [f"extra_{i:02d}" for i in range(len(names), len(names) + extra)]
    return assets, names[: s["adapters"]]


# --- deploy ----------------------------------------------------------------------------------


def app_config(
    base: dict[str, Any],
    assets: dict[str, str],
    s: dict[str, Any],
    port: int,
    worker_replicas: int | str,
    request_router: str = "adapter_affinity",
) -> dict[str, Any]:
    """serve_config.yaml + the documented GPU override + this run's sizes.

    ``worker_replicas``: a fixed count, or "auto" for the yaml's autoscaling entry with at
    most one replica per GPU and the run's (shorter) delays."""
    cfg = copy.deepcopy(base)
    cfg["http_options"] = {**cfg.get("http_options", {}), "host": "127.0.0.1", "port": port}
    apps = [app for app in cfg["applications"] if app["name"] == APP]
    cfg["applications"] = apps
    app = apps[0]
    args = app["args"]
    args.update(assets)
    args["limits"].update(
        {
            "max_context_tokens": s["max_context_tokens"],
            "max_tokens_cap": s["max_context_tokens"] // 2,
            "max_queued_requests": 4096,
            "max_adapters_per_mix": 3,
        }
    )
    engine = {
        "device": s["device"],
        "dtype": s["dtype"],
        "max_batch": s["max_batch"],
        "pool_slots": s["pool_slots"],
        "admit_min_rows": max(1, s["max_batch"] // 4),
    }
    if s["shape"]:
        engine["shape"] = s["shape"]
    args["engine"].update(engine)
    args["worker"].update(
        {
            "num_gpus": 1,  # the GPU override: one worker per GPU
            "num_cpus": 1 if s["device"] == "cuda" else 0.25,
            "max_ongoing_requests": 4 * s["max_batch"],
            # A replica with fewer requests than rows has idle rows: it is not saturated.
            "spill_queue_len": s["max_batch"],
            "routing_stats_period_s": 0.5,
            "request_router": request_router,
        }
    )
    args["ingress"].update({"num_replicas": s["ingress_replicas"], "request_timeout_s": 600})
    if s.get("router_replicas"):
        # The MiniMLP router's replicas (CPU): every routed request passes through one.
        router = next(d for d in app["deployments"] if d["name"] == "Router")
        auto = router["autoscaling_config"]
        auto["min_replicas"] = s["router_replicas"]
        auto["max_replicas"] = max(auto["max_replicas"], s["router_replicas"])
    entry = next(d for d in app["deployments"] if d["name"] == WORKER)
    if worker_replicas == "auto":
        auto = entry["autoscaling_config"]
        auto["max_replicas"] = N_GPUS
        # serve_config.yaml: "target_ongoing_requests = engine.max_batch".
        auto["target_ongoing_requests"] = s["max_batch"]
        for key in ("upscale_delay_s", "downscale_delay_s", "look_back_period_s"):
            if s[key] is not None:
                auto[key] = s[key]
    else:
        entry.pop("autoscaling_config", None)
        entry["num_replicas"] = int(worker_replicas)
    return cfg


class Cluster:
    """The run's Ray cluster and Serve controller; deploys configs like `serve deploy`."""

    def __init__(self, s: dict[str, Any], port: int, num_cpus: int | None) -> None:
        import ray
        from ray.serve._private import api as serve_api
        from ray.serve.config import ProxyLocation

        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if s["device"] == "cpu":
            kwargs["num_gpus"] = N_GPUS  # the smoke run's fake GPUs
        if num_cpus:
            kwargs["num_cpus"] = num_cpus
        ray.init(address="local", namespace="serve", **kwargs)
        self.client = serve_api.serve_start(
            http_options={"host": "127.0.0.1", "port": port},
            proxy_location=ProxyLocation.EveryNode,
        )
        self.url = f"http://127.0.0.1:{port}"

    def deploy(self, config: dict[str, Any]) -> None:
        from ray.serve.schema import ServeDeploySchema

        self.client.deploy_apps(ServeDeploySchema.model_validate(config), _blocking=False)

    @staticmethod
    def shutdown() -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def replica_counts() -> tuple[int, int, str]:
    """(RUNNING, starting or stopping, app status) of the worker deployment."""
    from ray import serve

    try:
        app = serve.status().applications.get(APP)
    except Exception:
        return 0, 0, "UNKNOWN"
    if app is None or WORKER not in app.deployments:
        return 0, 0, "NOT_STARTED"
    states = app.deployments[WORKER].replica_states
    running = int(states.get("RUNNING", 0))
    other = int(sum(v for k, v in states.items() if k != "RUNNING"))
    return running, other, str(getattr(app.status, "value", app.status))


def wait_workers(n: int, timeout_s: float) -> float:
    """Until the app is RUNNING with exactly n worker replicas and none starting/stopping."""
    t0 = time.perf_counter()
    while True:
        running, other, status = replica_counts()
        if status == "RUNNING" and running == n and other == 0:
            return time.perf_counter() - t0
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"app {status}: {json.dumps(app_status_detail())[:2000]}")
        if time.perf_counter() - t0 > timeout_s:
            raise TimeoutError(f"{n} workers not ready after {timeout_s:.0f}s: {status}")
        time.sleep(1.0)


def app_status_detail() -> dict[str, Any]:
    from ray import serve

    try:
        app = serve.status().applications.get(APP)
        return {
            name: {"status": str(d.status), "message": d.message[-1500:]}
            for name, d in app.deployments.items()
        }
    except Exception as exc:
        return {"error": repr(exc)}


def worker_stats(n: int, timeout_s: float = 120) -> dict[str, dict[str, Any]]:
    """LoraWorker.stats() of each of the app's n worker replicas."""
    from benchmarks.affinity_bench import replica_stats

    return replica_stats(APP, n, timeout_s)


# --- GPU monitor -----------------------------------------------------------------------------


def nvidia_smi(query: str, kind: str = "gpu") -> list[list[str]] | None:
    """Rows of `nvidia-smi --query-<kind>=<query>`; None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    flag = "--query-gpu" if kind == "gpu" else "--query-compute-apps"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"{flag}={query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [[c.strip() for c in line.split(",")] for line in out.strip().splitlines() if line]


class GpuMonitor:
    """Samples each GPU's utilisation and memory once a second in a thread."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, list[float], list[float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-monitor", daemon=True)
        self.t0 = time.perf_counter()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rows = nvidia_smi("utilization.gpu,memory.used")
            if rows is None:
                return
            try:
                util = [float(r[0]) for r in rows]
                mem = [float(r[1]) for r in rows]
            except (ValueError, IndexError):
                util, mem = [], []
            self.samples.append((time.perf_counter() - self.t0, util, mem))
            self._stop.wait(1.0)

    def latest(self) -> tuple[list[float], list[float]]:
        return (self.samples[-1][1], self.samples[-1][2]) if self.samples else ([], [])

    def mean_util(self, t_from: float, t_to: float) -> list[float] | None:
        rows = [u for t, u, _ in self.samples if t_from <= t <= t_to and u]
        if not rows:
            return None
        return [round(sum(col) / len(col), 1) for col in zip(*rows, strict=False)]

    def stop(self) -> None:
        self._stop.set()


def cpu_times() -> dict[int, tuple[str, float]]:
    """pid -> (command line, CPU seconds so far) of every process (Linux /proc; empty
    elsewhere): what each Ray actor, engine child and client process used in a phase."""
    out: dict[int, tuple[str, float]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return out
    tick = os.sysconf("SC_CLK_TCK")
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(d.name)] = (cmd.strip()[:90], (int(fields[11]) + int(fields[12])) / tick)
    return out


def busiest(before: dict, after: dict, wall_s: float, top: int = 16) -> list[dict[str, Any]]:
    """The processes that used most CPU between two cpu_times() snapshots, in cores."""
    rows = [
        {"pid": pid, "cmd": cmd, "cores": round((cpu - before.get(pid, ("", 0.0))[1]) / wall_s, 3)}
        for pid, (cmd, cpu) in after.items()
    ]
    return sorted(rows, key=lambda r: -r["cores"])[:top]


# --- phases ----------------------------------------------------------------------------------


def placement(n: int) -> dict[str, Any]:
    stats = worker_stats(n)
    per_replica = {rid: st.get("placement", {}) for rid, st in stats.items()}
    gpu_sets = [tuple(p.get("gpu_ids", [])) for p in per_replica.values()]
    apps = nvidia_smi("pid,gpu_uuid,used_memory", kind="apps")
    gpus = nvidia_smi("index,uuid,name,memory.used")
    return {
        "replicas": per_replica,
        "one_gpu_each": all(len(g) == 1 for g in gpu_sets),
        "distinct_gpus": len(set(gpu_sets)) == len(gpu_sets),
        "nvidia_smi_gpus": gpus,
        "nvidia_smi_processes": apps,
    }


def routing_phase(cluster: Cluster, work: Any, s: dict[str, Any], label: str) -> dict[str, Any]:
    from benchmarks.affinity_bench import closed_loop, measure, pool_stats

    time.sleep(2.0)  # a few routing-stats periods: the routers see the current pools
    before = pool_stats(APP, N_GPUS)
    records, wall = asyncio.run(
        closed_loop(cluster.url, work, s["zipf_concurrency"], s["zipf_max_tokens"], label, 0)
    )
    after = pool_stats(APP, N_GPUS)
    return measure(records, wall, before, after, work)


def throughput_phase(
    cluster: Cluster, s: dict[str, Any], prompts: list[Any], gpu: GpuMonitor
) -> dict[str, Any]:
    from benchmarks.serve_bench import engine_delta
    from dlp.loadgen import LoadConfig, run_load_processes, summarize

    n, _, _ = replica_counts()
    before = worker_stats(n)
    cfg = LoadConfig(
        url=cluster.url,
        concurrency=s["tp_concurrency"],
        max_requests=len(prompts),
        max_tokens=s["tp_max_tokens"],
        timeout_s=600,
        duration_s=3600,
        processes=s["client_procs"],
    )
    t_from = time.perf_counter() - gpu.t0
    cpu0 = cpu_times()
    res = run_load_processes(cfg, prompts, progress=False)
    cpu1 = cpu_times()
    t_to = time.perf_counter() - gpu.t0
    after = worker_stats(n)
    ok = [r for r in res.records if r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    per_replica = {
        rid: {
            "requests": sum(1 for r in ok if r.replica == rid),
            **engine_delta(before.get(rid, {}), st, res.wall_s),
        }
        for rid, st in after.items()
    }
    return {
        "workers": n,
        "requests": len(res.records),
        "errors": len(res.records) - len(ok),
        "wall_s": res.wall_s,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / res.wall_s,
        "latency_ms": summarize(res.records, res.wall_s)["latency_ms"],
        "per_replica": per_replica,
        "gpu_util_mean": gpu.mean_util(t_from, t_to),
        # where a serving-path bottleneck shows: a process near 1 core (proxy, ingress, ...)
        "busiest_processes": busiest(cpu0, cpu1, t_to - t_from),
    }


def warm(cluster: Cluster, prompts: list[Any], s: dict[str, Any]) -> None:
    """Every prompt once at 2 tokens: each replica's first prefills, graph buckets and the
    adapters the router picks are paid for before the clock runs."""
    from dlp.loadgen import LoadConfig, run_load

    cfg = LoadConfig(
        url=cluster.url,
        concurrency=min(len(prompts), 2 * s["max_batch"] * N_GPUS),
        max_requests=len(prompts),
        max_tokens=2,
        timeout_s=600,
    )
    asyncio.run(run_load(cfg, prompts, progress=False))


def autoscale_phase(
    cluster: Cluster, s: dict[str, Any], prompts: list[Any], gpu: GpuMonitor, timeout_s: float
) -> dict[str, Any]:
    """Idle, then closed-loop load (from --client-procs processes, like the throughput
    phases: one Python client process cannot keep two GPU workers busy) until the second
    replica has served for hold_s, then idle until the worker is back at one replica (3
    samples in a row)."""
    from cluster.autoscale_harness import Sampler
    from dlp.loadgen import LoadConfig, percentiles, run_load_processes, summarize

    sampler = Sampler(APP, WORKER)
    cfg = LoadConfig(
        url=cluster.url,
        concurrency=s["auto_concurrency"],
        duration_s=3600,
        max_tokens=s["auto_max_tokens"],
        timeout_s=600,
        processes=s["client_procs"],
    )
    state: dict[str, Any] = {}
    stop = threading.Event()

    def on_record(rec: Any) -> None:
        sampler.on_record(rec)
        # closed loop: each answer is followed by the next request until the stop
        sampler.sent = len(sampler.records) + (0 if stop.is_set() else cfg.concurrency or 0)

    def load() -> None:
        try:
            state["result"] = run_load_processes(
                cfg, prompts, progress=False, on_record=on_record, stop=stop
            )
        except BaseException as exc:  # surfaced below
            state["error"] = exc

    timeline: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    thread: threading.Thread | None = None
    load_started = load_ended = two_serving_since = None
    stable = 0
    window = 5.0
    while True:
        t = time.perf_counter() - t0
        if thread is None and t >= s["idle_s"]:
            thread = threading.Thread(target=load, name="load", daemon=True)
            thread.start()
            # run_load_processes starts its processes together this long after the call;
            # record times count from then
            load_started = t + 3.0 + 0.5 * cfg.processes
            sampler.sent = cfg.concurrency or 0
        phase = "idle" if thread is None else "load" if load_ended is None else "cooldown"
        if phase == "load" and t < load_started:
            phase = "idle"  # client processes still starting
        now_rel = t - (load_started or 0.0)
        row = sampler.sample(t, phase, window, now_rel)
        with sampler.lock:
            recent = [r for r in sampler.records if now_rel - window <= r.end <= now_rel and r.ok]
        row["tokens_per_s"] = round(sum(r.completion_tokens for r in recent) / window, 1)
        row["gpu_util"], row["gpu_mem_mib"] = gpu.latest()
        timeline.append(row)
        print(
            json.dumps(
                {
                    k: row[k]
                    for k in (
                        "t",
                        "phase",
                        "replicas",
                        "replicas_pending",
                        "replicas_serving",
                        "queue",
                        "in_flight",
                        "tokens_per_s",
                        "gpu_util",
                    )
                }
            ),
            flush=True,
        )
        if phase == "load" and thread is not None and load_ended is None:
            if row["replicas"] >= 2 and row["replicas_serving"] >= 2:
                two_serving_since = two_serving_since if two_serving_since is not None else t
            if (two_serving_since is not None and t - two_serving_since >= s["hold_s"]) or (
                t - load_started > timeout_s
            ):
                stop.set()
                thread.join(timeout=660)
                load_ended = time.perf_counter() - t0
                sampler.sent = len(sampler.records)
        elif phase == "cooldown":
            back = row["replicas"] <= 1 and row["replicas_pending"] == 0
            stable = stable + 1 if back else 0
            if stable >= 3 or t - load_ended > timeout_s:
                break
        time.sleep(max(0.0, 1.0 - (time.perf_counter() - t0 - t)))
    if "error" in state:
        raise state["error"]
    result = state["result"]

    def first(pred: Any) -> float | None:
        return next((r["t"] for r in timeline if pred(r)), None)

    ok = [r for r in result.records if r.ok]
    up = first(lambda r: r["phase"] == "load" and r["replicas"] >= 2)
    return {
        "load": {
            "started_t": load_started,
            "ended_t": load_ended,
            "concurrency": s["auto_concurrency"],
            "max_tokens": s["auto_max_tokens"],
            **summarize(result.records, result.wall_s),
        },
        "events": {
            "first_pending_t": first(lambda r: r["phase"] == "load" and r["replicas_pending"]),
            "second_replica_running_t": up,
            "second_replica_serving_t": first(
                lambda r: r["phase"] == "load" and r["replicas_serving"] >= 2
            ),
            "back_to_one_t": first(lambda r: r["phase"] == "cooldown" and r["replicas"] <= 1),
            "scale_up_s_after_load_start": None if up is None else up - load_started,
        },
        "checks": {
            "started_at_one": timeline[0]["replicas"] == 1,
            "scaled_to_two": max(r["replicas"] for r in timeline) == 2,
            "both_served": max(r["replicas_serving"] for r in timeline) >= 2,
            "back_to_one": timeline[-1]["replicas"] == 1,
            "no_errors": len(ok) == len(result.records),
        },
        "replicas_served": len({r.replica for r in ok if r.replica}),
        "latency_ms_all": percentiles([r.latency for r in ok], (50, 95, 99)),
        "timeline": timeline,
    }


# --- report ----------------------------------------------------------------------------------


def plot(rep: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    ax = axes[0][0]
    tp = rep.get("throughput", {})
    if tp:
        labels = [f"{k} worker{'s' if k != '1' else ''}" for k in sorted(tp["by_workers"])]
        vals = [tp["by_workers"][k]["tokens_per_s"] for k in sorted(tp["by_workers"])]
        bars = ax.bar(labels, vals, color=["tab:gray", "tab:green"][: len(vals)])
        ax.bar_label(bars, fmt="%.0f")
        ax.set_title(
            f"throughput over HTTP, same requests: 2 / 1 = {tp['ratio_2_to_1']:.2f}x", fontsize=10
        )
        ax.set_ylabel("completion tokens / s")
    ax = axes[0][1]
    rt = rep.get("routing", {})
    if rt:
        names = [n for n in ("adapter_affinity", "round_robin") if n in rt["results"]]
        vals = [rt["results"][n]["loads_per_request"] or 0 for n in names]
        bars = ax.bar(names, vals, color=["tab:green", "tab:gray"][: len(vals)])
        ax.bar_label(bars, fmt="%.3f")
        ax.set_title(
            f"adapter loads per request, Zipf s={rt['workload']['zipf_s']} over "
            f"{rt['workload']['mixes']} mixes of {rt['workload']['adapters']} adapters, "
            f"{rt['workload']['pool_slots']} slots/replica",
            fontsize=9,
        )
    au = rep.get("autoscaling")
    if au:
        tl = au["timeline"]
        t = [r["t"] for r in tl]
        ax = axes[1][0]
        ax.step(t, [r["replicas"] for r in tl], where="post", label="worker replicas running")
        ax.step(t, [r["replicas_pending"] for r in tl], where="post", ls=":", label="starting")
        ax.step(t, [r["replicas_serving"] for r in tl], where="post", ls="--", label="serving")
        ax.set_ylabel("replicas")
        ax2 = ax.twinx()
        ax2.plot(t, [r["in_flight"] for r in tl], color="tab:red", alpha=0.5, label="in flight")
        q = [r["queue"] if r["queue"] is not None else math.nan for r in tl]
        ax2.plot(t, q, color="tab:purple", alpha=0.5, label="Serve queue (worker)")
        ax2.set_ylabel("requests")
        ax.legend(loc="upper left", fontsize=8)
        ax2.legend(loc="upper right", fontsize=8)
        ax.set_title("autoscaling 1 -> 2 -> 1 (shaded: load)", fontsize=10)
        ax = axes[1][1]
        ax.plot(t, [r["tokens_per_s"] for r in tl], label="tokens/s (5 s window)")
        ax.set_ylabel("completion tokens / s")
        ax.set_xlabel("t (s)")
        utils = [r.get("gpu_util") or [] for r in tl]
        if any(utils):
            ax3 = ax.twinx()
            for g in range(max(len(u) for u in utils)):
                ax3.plot(
                    t,
                    [u[g] if len(u) > g else math.nan for u in utils],
                    ls=":",
                    label=f"GPU {g} util %",
                )
            ax3.set_ylim(0, 105)
            ax3.legend(loc="upper right", fontsize=8)
        ax.legend(loc="upper left", fontsize=8)
        for a in (axes[1][0], axes[1][1]):
            a.axvspan(au["load"]["started_t"], au["load"]["ended_t"] or t[-1], alpha=0.08)
    shown = {(0, 0): tp, (0, 1): rt, (1, 0): au, (1, 1): au}
    for (i, j), section in shown.items():
        if not section:
            axes[i][j].set_axis_off()
    fig.suptitle(f"{rep['model']} - {rep['machine']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


SECTIONS = ("placement", "placement_after_redeploy", "routing", "throughput", "autoscaling")


def merge(paths: list[Path]) -> dict[str, Any]:
    """One report from several runs' reports (each a subset of the phases): each section
    from the last file that has it, with that run's command, date and HTTP proxy beside it."""
    reports = [(p, json.loads(p.read_text())) for p in paths]
    out: dict[str, Any] = {
        "merged_from": [str(p.name) for p in paths],
        "model": reports[-1][1]["model"],
        "machine": reports[-1][1]["machine"],
        "settings": reports[-1][1]["settings"],
        "runs": {
            p.name: {
                **{k: r.get(k) for k in ("command", "date", "timings_s")},
                # reports from before --haproxy existed ran behind Serve's own proxy
                "http_proxy": r.get("http_proxy") or "serve",
            }
            for p, r in reports
        },
    }
    for key in SECTIONS:
        for p, r in reports:
            if key in r:
                out[key] = {**r[key], "run": p.name}
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, fake GPUs, embedded model, tiny")
    p.add_argument("--tokenizer-dir", type=Path, default=None)
    p.add_argument("--shape", default="qwen2-1.5b", choices=["qwen2-1.5b", "llama3-8b"])
    p.add_argument("--serve-config", type=Path, default=ROOT / "serve_config.yaml")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--pool-slots", type=int, default=32, help="device adapter slots per worker")
    p.add_argument("--adapters", type=int, default=64, help="catalogue (26 routed + extras)")
    p.add_argument("--mixes", type=int, default=96, help="distinct mixes in the Zipf list")
    p.add_argument("--zipf-s", type=float, default=1.1)
    p.add_argument("--zipf-requests", type=int, default=3000)
    p.add_argument("--zipf-concurrency", type=int, default=96)
    p.add_argument("--tp-requests", type=int, default=4096)
    p.add_argument("--tp-concurrency", type=int, default=384)
    p.add_argument("--client-procs", type=int, default=8)
    p.add_argument("--ingress-replicas", type=int, default=8)
    p.add_argument("--auto-concurrency", type=int, default=192)
    p.add_argument(
        "--router-replicas", type=int, default=None, help="Router min_replicas (yaml: 1)"
    )
    p.add_argument("--hold-s", type=float, default=20.0)
    p.add_argument("--ray-num-cpus", type=int, default=None)
    p.add_argument(
        "--haproxy",
        action="store_true",
        help="RAY_SERVE_ENABLE_HA_PROXY=1: HAProxy in front of the ingress replicas (each"
        " serves HTTP itself) instead of Serve's Python proxy",
    )
    p.add_argument(
        "--phases",
        default="placement,routing,throughput,autoscaling",
        help="comma-separated subset, in this order",
    )
    p.add_argument("--phase-timeout-s", type=float, default=300.0)
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="no run: merge these reports (later files win per section) into --out + PNG",
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/multigpu.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from cluster.autoscale_harness import _exit_on_sigterm

    _exit_on_sigterm()  # `timeout` sends SIGTERM: the partial report is still written
    a = parse_args(argv)
    if a.merge:
        merged = merge(a.merge)
        a.out.write_text(json.dumps(merged, indent=1) + "\n")
        plot(merged, a.out.with_suffix(".png"))
        print(f"wrote {a.out} and {a.out.with_suffix('.png')}")
        return 0
    phases = set(a.phases.split(","))
    command = " ".join(shlex.quote(x) for x in [Path(sys.argv[0]).name, *sys.argv[1:]])
    s = settings(a)
    s["zipf_s"] = a.zipf_s
    s["router_replicas"] = a.router_replicas

    from benchmarks.affinity_bench import zipf_workload
    from benchmarks.serve_bench import _prompts
    from dlp.loadgen import Prompt, clean_nans, machine
    from dlp.ports import free_port

    t_start = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="dlp-multigpu-"))
    assets, adapters = make_assets(scratch, s, a)
    base = yaml.safe_load(a.serve_config.read_text())
    port = free_port()
    texts = _prompts(s["tp_requests"], s["prompt_words"], seed=0)
    prompts = [Prompt(task="synthetic", text=t) for t in texts]
    work = zipf_workload(adapters, s["mixes"], 3, a.zipf_s, s["zipf_requests"], seed=0)
    rep: dict[str, Any] = {
        "command": command,
        "machine": machine(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": f"{s['shape']} (random weights, {s['dtype']})"
        if s["shape"]
        else "embedded SmolLM2-135M-Instruct (CPU smoke run, fake GPUs)",
        "settings": s,
        "serve_config": str(a.serve_config.relative_to(ROOT)),
        "timings_s": {},
    }
    out = a.out
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(clean_nans(rep), indent=1) + "\n")
        plot(rep, out.with_suffix(".png"))

    if a.haproxy:  # read by Serve's processes at start: set before the cluster starts
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    rep["http_proxy"] = "haproxy" if a.haproxy else "serve"
    cluster = Cluster(s, port, a.ray_num_cpus)
    gpu = GpuMonitor()
    try:
        # 1. two workers, one per GPU (round-robin first when routing is compared: a change
        # of the app's args restarts its replicas, so each router gets fresh workers) ----------
        routing = "routing" in phases
        first_router = "round_robin" if routing else "adapter_affinity"
        cfg2 = app_config(base, assets, s, port, 2, request_router=first_router)
        if phases & {"placement", "routing", "throughput"}:
            cluster.deploy(cfg2)
            rep["timings_s"]["two_workers_ready"] = wait_workers(2, 900)
            print(f"two workers ready in {rep['timings_s']['two_workers_ready']:.0f}s", flush=True)
        if "placement" in phases:
            rep["placement"] = placement(2)
            print(json.dumps(rep["placement"], indent=1), flush=True)

        # 2. round-robin vs adapter-aware routing -------------------------------------------
        if routing:
            warm(cluster, prompts[: 4 * s["max_batch"]], s)
            results = {"round_robin": routing_phase(cluster, work, s, "round_robin")}
            cluster.deploy(app_config(base, assets, s, port, 2))
            time.sleep(3.0)
            rep["timings_s"]["adapter_affinity_redeploy"] = wait_workers(2, 900)
            if "placement" in phases:
                rep["placement_after_redeploy"] = placement(2)
            warm(cluster, prompts[: 4 * s["max_batch"]], s)
            results["adapter_affinity"] = routing_phase(cluster, work, s, "adapter_affinity")
            lpr = {k: results[k]["loads_per_request"] for k in ("adapter_affinity", "round_robin")}
            rep["routing"] = {
                "loads_per_request": lpr,
                "ratio_loads_per_request_affinity_to_round_robin": (
                    lpr["adapter_affinity"] / lpr["round_robin"] if lpr["round_robin"] else None
                ),
                "workload": {
                    "adapters": len(adapters),
                    "mixes": s["mixes"],
                    "max_mix": 3,
                    "zipf_s": a.zipf_s,
                    "requests": s["zipf_requests"],
                    "concurrency": s["zipf_concurrency"],
                    "max_tokens": s["zipf_max_tokens"],
                    "pool_slots": s["pool_slots"],
                    "top_mix_share": max(work.probs),
                    "order": "round_robin, then adapter_affinity; each on freshly started"
                    " workers after the same warm-up",
                },
                "results": results,
            }
            print(json.dumps({"loads_per_request": lpr}), flush=True)
            save()

        # 3. throughput: 2 workers, then 1 --------------------------------------------------
        if "throughput" in phases:
            by: dict[str, Any] = {}
            warm(cluster, prompts, s)
            by["2"] = throughput_phase(cluster, s, prompts, gpu)
            print(f"2 workers: {by['2']['tokens_per_s']:.0f} tokens/s", flush=True)
            cluster.deploy(app_config(base, assets, s, port, 1))
            time.sleep(3.0)
            rep["timings_s"]["scale_to_one"] = wait_workers(1, 600)
            by["1"] = throughput_phase(cluster, s, prompts, gpu)
            print(f"1 worker: {by['1']['tokens_per_s']:.0f} tokens/s", flush=True)
            rep["throughput"] = {
                "by_workers": by,
                "ratio_2_to_1": by["2"]["tokens_per_s"] / by["1"]["tokens_per_s"],
                "requests": s["tp_requests"],
                "concurrency": s["tp_concurrency"],
                "client_procs": s["client_procs"],
                "max_tokens": s["tp_max_tokens"],
                "order": "2 workers first (warmed), then the same requests on 1",
            }
            print(f"ratio 2/1: {rep['throughput']['ratio_2_to_1']:.3f}", flush=True)
            save()

        # 4. autoscaling 1 -> 2 -> 1 ----------------------------------------------------------
        if "autoscaling" in phases:
            if replica_counts()[0] > 1:
                cluster.deploy(app_config(base, assets, s, port, 1))
                time.sleep(3.0)
                wait_workers(1, 600)
            cfg_auto = app_config(base, assets, s, port, "auto")
            cluster.deploy(cfg_auto)
            time.sleep(3.0)
            rep["timings_s"]["autoscaling_start_ready"] = wait_workers(1, 900)
            auto = autoscale_phase(cluster, s, prompts, gpu, a.phase_timeout_s)
            auto["autoscaling_config"] = next(
                d for d in cfg_auto["applications"][0]["deployments"] if d["name"] == WORKER
            )["autoscaling_config"]
            rep["autoscaling"] = auto
            print(json.dumps({k: auto[k] for k in ("events", "checks")}, indent=1), flush=True)
    except BaseException:
        rep["failed_app_status"] = app_status_detail()
        raise
    finally:
        rep["timings_s"]["total"] = time.perf_counter() - t_start
        gpu.stop()
        save()
        Cluster.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
