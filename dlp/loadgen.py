"""HTTP load generator for a running dlp server (`dlp bench load`, benchmarks/load.py).

Two ways to offer load, because they answer different questions:
- open loop (`rate`): requests arrive on a Poisson clock whatever the server does, like
  independent users; queues and latency grow when the server falls behind, which is what
  autoscaling reacts to;
- closed loop (`concurrency`): N clients each send the next request when the last one
  finished; measures the throughput the server sustains at that concurrency.

Prompts are real test-split inputs, interleaved across tasks so every window of the run
carries a mix of tasks (and so a mix of adapters). Streaming requests measure time to first
token. Everything is recorded per request so callers (the autoscaling harness) can cut the
run into time windows. This module imports no Ray and no torch.

One Python process is itself a bottleneck at a few hundred connections (on the H200 machine
one httpx process kept a server that sustains 64 busy rows at 49, with a 3x latency tail):
``processes`` > 1 splits the clients (or the rate) over that many processes that start
together (:func:`run_load_processes`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import random
import shlex
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dlp.errors import DlpError

DEFAULT_OUT = Path("benchmarks/results/load.json")


class LoadConfig(BaseModel):
    """What to send, how fast, for how long."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field("http://127.0.0.1:8000", description="server base URL")
    endpoint: Literal["completions", "chat"] = Field(
        "completions", description="/v1/completions or /v1/chat/completions"
    )
    model: str = Field("dlp", description="`dlp` routes; an adapter name forces one adapter")
    rate: float | None = Field(None, gt=0, description="open loop: mean requests per second")
    concurrency: int | None = Field(None, ge=1, description="closed loop: clients in flight")
    duration_s: float = Field(30.0, gt=0, description="stop sending after this many seconds")
    max_requests: int | None = Field(None, ge=1, description="stop after this many requests")
    max_tokens: int = Field(16, ge=1, le=4096, description="completion tokens per request")
    stream_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="share of requests sent with stream: true"
    )
    timeout_s: float = Field(60.0, gt=0, description="per-request timeout")
    seed: int = Field(0, description="arrival times, prompt order and stream choice")
    processes: int = Field(
        1, ge=1, le=64, description="client processes sharing the load (run_load_processes)"
    )

    @model_validator(mode="after")
    def _one_mode(self) -> LoadConfig:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("set exactly one of rate (open loop) or concurrency (closed loop)")
        return self

    @model_validator(mode="after")
    def _enough_clients(self) -> LoadConfig:
        if self.concurrency is not None and self.concurrency < self.processes:
            raise ValueError("processes: at most one per client (concurrency)")
        return self

    @property
    def mode(self) -> str:
        return "open" if self.rate is not None else "closed"

    def share(self, index: int) -> LoadConfig:
        """Process ``index``'s part of the load: clients, rate and request cap divided."""
        n = self.processes

        def part(total: int) -> int:
            return total // n + (1 if index < total % n else 0)

        return self.model_copy(
            update={
                "processes": 1,
                "seed": self.seed + index,
                "concurrency": part(self.concurrency) if self.concurrency else None,
                "rate": self.rate / n if self.rate else None,
                "max_requests": part(self.max_requests) if self.max_requests else None,
            }
        )


def parse_config(**kwargs: Any) -> LoadConfig:
    """LoadConfig or one DlpError naming the offending field."""
    try:
        return LoadConfig(**kwargs)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "load config"
        raise DlpError(f"{where}: {err['msg']}") from None


@dataclass(frozen=True)
class Prompt:
    task: str
    text: str


@dataclass
class RequestRecord:
    """One request as the client saw it. Times are seconds since the run started."""

    task: str
    stream: bool
    start: float
    end: float = math.nan
    ttft: float | None = None  # streams only: first content chunk
    status: str = "ok"  # "ok", an HTTP status code, or a transport error kind
    completion_tokens: int = 0
    mix: dict[str, float] | None = None
    replica: str | None = None  # the worker replica that answered, when the server says

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def latency(self) -> float:
        return self.end - self.start


