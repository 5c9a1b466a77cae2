"""Autoscaling, shown on a local fake multi-node cluster: Serve adds LoRA worker replicas under
load, Ray's autoscaler adds the (fake) GPU nodes they need, and both go back down after.

    python cluster/autoscale_harness.py            # full run -> benchmarks/results/autoscaling.*
    python cluster/autoscale_harness.py --short    # the CI version (tests/cluster/...)

What is real: Ray's autoscaler (monitor.py with the fake multi-node provider, which starts a
raylet per node on this machine), Serve's replica autoscaling, the app from serve_config.yaml
(`deployments.app:build_app`, embedded default model) and HTTP load from the test split.
What is faked: the GPU. Worker nodes advertise `GPU: 1` and no CPUs, like the GPU group of
cluster/rayservice.yaml; the worker asks `num_gpus: 1, num_cpus: 0` (the same overrides as
cluster/rayservice-overrides.yaml) but runs its engine on the CPU. All nodes share this
machine's cores, so extra replicas add no real capacity here: the run shows the control loop,
not a speed-up.

Timeline samples (one a second): t, phase, replicas (worker replicas RUNNING), pending
replicas, nodes (alive GPU worker nodes), queue (requests Serve counts for the worker
deployment: the autoscaling signal), in_flight (client side), p50/p99 latency and errors of
requests finished in the last window.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_cluster import FakeCluster, NodeType, wait_for

from dlp.errors import DlpError
from dlp.loadgen import (
    Prompt,
    RequestRecord,
    clean_nans,
    load_prompts,
    parse_config,
    percentiles,
    run_load,
    summarize,
)
from dlp.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
WORKER_NODE_TYPE = "gpu_worker"


@dataclass
class Plan:
    """One run's knobs; `short` and `full` below are the two presets."""

    max_nodes: int  # GPU worker nodes (= worker max_replicas)
    concurrency: int  # closed loop: requests in flight during the load phase
    rate: float | None  # open loop instead, when set
    idle_s: float  # baseline before the load
    load_s: float
    settle_timeout_s: float  # after the load: wait this long at most for the scale-down
    node_idle_timeout_s: float  # autoscaler idle_timeout (cluster files: 5 min)
    upscale_delay_s: float | None  # None = serve_config.yaml's value
    downscale_delay_s: float | None
    look_back_period_s: float | None
    max_tokens: int
    stream_fraction: float = 0.25  # a quarter of the requests stream: TTFT is measured on them
    period_s: float = 1.0
    window_s: float = 5.0


PRESETS = {
    # CI: about 3 minutes on 2 cores. Delays shortened so that a run fits; recorded in the JSON.
    "short": Plan(
        max_nodes=2,
        concurrency=16,
        rate=None,
        idle_s=3,
        load_s=45,
        settle_timeout_s=120,
        node_idle_timeout_s=8,
        upscale_delay_s=3,
        downscale_delay_s=8,
        look_back_period_s=5,
        max_tokens=4,
    ),
    # The recorded run: serve_config.yaml's upscale delay and look-back; scale-down delays cut
    # from 5 min to 30 s (Serve) and 20 s (nodes) so the run takes minutes, not a quarter hour.
    "full": Plan(
        max_nodes=3,
        concurrency=24,
        rate=None,
        idle_s=10,
        load_s=120,
        settle_timeout_s=240,
        node_idle_timeout_s=20,
        upscale_delay_s=None,
        downscale_delay_s=30,
        look_back_period_s=None,
        max_tokens=8,
    ),
}


