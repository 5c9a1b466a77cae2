"""Issue 5 item 5: the Python handle API (`generate`, `route`) and the README example."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from servekit import ADAPTERS, APP_NAME, Served

pytestmark = [pytest.mark.serve, pytest.mark.timeout(600)]

README = Path(__file__).resolve().parents[2] / "README.md"


def test_generate_and_route_handles(served: Served) -> None:
    from ray import serve

    from deployments.api_models import GenerateRequest, GenerateResponse, RouteRequest

    handle = serve.get_app_handle(APP_NAME)
    res = handle.generate.remote(
        GenerateRequest(prompt="Hello", adapters={"alpha": 1, "beta": 3}, max_tokens=3)
    ).result(timeout_s=120)
    assert isinstance(res, GenerateResponse)
    assert res.dlp.mix == {"alpha": 0.25, "beta": 0.75}
    assert res.dlp.source == "explicit"
    assert 1 <= res.completion_tokens <= 3

    chat = handle.generate.remote(
        GenerateRequest(messages=[{"role": "user", "content": "Hi"}], model="gamma", max_tokens=2)
    ).result(timeout_s=120)
    assert chat.dlp.mix == {"gamma": 1.0}

    routed = handle.route.remote(RouteRequest(texts=["a", "b c d"], p=1.0)).result(timeout_s=60)
    assert len(routed.decisions) == 2
    for d in routed.decisions:
        # p = 1 keeps every label (capped by the app's max_adapters_per_mix = 3 = all here).
        assert set(d.mix) == set(ADAPTERS)
        assert abs(sum(d.mix.values()) - 1.0) < 1e-9
        assert d.top1 in ADAPTERS


def test_readme_handle_example_runs(served: Served) -> None:
    """The README's Python-handle example, run as written against the live app."""
    text = README.read_text()
    match = re.search(r"<!-- handle-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lacks the handle example block"
    code = match.group(1)
    namespace: dict = {}
    exec(compile(code, "README-handle-example", "exec"), namespace)
    assert namespace["response"].dlp.mix_key
    assert namespace["routes"].decisions
