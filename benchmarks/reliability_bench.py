"""Reliability on this machine (issue 8 items 3, 4, 6): load, memory, kill recovery.

    PYTHONPATH=. .venv/bin/python benchmarks/reliability_bench.py --duration 180

1. Starts a local Ray cluster and serves ``deployments.app:build_app`` on the embedded default
   model (trained default adapters/router when `dlp setup` made them, else random ones of
   the same format), two LoRA worker replicas.
2. Closed loop, 64 clients (dlp.loadgen) for ``--duration`` seconds over test-split prompts;
   RSS of the cluster's Ray worker processes (psutil) before, after and every ``--rss-every``
   seconds during the load, so a plateau can be told from a leak (the growth per minute over
   the second half of the run is reported); latency p50/p99.
3. Kill recovery: under a small load (8 clients), kills one LoRA worker replica actor, then
   the router replica; recovery = kill -> first successful answer from the new replica
   (worker) / first routed request succeeding after the kill (router).
Writes benchmarks/results/reliability.json and reliability.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

APP = "dlp"
OUT = Path("benchmarks/results/reliability.json")


def process_key(title: str) -> str:
    """A Ray worker's process title without the method it is running right now: a replica
    shows up as ``ray::ServeReplica:dlp:LoraWorker.handle_request_with_rejection`` while it
    serves and as ``ray::ServeReplica:dlp:LoraWorker`` when idle; both are the same process."""
    key = title.split()[0]
    if key.startswith("ray::ServeReplica:"):
        key = key.split(".", 1)[0]
    return key


def ray_rss_mb() -> dict[str, float]:
    """RSS (MB) of this process's descendant Ray worker processes, by process title."""
    import psutil

    out: dict[str, float] = {}
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            title = " ".join(p.cmdline())[:80]
            rss = p.memory_info().rss / 2**20
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if title.startswith("ray::"):
            key = process_key(title)
            out[key] = out.get(key, 0.0) + rss
    return out


def app_args(quick_dir: Path, duration: float) -> dict[str, Any]:
    from cluster.autoscale_harness import _default_assets_ready, _quick_assets

    args: dict[str, Any] = {
        "worker": {"num_replicas": 2, "num_cpus": 1, "max_ongoing_requests": 16},
        "router": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.2},
        "ingress": {"num_cpus": 0.2, "request_timeout_s": 120},
    }
    if not _default_assets_ready():
        tasks = ["task_a", "task_b", "task_c", "task_d"]
        args.update(_quick_assets(quick_dir, tasks))
    return args


class RssSampler:
    """Samples ``ray_rss_mb`` every ``every_s`` seconds in a thread, from start() to stop()."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.rows: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = 0.0

    def _run(self) -> None:
        while True:
            by_title = ray_rss_mb()
            self.rows.append(
                {
                    "t_s": round(time.monotonic() - self._t0, 1),
                    "total_mb": round(sum(by_title.values()), 1),
                    "by_title_mb": {k: round(v, 1) for k, v in by_title.items()},
                }
            )
            if self._stop.wait(self.every_s):
                return

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._thread.start()

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._thread.join(timeout=30)
        return self.rows


def rss_growth(timeline: list[dict[str, Any]]) -> dict[str, float | None]:
    """How RSS moved during the load: total change, and the least-squares slope (MB/min) over
    the whole run and over its second half. A leak keeps its slope in the second half; memory
    that only warms up (allocator pools, caches) flattens out."""

    def slope(rows: list[dict[str, Any]]) -> float | None:
        if len(rows) < 3:
            return None
        ts = [r["t_s"] / 60 for r in rows]
        ys = [r["total_mb"] for r in rows]
        mt, my = sum(ts) / len(ts), sum(ys) / len(ys)
        var = sum((t - mt) ** 2 for t in ts)
        return round(sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / var, 2)

    if not timeline:
        return {"change_mb": None, "slope_mb_per_min": None, "slope_second_half_mb_per_min": None}
    half = timeline[len(timeline) // 2 :]
    return {
        "change_mb": round(timeline[-1]["total_mb"] - timeline[0]["total_mb"], 1),
        "max_mb": max(r["total_mb"] for r in timeline),
        "slope_mb_per_min": slope(timeline),
        "first_half_change_mb": round(half[0]["total_mb"] - timeline[0]["total_mb"], 1),
        "second_half_change_mb": round(timeline[-1]["total_mb"] - half[0]["total_mb"], 1),
        "slope_second_half_mb_per_min": slope(half),
    }


class Tap:
    """Records (wall time, status, replica) of each finished request of a background load."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, str, str | None]] = []

    def __call__(self, rec: Any) -> None:
        self.rows.append((time.monotonic(), rec.status, rec.replica))