def harness_config(
    serve_config: dict[str, Any], plan: Plan, http_port: int, app_name: str, worker: str
) -> dict[str, Any]:
    """serve_config.yaml with the fake-GPU placement and the plan's delays applied."""
    cfg = copy.deepcopy(serve_config)
    cfg["proxy_location"] = "HeadOnly"  # fake nodes share one IP: one proxy, one port
    cfg["http_options"] = {**cfg.get("http_options", {}), "host": "127.0.0.1", "port": http_port}
    apps = [a for a in cfg["applications"] if a["name"] == app_name]
    if not apps:
        raise DlpError(f"serve config: no application named {app_name!r}")
    cfg["applications"] = apps
    app = apps[0]
    args = app.setdefault("args", {})
    # Same placement as cluster/rayservice-overrides.yaml, but the engine stays on the CPU.
    args.setdefault("worker", {}).update({"num_gpus": 1, "num_cpus": 0})
    deployments = app.setdefault("deployments", [])
    entry = next((d for d in deployments if d["name"] == worker), None)
    if entry is None or not entry.get("autoscaling_config"):
        raise DlpError(f"serve config: no autoscaling_config for deployment {worker!r}")
    auto = entry["autoscaling_config"]
    auto["max_replicas"] = plan.max_nodes
    for key in ("upscale_delay_s", "downscale_delay_s", "look_back_period_s"):
        value = getattr(plan, key)
        if value is not None:
            auto[key] = value
    return cfg


class Sampler:
    """Reads replicas, nodes and Serve's queue; keeps client-side request records."""

    def __init__(self, app_name: str, worker: str) -> None:
        self.app_name, self.worker = app_name, worker
        self.records: list[RequestRecord] = []
        self.sent = 0
        self.lock = threading.Lock()
        self._controller: Any = None

    def on_record(self, rec: RequestRecord) -> None:
        with self.lock:
            self.records.append(rec)

    def replicas(self) -> tuple[int, int, str]:
        from ray import serve

        try:
            app = serve.status().applications.get(self.app_name)
        except Exception:
            return 0, 0, "UNKNOWN"
        if app is None or self.worker not in app.deployments:
            return 0, 0, str(getattr(app.status, "value", app.status)) if app else "NOT_STARTED"
        states = app.deployments[self.worker].replica_states
        running = int(states.get("RUNNING", 0))
        pending = int(
            sum(
                v for k, v in states.items() if k in ("STARTING", "PENDING_MIGRATION", "RECOVERING")
            )
        )
        return running, pending, str(getattr(app.status, "value", app.status))

    @staticmethod
    def nodes() -> tuple[int, int]:
        import ray

        alive = [n for n in ray.nodes() if n.get("Alive")]
        gpu = [n for n in alive if n.get("Resources", {}).get("GPU", 0) > 0]
        return len(gpu), len(alive)

    def queue(self) -> float | None:
        """Serve's autoscaling signal for the worker: ongoing + queued requests."""
        import ray
        from ray.serve._private.common import DeploymentID
        from ray.serve.context import _get_global_client

        try:
            if self._controller is None:
                self._controller = _get_global_client()._controller
            ref = self._controller._get_total_num_requests_for_deployment_for_testing.remote(
                DeploymentID(name=self.worker, app_name=self.app_name)
            )
            return float(ray.get(ref, timeout=5))
        except Exception:  # a private hook: if it moves, the timeline still has in_flight
            return None

    def sample(self, t: float, phase: str, window_s: float, now_rel: float) -> dict[str, Any]:
        running, pending, status = self.replicas()
        gpu_nodes, all_nodes = self.nodes()
        with self.lock:
            recs = list(self.records)
        done = [r for r in recs if now_rel - window_s <= r.end <= now_rel]
        ok = [r for r in done if r.ok]
        lat = percentiles([r.latency for r in ok], (50, 99))
        return {
            "t": round(t, 2),
            "phase": phase,
            "replicas": running,
            "replicas_pending": pending,
            "app_status": status,
            "nodes": gpu_nodes,
            "nodes_total": all_nodes,
            "queue": self.queue(),
            "in_flight": self.sent - len(recs),
            "completed_window": len(done),
            # worker replicas that answered in the window (each answer names its replica)
            "replicas_serving": len({r.replica for r in ok if r.replica}),
            "p50_ms": lat["p50"],
            "p99_ms": lat["p99"],
            "errors_window": len(done) - len(ok),
            "errors_total": sum(1 for r in recs if not r.ok),
        }


