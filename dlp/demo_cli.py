"""`dlp demo`: set-up, start Ray and the app from serve_config.yaml, send real test-split
prompts of several tasks over HTTP, print task / routed mix / answer, shut down.

Ray is imported inside the command only (``dlp/`` keeps Ray out of the library proper; this
is a CLI entry point that starts the Serve app, like ``dlp serve``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from dlp.errors import DlpError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="set up, serve the app, send test prompts of several tasks, print the routed mixes",
        description=(
            "Runs `dlp setup`, starts Ray and the `dlp` app from serve_config.yaml (embedded "
            "SmolLM2 model, demo adapters, default router), sends one real test-split prompt "
            "per task over HTTP (model: dlp, so the router picks the mix) and prints the task, "
            "the routed mix and the answer. Shuts down at the end unless --keep-serving."
        ),
    )
    p.add_argument("--config", type=Path, default=None, help="serve config (serve_config.yaml)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's)")
    p.add_argument("--tasks", type=int, default=6, help="how many tasks to show (>= 5)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per answer")
    p.add_argument("--keep-serving", action="store_true", help="keep the app up after the demo")
    p.add_argument("--cache-dir", type=Path, default=None, help="cache root")
    p.set_defaults(func=run_demo)


def _setup(cache: Path | None) -> None:
    from dlp.setup_cli import run_setup

    code = run_setup(argparse.Namespace(model_only=False, cache_dir=cache))
    if code:
        raise DlpError("set-up failed")


def _pick_examples(data: Path, adapters: list[str], n: int) -> list[dict[str, Any]]:
    """The first test example of each task that has an adapter (in the data's task order)."""
    from dlp.data.dataset import load_tasks, task_names

    table = load_tasks(data, split="test")
    rows = table.to_pylist()
    picked: list[dict[str, Any]] = []
    for task in task_names(table):
        if task not in adapters:
            continue
        picked.append(next(r for r in rows if r["task"] == task))
        if len(picked) == n:
            break
    return picked


def _call(url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """GET (or POST JSON) with the standard library: the demo needs no HTTP client package."""
    import json
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _fmt_mix(mix: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in sorted(mix.items(), key=lambda kv: -kv[1]))


def run_demo(args: argparse.Namespace) -> int:
    from dlp.paths import cache_dir, data_dir
    from dlp.serve_cli import default_config_path, load_serve_config
    from dlp.training.prompts import chat_messages

    if args.tasks < 1:
        raise DlpError("--tasks must be >= 1")
    if args.max_tokens < 1:
        raise DlpError("--max-tokens must be >= 1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    config_path = args.config or default_config_path()
    config = load_serve_config(config_path)
    (app_cfg,) = [a for a in config["applications"] if a.get("name") == "dlp"]
    app_args = dict(app_cfg.get("args") or {})
    if args.cache_dir:
        app_args["cache_dir"] = str(args.cache_dir)
        os.environ["DLP_CACHE_DIR"] = str(args.cache_dir)
    root = cache_dir(app_args.get("cache_dir"))

    print("== set-up", flush=True)
    _setup(root)

    import ray
    from ray import serve

    from deployments.app import build_app

    http = dict(config.get("http_options") or {})
    port = args.port or int(http.get("port", 8000))
    host = http.get("host", "127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    print(f"== starting Ray and the app from {config_path} (port {port})", flush=True)
    started = time.monotonic()
    # address="local": a fresh cluster for the demo, even if `ray start` left one behind.
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(app_args), name="dlp", route_prefix=app_cfg.get("route_prefix", "/"))
        print(f"   app up in {time.monotonic() - started:.0f}s at {url}", flush=True)
        status, listing = _call(f"{url}/v1/adapters")
        if status != 200:
            raise DlpError(f"GET /v1/adapters answered {status}: {listing}")
        adapters = [a["name"] for a in listing["data"]]
        examples = _pick_examples(data_dir(root), adapters, args.tasks)
        if len(examples) < min(5, args.tasks):
            print(
                f"warning: only {len(examples)} tasks have both data and an adapter",
                file=sys.stderr,
            )
        print(f"== {len(examples)} test prompts, model=dlp (the router picks the mix)\n")
        for ex in examples:
            messages = chat_messages(ex["input"][-1500:], ex["choices"] or None)
            status, body = _call(
                f"{url}/v1/chat/completions",
                {"model": "dlp", "messages": messages, "max_tokens": args.max_tokens},
            )
            if status != 200:
                print(f"[{ex['task']}] HTTP {status}: {str(body)[:300]}")
                continue
            answer = body["choices"][0]["message"]["content"].strip().replace("\n", " ")
            question = ex["input"].strip().replace("\n", " ")
            print(f"task:   {ex['task']}")
            print(f"prompt: {question[:160]}{'...' if len(question) > 160 else ''}")
            print(f"mix:    {_fmt_mix(body['dlp']['mix'])}   (router top-1: {body['dlp']['top1']})")
            print(f"answer: {answer[:300]}")
            print(f"target: {str(ex['target'])[:160]}\n", flush=True)
        if args.keep_serving:
            print(f"== serving at {url} (OpenAI API under /v1); Ctrl-C stops", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    finally:
        print("== shutting down", flush=True)
        serve.shutdown()
        ray.shutdown()
    return 0