def background_load(url: str, prompts: list[Any], clients: int, model: str) -> tuple[Any, ...]:
    from dlp.loadgen import LoadConfig, run_load

    tap, stop, box = Tap(), threading.Event(), {}
    cfg = LoadConfig(url=url, concurrency=clients, duration_s=3600, max_tokens=8, model=model)

    def target() -> None:
        async def go() -> None:
            astop = asyncio.Event()

            async def watch() -> None:
                while not stop.is_set():
                    await asyncio.sleep(0.1)
                astop.set()

            w = asyncio.create_task(watch())
            box["result"] = await run_load(cfg, prompts, tap, stop=astop, progress=False)
            await w

        asyncio.run(go())

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return tap, stop, thread, box


def replica_names(deployment: str) -> set[str]:
    import ray

    tag = f"{APP}#{deployment}#"
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if tag in a["name"]}


def kill_and_measure(url: str, prompts: list[Any], deployment: str, model: str) -> dict:
    import ray

    tap, stop, thread, _box = background_load(url, prompts, 8, model)
    time.sleep(5)
    before = replica_names(deployment)
    victim = sorted(before)[0]
    killed = time.monotonic()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    new_id = None
    recovered = None
    deadline = killed + 300
    while time.monotonic() < deadline and recovered is None:
        if new_id is None:
            new = replica_names(deployment) - before
            new_id = new.pop().rsplit("#", 1)[-1] if new else None
        for t, status, replica in list(tap.rows):
            if t <= killed + 0.5 or status != "ok":
                continue
            if deployment == "Router" and new_id is not None:
                recovered = t
                break
            if deployment == "LoraWorker" and replica == new_id:
                recovered = t
                break
        time.sleep(0.25)
    time.sleep(2)
    stop.set()
    thread.join(timeout=180)
    statuses = Counter(s for _, s, _ in tap.rows)
    return {
        "recovery_s": None if recovered is None else round(recovered - killed, 2),
        "statuses": dict(statuses),
        "errors_not_503": sum(n for s, n in statuses.items() if s not in ("ok", "503")),
    }


def split_errors(kinds: dict[str, int]) -> tuple[int, int]:
    """(errors, rejected): 4xx answers are the server refusing bad input (test-split prompts
    longer than the model's context get 400 naming `prompt`), not failures; everything else
    (5xx, timeouts, transport errors) is an error."""
    rejected = sum(n for k, n in kinds.items() if k.isdigit() and 400 <= int(k) < 500)
    return sum(kinds.values()) - rejected, rejected


def latency_hist(latencies_s: list[float], bins: int = 40) -> dict[str, list[float]] | None:
    """A compact histogram (the JSON keeps it instead of every request's times)."""
    import numpy as np

    if not latencies_s:
        return None
    counts, edges = np.histogram(latencies_s, bins=bins)
    return {"edges": [round(float(e), 3) for e in edges], "counts": counts.tolist()}