@dataclass
class LoadResult:
    config: LoadConfig
    records: list[RequestRecord] = field(default_factory=list)
    wall_s: float = 0.0


def load_prompts(
    data_dir: Path, split: str = "test", tasks: Sequence[str] | None = None, seed: int = 0
) -> list[Prompt]:
    """Test-split prompts, interleaved round-robin across tasks (order within a task shuffled)."""
    from dlp.data.dataset import load_tasks

    table = load_tasks(data_dir, split=split, tasks=list(tasks) if tasks else None)
    by_task: dict[str, list[str]] = {}
    for row in table.select(["task", "input"]).to_pylist():
        by_task.setdefault(row["task"], []).append(row["input"])
    if not by_task:
        raise DlpError(f"data_dir: no {split} rows in {data_dir}")
    rng = random.Random(seed)
    queues = []
    for name in sorted(by_task):
        texts = by_task[name]
        rng.shuffle(texts)
        queues.append([Prompt(name, t) for t in texts])
    out: list[Prompt] = []
    for i in range(max(len(q) for q in queues)):
        out.extend(q[i] for q in queues if i < len(q))
    return out


def _body(cfg: LoadConfig, prompt: Prompt, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": cfg.model, "max_tokens": cfg.max_tokens, "stream": stream}
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt.text}]
    else:
        body["prompt"] = prompt.text
    return body


def _chunk_text(obj: dict[str, Any]) -> str:
    choices = obj.get("choices") or [{}]
    choice = choices[0]
    if "delta" in choice:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or (choice.get("message") or {}).get("content") or ""


def _note_dlp(rec: RequestRecord, obj: dict[str, Any]) -> None:
    """The dlp extension every answer carries (`dlp: {mix, replica, ...}`)."""
    info = obj.get("dlp") or {}
    rec.mix = info.get("mix") or obj.get("mix") or rec.mix
    rec.replica = info.get("replica") or rec.replica


def _error_kind(exc: Exception) -> str:
    import httpx

    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connect"
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        return "protocol"
    if isinstance(exc, json.JSONDecodeError | KeyError | ValueError):
        return "bad_response"
    return type(exc).__name__


def post_until_answered(url: str, body: dict[str, Any], deadline: float) -> None:
    """POST ``body`` to ``url``/v1/completions once a second until a 200 comes back (a replica
    still starting answers 503 or refuses the connection); TimeoutError past ``deadline``
    (a ``time.monotonic()`` value) with the last answer."""
    import httpx

    while True:
        try:
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} does not answer: {last}")
        time.sleep(1)


async def _send(
    client: Any, cfg: LoadConfig, prompt: Prompt, stream: bool, t0: float
) -> RequestRecord:
    path = "/v1/chat/completions" if cfg.endpoint == "chat" else "/v1/completions"
    rec = RequestRecord(task=prompt.task, stream=stream, start=time.perf_counter() - t0)
    try:
        if stream:
            async with client.stream("POST", path, json=_body(cfg, prompt, True)) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    rec.status = str(resp.status_code)
                else:
                    async for line in resp.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        obj = json.loads(data)
                        if "error" in obj:
                            rec.status = "stream_error"
                            break
                        _note_dlp(rec, obj)
                        if _chunk_text(obj):
                            if rec.ttft is None:
                                rec.ttft = time.perf_counter() - t0 - rec.start
                            rec.completion_tokens += 1
                        usage = obj.get("usage") or {}
                        if usage.get("completion_tokens"):
                            rec.completion_tokens = int(usage["completion_tokens"])
        else:
            resp = await client.post(path, json=_body(cfg, prompt, False))
            if resp.status_code != 200:
                rec.status = str(resp.status_code)
            else:
                obj = resp.json()
                _chunk_text(obj)  # a 200 without choices is a bad response, not a success
                rec.completion_tokens = int((obj.get("usage") or {}).get("completion_tokens", 0))
                _note_dlp(rec, obj)
    except Exception as exc:  # every failure is data for the report, never a crash
        rec.status = _error_kind(exc)
    rec.end = time.perf_counter() - t0
    return rec