def _load_thread(
    plan: Plan, url: str, prompts: list[Prompt], sampler: Sampler, out: dict[str, Any]
) -> threading.Thread:
    cfg = parse_config(
        url=url,
        concurrency=None if plan.rate else plan.concurrency,
        rate=plan.rate,
        duration_s=plan.load_s,
        max_tokens=plan.max_tokens,
        stream_fraction=plan.stream_fraction,
        timeout_s=max(120.0, plan.load_s),
        seed=0,
    )

    def count_send() -> None:
        sampler.sent += 1

    async def go() -> None:
        out["result"] = await run_load(
            cfg, prompts, on_record=sampler.on_record, on_send=count_send, progress=False
        )

    def target() -> None:
        try:
            asyncio.run(go())
        except BaseException as exc:  # surfaced by the main thread
            out["error"] = exc

    thread = threading.Thread(target=target, name="load", daemon=True)
    thread.start()
    return thread


def _default_assets_ready() -> bool:
    from dlp.paths import adapters_dir, cache_dir, router_dir

    root = cache_dir()
    return (router_dir(root) / "router.json").is_file() and any(
        adapters_dir(root).glob("*/adapter_model.safetensors")
    )


def _quick_assets(where: Path, tasks: list[str]) -> dict[str, str]:
    """Random PEFT adapters (one per task) and an untrained MiniMLP router over them, on the
    embedded default model: the same files and code paths as trained ones, made in seconds.

    Used when `dlp setup` has not trained the default router and adapters yet (tens of minutes
    on 2 shared cores). Autoscaling depends on the load, not on what the adapters learnt.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dlp.base_model import ensure_base_model
    from dlp.lora.adapter import base_linear_shapes, random_adapter, save_adapter
    from dlp.routing.router import MiniMLPRouter, RouterConfig, load_tokenizer

    model_dir = ensure_base_model()
    with torch.device("meta"):  # shapes only, no weights
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    shapes = base_linear_shapes(model)
    root = where / "adapter_root"
    for i, task in enumerate(tasks):
        adapter = random_adapter(task, shapes, rank=8, seed=i + 1, b_std=0.02)
        save_adapter(adapter, root / "initial" / task, base_model_name="SmolLM2-135M-Instruct")
    tokenizer = load_tokenizer(model_dir)
    torch.manual_seed(0)
    config = RouterConfig(vocab_size=len(tokenizer), embed_dim=16, hash_buckets=256, hidden=(32,))
    router = MiniMLPRouter(tasks, tokenizer, config, tokenizer_ref=str(model_dir))
    return {
        "adapters_dir": str(root / "initial"),
        "adapter_root": str(root),
        "router_dir": str(router.save(where / "router")),
    }


def _warm_up(url: str, prompts: list[Prompt], timeout_s: float) -> None:
    """First requests pay lazy start-up (engine loop, adapter loads); keep them off the clock."""
    from dlp.loadgen import post_until_answered

    deadline = time.monotonic() + timeout_s
    for prompt in prompts[:2]:
        body = {"model": "dlp", "prompt": prompt.text, "max_tokens": 2}
        post_until_answered(url, body, deadline)


def run(
    plan: Plan,
    serve_config_path: Path,
    out: Path,
    app_name: str,
    worker: str,
    data_dir: Path | None,
    command: str,
    assets: str = "auto",
) -> dict[str, Any]:
    import ray
    from ray.serve._private import api as serve_api
    from ray.serve.config import ProxyLocation
    from ray.serve.schema import ServeDeploySchema

    from dlp.base_model import ensure_base_model
    from dlp.data.prepare import ensure_default_data

    ensure_base_model()
    prompts = load_prompts(data_dir or ensure_default_data(), seed=0)
    http_port = free_port()
    config = harness_config(
        yaml.safe_load(serve_config_path.read_text()), plan, http_port, app_name, worker
    )
    scratch: Path | None = None
    if assets == "quick" or (assets == "auto" and not _default_assets_ready()):
        assets_used = "quick: random adapters + untrained router on the embedded model"
        scratch = Path(tempfile.mkdtemp(prefix="dlp-harness-"))
        tasks = sorted({p.task for p in prompts})[:4]
        prompts = [p for p in prompts if p.task in tasks]
        config["applications"][0]["args"].update(_quick_assets(scratch, tasks))
    else:
        assets_used = "cache: the trained default router and demo adapters (dlp setup)"
    schema = ServeDeploySchema.model_validate(config)
    cluster = FakeCluster(
        # Ingress, router and registry ask for fractions of a CPU; the head hosts them (the
        # CPU worker group of the real layout would be one more raylet on 2 cores).
        head_resources={"CPU": 2},
        worker_types={
            WORKER_NODE_TYPE: NodeType({"GPU": 1}, min_workers=0, max_workers=plan.max_nodes)
        },
        idle_timeout_s=plan.node_idle_timeout_s,
        # replicas log to files, not to this terminal
        env={"RAY_SERVE_LOG_TO_STDERR": "0"},
    )
    url = f"http://127.0.0.1:{http_port}"
    timeline: list[dict[str, Any]] = []
    failed = False
    started = time.perf_counter()
    try:
        gcs = cluster.start()
        cluster_up_s = time.perf_counter() - started
        ray.init(address=gcs, namespace="serve", log_to_driver=False, include_dashboard=False)
        client = serve_api.serve_start(
            http_options=schema.http_options.model_dump(),
            proxy_location=ProxyLocation.HeadOnly,
        )
        client.deploy_apps(schema, _blocking=False)
        sampler = Sampler(app_name, worker)
        wait_for(lambda: sampler.replicas()[2] == "RUNNING", 600, "the app to be RUNNING", 1)
        _warm_up(url, prompts, 300)
        ready_s = time.perf_counter() - started
        print(f"cluster up in {cluster_up_s:.0f}s, app ready in {ready_s:.0f}s", flush=True)

        t0 = time.perf_counter()
        load_started = load_ended = None
        load_out: dict[str, Any] = {}
        thread: threading.Thread | None = None
        stable = 0
        start_replicas = start_nodes = None
        while True:
            t = time.perf_counter() - t0
            if thread is None and t >= plan.idle_s:
                load_started = t
                thread = _load_thread(plan, url, prompts, sampler, load_out)
            if thread is not None and load_ended is None and not thread.is_alive():
                load_ended = t
            phase = "idle" if thread is None else "load" if load_ended is None else "cooldown"
            now_rel = t - (load_started or 0.0)
            s = sampler.sample(t, phase, plan.window_s, now_rel)
            timeline.append(s)
            if start_replicas is None:
                start_replicas, start_nodes = s["replicas"], s["nodes"]
            print(
                json.dumps(
                    {
                        k: s[k]
                        for k in (
                            "t",
                            "phase",
                            "replicas",
                            "replicas_pending",
                            "nodes",
                            "queue",
                            "in_flight",
                            "p50_ms",
                            "errors_total",
                        )
                    }
                ),
                flush=True,
            )
            if phase == "cooldown":
                back = s["replicas"] <= start_replicas and s["nodes"] <= start_nodes
                stable = stable + 1 if back and s["replicas_pending"] == 0 else 0
                if stable >= 3 or t - load_ended > plan.settle_timeout_s:
                    break
            time.sleep(max(0.0, plan.period_s - (time.perf_counter() - t0 - t)))
        if "error" in load_out:
            raise load_out["error"]
        result = load_out["result"]
    except BaseException:
        failed = True
        raise
    finally:
        # On failure keep Ray's logs (replica tracebacks live there) next to the report.
        keep = out.parent / (out.stem + "_ray_logs") if failed else None
        temp_dir = str(cluster.temp_dir)
        left = cluster.shutdown(keep_logs=keep)
        if keep is not None:
            print(f"run failed; Ray logs kept in {keep}", file=sys.stderr)
        if left:
            print(f"warning: {left} cluster processes survived SIGKILL", file=sys.stderr)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    meta = {
        "command": command,
        "app_name": app_name,
        "assets": assets_used,
        "ready_s": ready_s,
        "load_started": load_started,
        "load_ended": load_ended,
        "start_replicas": start_replicas,
        "start_nodes": start_nodes,
        # what the clean-up left: the CI test checks that nothing of this cluster survives
        "cluster_temp_dir": temp_dir,
        "processes_left": left,
    }
    return build_report(timeline, result, plan, config, worker, meta)


def build_report(
    timeline: list[dict[str, Any]],
    result: Any,
    plan: Plan,
    config: dict[str, Any],
    worker: str,
    meta: dict[str, Any],
) -> dict[str, Any]:
    start_replicas, start_nodes = meta["start_replicas"], meta["start_nodes"]
    peak_r = max(s["replicas"] for s in timeline)
    peak_n = max(s["nodes"] for s in timeline)
    final = timeline[-1]

    def first(pred: Any) -> float | None:
        return next((s["t"] for s in timeline if pred(s)), None)

    summary = summarize(result.records, result.wall_s)
    auto = next(d for d in config["applications"][0]["deployments"] if d["name"] == worker)[
        "autoscaling_config"
    ]
    return clean_nans(
        {
            "command": meta["command"],
            "machine": f"{platform.node()}: {platform.machine()}, {os.cpu_count()} CPUs",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "what": "Serve replica autoscaling + Ray autoscaler on a fake multi-node cluster "
            "(GPU nodes advertise GPU: 1; engines run on the CPU)",
            "app": {
                "name": meta["app_name"],
                "import_path": config["applications"][0]["import_path"],
                "worker_deployment": worker,
                "autoscaling_config": auto,
            },
            "plan": plan.__dict__,
            "assets": meta["assets"],
            "cluster_temp_dir": meta["cluster_temp_dir"],
            "processes_left": meta["processes_left"],
            "ready_s": meta["ready_s"],
            "load": {"started_t": meta["load_started"], "ended_t": meta["load_ended"], **summary},
            # every answer reports its adapter mix: proof the requests ran the routed app
            "replicas_served": len({r.replica for r in result.records if r.ok and r.replica}),
            "mixes_served": len(
                {json.dumps(r.mix, sort_keys=True) for r in result.records if r.ok and r.mix}
            ),
            "start": {"replicas": start_replicas, "nodes": start_nodes},
            "peak": {
                "replicas": peak_r,
                "nodes": peak_n,
                "queue": max((s["queue"] or 0) for s in timeline),
            },
            "final": {"replicas": final["replicas"], "nodes": final["nodes"], "t": final["t"]},
            "events": {
                "first_replica_added_t": first(lambda s: s["replicas"] > start_replicas),
                "first_node_added_t": first(lambda s: s["nodes"] > start_nodes),
                "peak_replicas_t": first(lambda s: s["replicas"] == peak_r),
                "peak_nodes_t": first(lambda s: s["nodes"] == peak_n),
                "replicas_back_t": first(
                    lambda s: s["phase"] == "cooldown" and s["replicas"] <= start_replicas
                ),
                "nodes_back_t": first(
                    lambda s: s["phase"] == "cooldown" and s["nodes"] <= start_nodes
                ),
            },
            "checks": {
                "replicas_scaled_up": peak_r > start_replicas,
                "nodes_scaled_up": peak_n > start_nodes,
                "replicas_scaled_down": final["replicas"] <= start_replicas,
                "nodes_scaled_down": final["nodes"] <= start_nodes,
            },
            "timeline": timeline,
        }
    )


def plot(rep: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = rep["timeline"]
    t = [s["t"] for s in tl]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    ax = axes[0]
    ax.step(t, [s["replicas"] for s in tl], where="post", label="worker replicas (running)")
    ax.step(t, [s["nodes"] for s in tl], where="post", label="GPU nodes (alive)", ls="--")
    ax.step(
        t,
        [s["replicas_pending"] for s in tl],
        where="post",
        label="replicas starting",
        ls=":",
        color="grey",
    )
    ax.set_ylabel("count")
    ax.legend(loc="upper right")
    ax.set_title(rep["what"], fontsize=9)
    ax = axes[1]
    ax.plot(
        t,
        [s["queue"] if s["queue"] is not None else math.nan for s in tl],
        label="Serve queue (worker)",
    )
    ax.plot(t, [s["in_flight"] for s in tl], label="client in flight", ls=":")
    ax.axhline(
        rep["app"]["autoscaling_config"]["target_ongoing_requests"],
        color="grey",
        lw=0.8,
        label="target per replica",
    )
    ax.set_ylabel("requests")
    ax.legend(loc="upper right")
    ax = axes[2]
    ax.plot(t, [s["p50_ms"] if s["p50_ms"] is not None else math.nan for s in tl], label="p50")
    ax.plot(t, [s["p99_ms"] if s["p99_ms"] is not None else math.nan for s in tl], label="p99")
    ax.set_ylabel(f"latency ms ({rep['plan']['window_s']:.0f} s window)")
    ax.set_xlabel("t (s)")
    errs = [s["errors_total"] for s in tl]
    if any(errs):
        ax2 = ax.twinx()
        ax2.step(t, errs, color="red", where="post", label="errors (total)")
        ax2.set_ylabel("errors")
    ax.legend(loc="upper left")
    for a in axes:
        if rep["load"]["started_t"] is not None:
            a.axvspan(rep["load"]["started_t"], rep["load"]["ended_t"] or t[-1], alpha=0.08)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _exit_on_sigterm() -> None:
    """`timeout` and CI cancel with SIGTERM: turn it into SystemExit so `finally` cleans up."""
    import signal

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    _exit_on_sigterm()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--short", action="store_true", help="the CI preset (about 3 minutes)")
    p.add_argument("--serve-config", type=Path, default=ROOT / "serve_config.yaml")
    p.add_argument("--app", default="dlp", help="application name in the serve config")
    p.add_argument("--worker", default="LoraWorker", help="the deployment that needs GPUs")
    p.add_argument("--data-dir", type=Path, default=None, help="prepared task data")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/autoscaling.json")
    p.add_argument("--max-nodes", type=int, default=None)
    p.add_argument("--concurrency", type=int, default=None)
    p.add_argument("--rate", type=float, default=None, help="open loop instead (req/s)")
    p.add_argument("--load-s", type=float, default=None)
    p.add_argument(
        "--assets",
        choices=["auto", "cache", "quick"],
        default="auto",
        help="router + adapters: cache = trained ones from `dlp setup`; quick = random adapters"
        " and an untrained router made on the spot; auto = cache when built, else quick",
    )
    args = p.parse_args(argv)
    plan = copy.deepcopy(PRESETS["short" if args.short else "full"])
    for key in ("max_nodes", "concurrency", "rate", "load_s"):
        if getattr(args, key) is not None:
            setattr(plan, key, getattr(args, key))
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(argv)
    rep = run(
        plan,
        args.serve_config,
        args.out,
        args.app,
        args.worker,
        args.data_dir,
        command,
        args.assets,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rep, indent=1, allow_nan=False))
    png = args.out.with_suffix(".png")
    plot(rep, png)
    print(json.dumps({k: rep[k] for k in ("start", "peak", "final", "events", "checks")}, indent=1))
    print(f"wrote {args.out} and {png}")
    return 0 if all(rep["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