def plot(rep: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    hist = rep.get("latency_hist_s")
    if hist:
        edges, counts = hist["edges"], hist["counts"]
        ax[0].stairs(counts, edges, fill=True)
        ax[0].set(xlabel="s", ylabel="requests")
    else:  # runs recorded before the histogram was kept: their percentiles
        lat = rep["latency_ms"]
        ax[0].bar(list(lat), [v / 1000 for v in lat.values()])
        ax[0].set(ylabel="s")
    ax[0].set(title=f"latency of successful requests, {rep['concurrency']} clients")
    timeline = rep["rss_timeline"]
    if timeline:
        titles = sorted({k for r in timeline for k in r["by_title_mb"]})
        ts = [r["t_s"] / 60 for r in timeline]
        ax[1].plot(ts, [r["total_mb"] for r in timeline], lw=2, label="all Ray workers")
        for name in titles:
            ys = [r["by_title_mb"].get(name, 0) for r in timeline]
            if max(ys) > 200:  # the small helper processes would only clutter the plot
                ax[1].plot(ts, ys, lw=1, label=name.replace("ray::", "")[:28])
        ax[1].legend(fontsize=7)
    ax[1].set(title="RSS during the load (MB)", xlabel="minutes", ylim=(0, None))
    rec = rep["recovery_s"]
    ax[2].bar(list(rec), [v or 0 for v in rec.values()])
    ax[2].set(title="kill -> serving again (s)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=180.0, help="seconds of 64-client load")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--rss-every", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from --out")
    a = p.parse_args(argv)
    if a.replot:
        plot(json.loads(a.out.read_text()), a.out.with_suffix(".png"))
        return 0
    command = " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv])

    import ray
    from ray import serve

    from cluster.autoscale_harness import _warm_up
    from deployments.app import build_app
    from dlp.data.prepare import ensure_default_data
    from dlp.loadgen import LoadConfig, load_prompts, machine, run_load, summarize
    from dlp.ports import free_port

    prompts = load_prompts(ensure_default_data(), seed=0)
    scratch = Path(tempfile.mkdtemp(prefix="dlp-rel-"))
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    try:
        serve.run(build_app(app_args(scratch, a.duration)), name=APP, route_prefix="/")
        _warm_up(url, prompts, timeout_s=600)
        time.sleep(3)
        rss_before = ray_rss_mb()
        cfg = LoadConfig(
            url=url,
            concurrency=a.concurrency,
            duration_s=a.duration,
            max_tokens=a.max_tokens,
            timeout_s=120,
        )
        sampler = RssSampler(a.rss_every)
        sampler.start()
        try:
            result = asyncio.run(run_load(cfg, prompts))
        finally:
            timeline = sampler.stop()
        time.sleep(3)
        rss_after = ray_rss_mb()
        summary = summarize(result.records, result.wall_s)
        worker = kill_and_measure(url, prompts, "LoraWorker", "dlp")
        router = kill_and_measure(url, prompts, "Router", "dlp")
    finally:
        serve.shutdown()
        ray.shutdown()
    errors, rejected = split_errors(summary["errors"])
    rep: dict[str, Any] = {
        "command": command,
        "machine": machine(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": a.duration,
        "concurrency": a.concurrency,
        "max_tokens": a.max_tokens,
        "requests": summary["requests"],
        "errors": errors,
        "rejected_4xx": rejected,
        "error_kinds": summary["errors"],
        "throughput_rps": summary["throughput_rps"],
        "latency_ms": summary["latency_ms"],
        "rss_mb_before": rss_before,
        "rss_mb_after": rss_after,
        "rss_mb_total_before": round(sum(rss_before.values()), 1),
        "rss_mb_total_after": round(sum(rss_after.values()), 1),
        "rss_every_s": a.rss_every,
        "rss_growth": rss_growth(timeline),
        "rss_timeline": timeline,
        "recovery_s": {"worker": worker["recovery_s"], "router": router["recovery_s"]},
        "kill_runs": {"worker": worker, "router": router},
        "latency_hist_s": latency_hist(
            [r.end - r.start for r in result.records if r.status == "ok"]
        ),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    plot(rep, a.out.with_suffix(".png"))
    a.out.write_text(json.dumps(rep, indent=2, default=str) + "\n")
    print(json.dumps({k: rep[k] for k in ("requests", "errors", "latency_ms", "recovery_s")}))
    print("RSS MB before/after:", rep["rss_mb_total_before"], rep["rss_mb_total_after"])
    print("RSS growth:", json.dumps(rep["rss_growth"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