async def run_load(
    cfg: LoadConfig,
    prompts: Sequence[Prompt],
    on_record: Callable[[RequestRecord], None] | None = None,
    stop: asyncio.Event | None = None,
    on_send: Callable[[], None] | None = None,
    progress: bool = True,
) -> LoadResult:
    """Send load until duration, max_requests or `stop`; wait for requests in flight.

    `on_send` is called as each request starts and `on_record` as it ends (from the event
    loop's thread), so a caller can follow requests in flight while the run goes on.
    """
    import httpx

    if not prompts:
        raise DlpError("prompts: nothing to send")
    rng = random.Random(cfg.seed)
    result = LoadResult(config=cfg)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    timeout = httpx.Timeout(cfg.timeout_s, connect=min(10.0, cfg.timeout_s))
    bar = _progress_bar(cfg, progress)
    counter = iter(range(sys.maxsize))
    t0 = time.perf_counter()

    def next_request() -> tuple[Prompt, bool] | None:
        n = next(counter)
        elapsed = time.perf_counter() - t0
        if (cfg.max_requests is not None and n >= cfg.max_requests) or elapsed >= cfg.duration_s:
            return None
        if stop is not None and stop.is_set():
            return None
        if on_send is not None:
            on_send()
        return prompts[n % len(prompts)], rng.random() < cfg.stream_fraction

    def done(rec: RequestRecord) -> None:
        result.records.append(rec)
        bar.update(1)
        if on_record is not None:
            on_record(rec)

    async with httpx.AsyncClient(base_url=cfg.url, limits=limits, timeout=timeout) as client:

        async def one(prompt: Prompt, stream: bool) -> None:
            done(await _send(client, cfg, prompt, stream, t0))

        if cfg.rate is not None:
            in_flight: set[asyncio.Task[None]] = set()
            next_at = 0.0
            while (item := next_request()) is not None:
                task = asyncio.create_task(one(*item))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                next_at += rng.expovariate(cfg.rate)
                delay = next_at - (time.perf_counter() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)
            if in_flight:
                await asyncio.gather(*in_flight)
        else:

            async def client_loop() -> None:
                while (item := next_request()) is not None:
                    await one(*item)

            await asyncio.gather(*(client_loop() for _ in range(cfg.concurrency or 1)))
    result.wall_s = time.perf_counter() - t0
    bar.close()
    return result


def _progress_bar(cfg: LoadConfig, progress: bool, detail: str = "") -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=cfg.max_requests,
        desc=f"load ({cfg.mode} loop{detail})",
        unit="req",
        disable=not progress,
        file=sys.stderr,
    )


def _load_process(
    cfg: LoadConfig, prompts: Sequence[Prompt], start_at: float, ticks: Any, stop: Any = None
) -> tuple[list[RequestRecord], float]:
    """One client process of :func:`run_load_processes` (module level: spawn pickles it).

    ``ticks``: a queue that gets each record as it ends; ``stop``: an event shared with the
    caller (a manager proxy) that ends the load early, like run_load's ``stop``."""
    time.sleep(max(0.0, start_at - time.time()))
    tick = None if ticks is None else ticks.put

    async def go() -> LoadResult:
        if stop is None:
            return await run_load(cfg, prompts, on_record=tick, progress=False)
        local = asyncio.Event()

        async def watch() -> None:
            while not await asyncio.to_thread(stop.wait, 0.2):
                pass
            local.set()

        watcher = asyncio.create_task(watch())
        try:
            return await run_load(cfg, prompts, on_record=tick, stop=local, progress=False)
        finally:
            watcher.cancel()

    result = asyncio.run(go())
    return result.records, result.wall_s


