"""The load generator against a real HTTP server (uvicorn + FastAPI, OpenAI-shaped).

The server here is a small real endpoint, not the dlp app: these tests pin the load
generator's own behaviour (pacing, concurrency, TTFT, error accounting), which needs a server
whose latency and failures are known. The autoscaling harness drives the real app.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from dlp.errors import DlpError
from dlp.loadgen import (
    LoadConfig,
    Prompt,
    parse_config,
    percentiles,
    report,
    run_load,
    run_load_processes,
    summarize,
    write_report,
)
from dlp.ports import free_port

DELAY_S = 0.05  # server think time per request
TOKENS = 4  # chunks per streamed answer
CHUNK_GAP_S = 0.02


class Stats:
    def __init__(self) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict] = []


def make_app(stats: Stats) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        stats.bodies.append(body)
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            if body["prompt"].startswith("FAIL"):
                return JSONResponse({"error": {"message": "boom"}}, status_code=503)
            await asyncio.sleep(DELAY_S)
            mix = {"task_a": 1.0}
            if not body.get("stream"):
                return {
                    "choices": [{"text": "x" * TOKENS, "index": 0}],
                    "usage": {"completion_tokens": TOKENS},
                    "dlp": {"mix": mix, "replica": "r1"},
                }
        finally:
            stats.in_flight -= 1

        async def events():
            for i in range(TOKENS):
                await asyncio.sleep(CHUNK_GAP_S)
                chunk = {"choices": [{"text": f"t{i}", "index": 0}], "dlp": {"mix": mix}}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Stats]]:
    stats = Stats()
    port = free_port()
    config = uvicorn.Config(make_app(stats), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", stats
    srv.should_exit = True
    thread.join(timeout=10)


PROMPTS = [Prompt("task_a", "hello a"), Prompt("task_b", "hello b")]


async def test_closed_loop_keeps_concurrency_and_counts(server: tuple[str, Stats]) -> None:
    url, stats = server
    stats.max_in_flight = 0
    cfg = parse_config(url=url, concurrency=3, max_requests=24, duration_s=30, seed=1)
    result = await run_load(cfg, PROMPTS, progress=False)
    s = summarize(result.records, result.wall_s)
    assert s["requests"] == 24 and s["ok"] == 24 and s["errors"] == {}
    assert s["tasks"] == {"task_a": 12, "task_b": 12}  # round-robin over the mixed prompts
    assert stats.max_in_flight == 3  # exactly the configured clients, never more
    # Each request takes >= DELAY_S on the server, so no latency can be below it.
    assert min(r.latency for r in result.records) >= DELAY_S
    assert s["latency_ms"]["p50"] >= DELAY_S * 1000
    # 3 clients x 1 / 50 ms = at most 60 req/s
    assert 0 < s["throughput_rps"] <= 3 / DELAY_S
    assert all(r.mix == {"task_a": 1.0} and r.replica == "r1" for r in result.records)
    assert s["tokens_per_s"] == pytest.approx(24 * TOKENS / result.wall_s)


def test_processes_share_the_clients(server: tuple[str, Stats]) -> None:
    """Two client processes, two clients each: the server sees four at once, every request
    is recorded once, both tasks are sent."""
    url, stats = server
    stats.max_in_flight = 0
    cfg = parse_config(url=url, concurrency=4, processes=2, max_requests=20, duration_s=60)
    result = run_load_processes(cfg, PROMPTS, progress=True)
    s = summarize(result.records, result.wall_s)
    assert s["requests"] == 20 and s["ok"] == 20
    assert stats.max_in_flight == 4
    assert set(s["tasks"]) == {"task_a", "task_b"}
    assert 0 < result.wall_s < 30
    assert [r.start for r in result.records] == sorted(r.start for r in result.records)


def test_processes_report_each_record_and_stop_on_request(server: tuple[str, Stats]) -> None:
    """A caller follows a multi-process load record by record and ends it early: every
    record reaches on_record once, and no process keeps sending after the stop."""
    url, _ = server
    cfg = parse_config(url=url, concurrency=4, processes=2, duration_s=120)
    seen: list = []
    stop = threading.Event()

    def on_record(rec) -> None:
        seen.append(rec)
        if len(seen) >= 12:
            stop.set()

    t0 = time.monotonic()
    result = run_load_processes(cfg, PROMPTS, progress=False, on_record=on_record, stop=stop)
    assert time.monotonic() - t0 < 60  # stopped long before duration_s
    assert 12 <= len(result.records) <= 12 + 4 + 2 * 4 * 5  # a few stop-poll periods late
    assert sorted(r.start for r in seen) == [r.start for r in result.records]
    assert all(r.ok for r in result.records)


def test_load_shares_add_up() -> None:
    cfg = parse_config(concurrency=5, processes=2, max_requests=7, seed=4)
    shares = [cfg.share(i) for i in range(2)]
    assert [c.concurrency for c in shares] == [3, 2]
    assert [c.max_requests for c in shares] == [4, 3]
    assert [c.seed for c in shares] == [4, 5] and all(c.processes == 1 for c in shares)
    open_loop = parse_config(rate=30.0, processes=3)
    assert [open_loop.share(i).rate for i in range(3)] == [10.0] * 3
    with pytest.raises(DlpError, match="processes"):
        parse_config(concurrency=2, processes=3)


async def test_open_loop_follows_the_rate_not_the_server(server: tuple[str, Stats]) -> None:
    url, _ = server
    rate, duration = 40.0, 1.5
    cfg = parse_config(url=url, rate=rate, duration_s=duration, seed=3)
    result = await run_load(cfg, PROMPTS, progress=False)
    n = len(result.records)
    # Poisson arrivals: 60 expected, a 4-sigma band is ~ +/-31.
    assert 30 <= n <= 95, n
    starts = sorted(r.start for r in result.records)
    assert starts[-1] < duration + 0.1  # nothing is sent after the duration
    # Open loop: arrivals overlap (inter-arrival 25 ms < 50 ms service), unlike closed loop 1.
    overlapping = sum(1 for a, b in itertools.pairwise(starts) if b - a < DELAY_S)
    assert overlapping > n // 4


async def test_streams_measure_ttft_before_the_end(server: tuple[str, Stats]) -> None:
    url, _ = server
    cfg = parse_config(url=url, concurrency=2, max_requests=8, stream_fraction=1.0)
    result = await run_load(cfg, PROMPTS, progress=False)
    assert all(r.ok and r.stream for r in result.records)
    for r in result.records:
        assert r.ttft is not None
        # the first chunk comes one gap after the headers; the rest TOKENS-1 gaps later
        assert r.ttft >= CHUNK_GAP_S
        assert r.latency - r.ttft >= (TOKENS - 1) * CHUNK_GAP_S * 0.9
        assert r.completion_tokens == TOKENS
        assert r.mix == {"task_a": 1.0}
    s = summarize(result.records, result.wall_s)
    assert s["ttft_ms"]["p50"] < s["latency_ms"]["p50"]


async def test_errors_are_counted_by_status(server: tuple[str, Stats], tmp_path: Path) -> None:
    url, _ = server
    prompts = [Prompt("ok_task", "fine"), Prompt("bad_task", "FAIL please")]
    cfg = parse_config(url=url, concurrency=2, max_requests=10)
    result = await run_load(cfg, prompts, progress=False)
    rep = report(result, "pytest")
    assert rep["errors"] == {"503": 5} and rep["ok"] == 5
    out = tmp_path / "load.json"
    png = write_report(rep, out)
    loaded = json.loads(out.read_text())
    assert loaded["errors"] == {"503": 5} and len(loaded["records"]) == 10
    assert set(loaded["latency_ms"]) == {"p50", "p95", "p99"}
    assert png.exists() and png.stat().st_size > 1000


async def test_unreachable_server_is_an_error_not_a_crash() -> None:
    port = free_port()  # nobody listens here
    cfg = parse_config(url=f"http://127.0.0.1:{port}", concurrency=1, max_requests=3, timeout_s=2)
    result = await run_load(cfg, PROMPTS, progress=False)
    assert [r.status for r in result.records] == ["connect"] * 3


def test_config_errors_name_the_field() -> None:
    with pytest.raises(DlpError, match="rate"):
        parse_config(rate=-1.0)
    with pytest.raises(DlpError, match="exactly one of rate"):
        parse_config(rate=1.0, concurrency=2)
    with pytest.raises(DlpError, match="stream_fraction"):
        parse_config(concurrency=1, stream_fraction=2.0)
    assert LoadConfig(concurrency=4).mode == "closed"


def test_percentiles_match_nearest_rank() -> None:
    values = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert percentiles(values) == {"p50": 50.0, "p95": 95.0, "p99": 99.0}


def _write_tasks(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for task, n_test in (("alpha", 3), ("beta", 1), ("gamma", 2)):
        for i in range(n_test + 2):
            split = "test" if i < n_test else "train"
            rows.append(
                {
                    "task": task,
                    "split": split,
                    "id": f"{task}-{i}",
                    "input": f"{task} {split} {i}",
                    "choices": [],
                    "target": "t",
                    "kind": "generative",
                }
            )
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path / "tasks.parquet")


def test_prompts_are_test_split_interleaved_across_tasks(tmp_path: Path) -> None:
    from dlp.loadgen import load_prompts

    _write_tasks(tmp_path)
    prompts = load_prompts(tmp_path, seed=0)
    assert len(prompts) == 6 and all(" test " in p.text for p in prompts)
    # every task appears before any task repeats: the first window already mixes tasks
    assert {p.task for p in prompts[:3]} == {"alpha", "beta", "gamma"}
    assert [p.task for p in prompts].count("alpha") == 3
    only = load_prompts(tmp_path, tasks=["beta"])
    assert [p.text for p in only] == ["beta test 0"]
    with pytest.raises(DlpError, match="delta"):
        load_prompts(tmp_path, tasks=["delta"])


def test_cli_writes_json_and_png(server: tuple[str, Stats], tmp_path: Path, capsys) -> None:
    from dlp.cli import main

    url, _ = server
    data = tmp_path / "data"
    _write_tasks(data)
    out = tmp_path / "res" / "load.json"
    rc = main(
        [
            "bench",
            "load",
            "--url",
            url,
            "--concurrency",
            "2",
            "--max-requests",
            "6",
            "--stream-fraction",
            "0.5",
            "--data-dir",
            str(data),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["ok"] == 6 and rep["mode"] == "closed"
    assert set(rep["tasks"]) == {"alpha", "beta", "gamma"}
    assert {"command", "machine", "date", "throughput_rps", "latency_ms", "ttft_ms"} <= set(rep)
    assert out.with_suffix(".png").exists()
    assert "6/6 ok" in capsys.readouterr().out
    # bad input: one clear line, exit code 2
    assert main(["bench", "load", "--url", url, "--rate", "0", "--data-dir", str(data)]) == 2
    assert "rate" in capsys.readouterr().err
