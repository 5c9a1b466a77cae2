"""The app with `worker.engine_process: true` (the engine in a child process of each worker
replica), next to the session's app with the engine in-process: same answers over HTTP (the
official openai client, streaming included), same 4xx for bad input, adapter registration,
stats through the worker's handle."""

from __future__ import annotations

import httpx
import pytest
from servekit import ADMIN_TOKEN, Served, app_args, wait_healthy, write_adapter

pytestmark = [pytest.mark.serve, pytest.mark.timeout(900)]

APP = "dlp-proc"


def test_app_with_the_engine_in_a_child_process(served: Served) -> None:
    from openai import OpenAI
    from ray import serve

    from deployments.app import build_app

    args = app_args(served.assets)
    args["worker"].update(engine_process=True, num_replicas=1)
    serve.run(build_app(args), name=APP, route_prefix="/proc", blocking=False)
    url = f"{served.url}/proc"
    try:
        wait_healthy(url, timeout_s=300)
        here = OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=120)
        child = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        body = dict(
            model="dlp",
            messages=[{"role": "user", "content": "Name a colour."}],
            max_tokens=8,
            extra_body={"adapters": {"beta": 1, "gamma": 1}},
        )
        expected = here.chat.completions.create(**body)
        got = child.chat.completions.create(**body)
        assert got.choices[0].message.content == expected.choices[0].message.content
        assert got.model_extra["dlp"]["mix"] == {"beta": 0.5, "gamma": 0.5}
        assert got.usage.completion_tokens == expected.usage.completion_tokens

        stream = child.completions.create(
            model="gamma", prompt="Once upon", max_tokens=6, stream=True
        )
        streamed = "".join(c.choices[0].text for c in stream if c.choices)
        plain = here.completions.create(model="gamma", prompt="Once upon", max_tokens=6)
        assert streamed == plain.choices[0].text

        # Bad input: the engine's errors cross the process boundary with their field.
        bad = httpx.post(
            f"{url}/v1/completions",
            json={"model": "alpha", "prompt": "Hi", "max_tokens": 4, "top_p": 0},
            timeout=60,
        )
        assert bad.status_code == 400 and "top_p" in bad.text

        # An adapter registered through the API lands in the child's pool and serves.
        root = served.assets.root / "proc"
        write_adapter(root, "delta_proc", seed=41)
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        reg = httpx.post(
            f"{url}/v1/adapters",
            json={"name": "delta_proc", "path": "proc/delta_proc"},
            headers=headers,
            timeout=120,
        )
        assert reg.status_code in (200, 201), reg.text
        comp = child.completions.create(model="delta_proc", prompt="Hello", max_tokens=3)
        assert comp.model_extra["dlp"]["mix"] == {"delta_proc": 1.0}

        worker = serve.get_deployment_handle("LoraWorker", app_name=APP)
        stats = worker.stats.remote().result(timeout_s=60)
        assert stats["requests"] >= 4 and stats["running"] == 0
        assert "delta_proc" in stats["pool"]["host_resident"] + stats["pool"]["resident"]
    finally:
        httpx.delete(
            f"{url}/v1/adapters/delta_proc",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=60,
        )
        serve.delete(APP)