def run_load_processes(
    cfg: LoadConfig,
    prompts: Sequence[Prompt],
    progress: bool = True,
    on_record: Callable[[RequestRecord], None] | None = None,
    stop: threading.Event | None = None,
) -> LoadResult:
    """:func:`run_load` from ``cfg.processes`` processes that start together; their records
    are merged (times from the common start) and the wall time is the longest process's.
    Each process gets every n-th prompt, its share of the clients, rate and request cap.

    ``on_record`` is called (from a thread of this process) with each record as its request
    ends, in any process; setting ``stop`` ends the load early in every process (requests
    in flight are still awaited): a caller can follow and end a long run as it goes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    n = cfg.processes
    if n == 1 and on_record is None and stop is None:
        return asyncio.run(run_load(cfg, prompts, progress=progress))
    if not prompts:
        raise DlpError("prompts: nothing to send")
    context = multiprocessing.get_context("spawn")  # no forked copies of the caller's threads
    with context.Manager() as manager, ProcessPoolExecutor(n, mp_context=context) as pool:
        follow_records = progress or on_record is not None
        ticks = manager.Queue() if follow_records else None
        shared_stop = manager.Event() if stop is not None else None
        start_at = time.time() + 3.0 + 0.5 * n  # every process imported and waiting
        futures = [
            pool.submit(
                _load_process,
                cfg.share(i),
                list(prompts[i::n]) or list(prompts),
                start_at,
                ticks,
                shared_stop,
            )
            for i in range(n)
        ]
        bar = _progress_bar(cfg, progress, f", {n} processes")
        done = threading.Event()

        def follow() -> None:
            while not done.is_set():
                try:
                    rec = ticks.get(timeout=0.2)
                except Exception:  # queue.Empty through the manager's proxy
                    continue
                bar.update(1)
                if on_record is not None:
                    on_record(rec)

        def relay_stop() -> None:
            while not done.is_set():
                if stop.wait(0.2):
                    shared_stop.set()
                    return

        threads = []
        if ticks is not None:
            threads.append(threading.Thread(target=follow, daemon=True))
        if shared_stop is not None:
            threads.append(threading.Thread(target=relay_stop, daemon=True))
        for t in threads:
            t.start()
        parts = [f.result() for f in futures]
        if ticks is not None:  # the records still queued reach on_record before it returns
            while not ticks.empty():
                time.sleep(0.05)
        done.set()
        for t in threads:
            t.join(timeout=5)
        bar.close()
    records = sorted((r for recs, _ in parts for r in recs), key=lambda r: r.start)
    return LoadResult(config=cfg, records=records, wall_s=max(wall for _, wall in parts))


def percentiles(values: Sequence[float], qs: Sequence[int] = (50, 95, 99)) -> dict[str, float]:
    """Nearest-rank percentiles in milliseconds; NaN when there is nothing to measure."""
    import numpy as np

    if not values:
        return {f"p{q}": math.nan for q in qs}
    arr = np.asarray(values, dtype=float) * 1000.0
    return {f"p{q}": float(np.percentile(arr, q, method="inverted_cdf")) for q in qs}


def summarize(records: Sequence[RequestRecord], wall_s: float) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    streams = [r for r in ok if r.stream and r.ttft is not None]
    tokens = sum(r.completion_tokens for r in ok)
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": dict(sorted(Counter(r.status for r in records if not r.ok).items())),
        "throughput_rps": len(ok) / wall_s if wall_s > 0 else math.nan,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else math.nan,
        "latency_ms": percentiles([r.latency for r in ok]),
        "ttft_ms": percentiles([r.ttft for r in streams if r.ttft is not None]),
        "streams": len([r for r in records if r.stream]),
        "tasks": dict(sorted(Counter(r.task for r in records).items())),
    }


def report(result: LoadResult, command: str) -> dict[str, Any]:
    summary = summarize(result.records, result.wall_s)
    return clean_nans(
        {
            "command": command,
            "machine": machine(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "config": result.config.model_dump(),
            "mode": result.config.mode,
            "wall_s": result.wall_s,
            **summary,
            "records": [asdict(r) for r in result.records],
        }
    )


def machine() -> str:
    import os

    return f"{platform.node()}: {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}"


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def plot(rep: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = rep["records"]
    ok = [r for r in recs if r["status"] == "ok"]
    bad = [r for r in recs if r["status"] != "ok"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.scatter(
        [r["start"] for r in ok], [(r["end"] - r["start"]) * 1000 for r in ok], s=6, label="ok"
    )
    if bad:
        ax1.scatter(
            [r["start"] for r in bad],
            [(r["end"] - r["start"]) * 1000 for r in bad],
            s=10,
            marker="x",
            color="red",
            label="error",
        )
    ax1.set_xlabel("request start (s)")
    ax1.set_ylabel("latency (ms)")
    lat = rep["latency_ms"]
    ax1.set_title(f"{rep['mode']} loop: latency p50 {_fmt(lat['p50'])} / p99 {_fmt(lat['p99'])} ms")
    ax1.legend()
    ends = sorted(r["end"] for r in ok)
    if ends:
        width = max(1.0, math.ceil(ends[-1]) / 30)
        bins = [i * width for i in range(int(ends[-1] / width) + 2)]
        ax2.hist(ends, bins=bins, weights=[1 / width] * len(ends))
    ax2.set_xlabel("completion time (s)")
    ax2.set_ylabel("completed requests / s")
    ax2.set_title(
        f"throughput {rep['throughput_rps'] or 0:.2f} req/s, errors {sum(rep['errors'].values())}"
    )
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_report(rep: dict[str, Any], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rep, indent=1, allow_nan=False))
    png = out.with_suffix(".png")
    plot(rep, png)
    return png


def clean_nans(obj: Any) -> Any:
    """JSON has no NaN; dashboards read null."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: clean_nans(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clean_nans(v) for v in obj]
    return obj


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--rate", type=float, help="open loop: mean requests per second (Poisson)")
    mode.add_argument("--concurrency", type=int, help="closed loop: clients in flight")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--model", default="dlp", help="`dlp` (routed) or an adapter name")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load (default 30)")
    p.add_argument("--max-requests", type=int, default=None, help="stop after N requests")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument(
        "--stream-fraction",
        type=float,
        default=0.0,
        help="share of requests sent with stream: true (TTFT measured on those)",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="client processes sharing the load (one Python client tops out at a few hundred"
        " connections)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="prepared task data (default: the cache's data dir)",
    )
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report (PNG next to it)")
    p.set_defaults(func=cmd_load)


def cmd_load(args: argparse.Namespace) -> int:
    from dlp.paths import cache_dir, data_dir

    cfg = parse_config(
        url=args.url,
        endpoint=args.endpoint,
        model=args.model,
        rate=args.rate,
        concurrency=args.concurrency,
        duration_s=args.duration,
        max_requests=args.max_requests,
        max_tokens=args.max_tokens,
        stream_fraction=args.stream_fraction,
        timeout_s=args.timeout,
        seed=args.seed,
        processes=args.processes,
    )
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    prompts = load_prompts(args.data_dir or data_dir(cache_dir()), tasks=tasks, seed=args.seed)
    result = run_load_processes(cfg, prompts)
    argv0 = "dlp" if Path(sys.argv[0]).name == "dlp" else f"python {sys.argv[0]}"
    rep = report(result, f"{argv0} {shlex.join(sys.argv[1:])}")
    png = write_report(rep, args.out)
    lat, ttft = rep["latency_ms"], rep["ttft_ms"]
    print(
        f"{rep['ok']}/{rep['requests']} ok in {rep['wall_s']:.1f}s: "
        f"{rep['throughput_rps']:.2f} req/s, {rep['tokens_per_s']:.1f} tok/s; latency ms "
        f"p50 {lat['p50']} p95 {lat['p95']} p99 {lat['p99']}; ttft ms p50 {ttft['p50']}; "
        f"errors {rep['errors'] or 'none'}"
    )
    print(f"wrote {args.out} and {png}")
    return 0
