"""Issue 8 item 1: every bad request gets a 4xx naming the field; zero 5xx over the table;
the app keeps serving (a normal request right after each case succeeds)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from servekit import APP_NAME, Served

pytestmark = [pytest.mark.serve, pytest.mark.timeout(600)]

OK = {"model": "alpha", "prompt": "Hello there", "max_tokens": 2}
CHAT_OK = {"model": "alpha", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
LONG_PROMPT = "word " * 400  # > 256 tokens (the test app's context)


def body(**changes: Any) -> dict[str, Any]:
    out = dict(OK)
    for k, v in changes.items():
        if v is _DROP:
            out.pop(k, None)
        else:
            out[k] = v
    return out


_DROP = object()

# (case id, path, raw body (bytes) or JSON-able body, expected status, expected field prefix)
CASES: list[tuple[str, str, Any, int, str]] = [
    ("malformed_json", "/v1/completions", b'{"prompt": "hi",', 400, "body"),
    ("not_an_object", "/v1/completions", b"[1, 2]", 400, "body"),
    ("invalid_utf8", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400, "body"),
    ("missing_prompt", "/v1/completions", body(prompt=_DROP), 400, "prompt"),
    ("prompt_wrong_type", "/v1/completions", body(prompt=12), 400, "prompt"),
    ("max_tokens_wrong_type", "/v1/completions", body(max_tokens="many"), 400, "max_tokens"),
    ("empty_prompt", "/v1/completions", body(prompt=""), 400, "prompt"),
    ("blank_prompt", "/v1/completions", body(prompt="   \n"), 400, "prompt"),
    ("prompt_over_context", "/v1/completions", body(prompt=LONG_PROMPT), 400, "prompt"),
    (
        "prompt_plus_max_tokens_over_context",
        "/v1/completions",
        body(prompt="word " * 220, max_tokens=60),
        400,
        "max_tokens",
    ),
    ("max_tokens_zero", "/v1/completions", body(max_tokens=0), 400, "max_tokens"),
    ("max_tokens_negative", "/v1/completions", body(max_tokens=-5), 400, "max_tokens"),
    ("max_tokens_over_cap", "/v1/completions", body(max_tokens=65), 400, "max_tokens"),
    ("temperature_negative", "/v1/completions", body(temperature=-0.1), 400, "temperature"),
    (
        "temperature_nan",
        "/v1/completions",
        b'{"prompt": "hi", "temperature": NaN}',
        400,
        "temperature",
    ),
    ("top_p_zero", "/v1/completions", body(top_p=0), 400, "top_p"),
    ("top_p_above_one", "/v1/completions", body(top_p=1.5), 400, "top_p"),
    ("n_two", "/v1/completions", body(n=2), 400, "n"),
    ("unknown_model", "/v1/completions", body(model="no-such-adapter"), 404, "model"),
    (
        "unknown_adapter",
        "/v1/completions",
        body(model="dlp", adapters={"alpha": 1, "nope": 1}),
        404,
        "adapters",
    ),
    (
        "negative_weight",
        "/v1/completions",
        body(model="dlp", adapters={"alpha": 1, "beta": -1}),
        400,
        "adapters",
    ),
    (
        "nan_weight",
        "/v1/completions",
        b'{"prompt": "hi", "adapters": {"alpha": NaN}}',
        400,
        "adapters",
    ),
    (
        "infinite_weight",
        "/v1/completions",
        b'{"prompt": "hi", "adapters": {"alpha": Infinity}}',
        400,
        "adapters",
    ),
    (
        "all_zero_weights",
        "/v1/completions",
        body(model="dlp", adapters={"alpha": 0, "beta": 0}),
        400,
        "adapters",
    ),
    (
        "too_many_adapters",
        "/v1/completions",
        body(model="dlp", adapters={"alpha": 1, "beta": 1, "gamma": 1, "delta": 1}),
        400,
        "adapters",
    ),
    (
        "weight_wrong_type",
        "/v1/completions",
        body(model="dlp", adapters={"alpha": "lots"}),
        400,
        "adapters",
    ),
    ("control_character", "/v1/completions", body(prompt="hi\u0001there"), 400, "prompt"),
    ("lone_surrogate", "/v1/completions", b'{"prompt": "hi \\ud800"}', 400, "prompt"),
    ("body_over_cap", "/v1/completions", body(prompt="a" * 70_000), 413, "body"),
    ("too_many_stop_strings", "/v1/completions", body(stop=["a", "b", "c"]), 400, "stop"),
    ("empty_stop_string", "/v1/completions", body(stop=[""]), 400, "stop"),
    ("echo_unsupported", "/v1/completions", body(echo=True), 400, "echo"),
    ("stream_bad_input", "/v1/completions", body(stream=True, max_tokens=0), 400, "max_tokens"),
    (
        "stream_over_context",
        "/v1/completions",
        body(stream=True, prompt=LONG_PROMPT),
        400,
        "prompt",
    ),
    ("chat_no_messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    (
        "chat_no_user",
        "/v1/chat/completions",
        {"messages": [{"role": "system", "content": "x"}]},
        400,
        "messages",
    ),
    (
        "chat_bad_role",
        "/v1/chat/completions",
        {"messages": [{"role": "wizard", "content": "x"}]},
        400,
        "messages.0.role",
    ),
    (
        "chat_empty_content",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": ""}]},
        400,
        "messages",
    ),
    (
        "chat_control_char",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a\u0007b"}]},
        400,
        "messages",
    ),
    ("chat_unknown_model", "/v1/chat/completions", {**CHAT_OK, "model": "nope"}, 404, "model"),
    ("route_no_texts", "/v1/route", {"texts": []}, 400, "texts"),
    ("route_bad_p", "/v1/route", {"texts": ["x"], "p": 0}, 400, "p"),
    ("route_empty_text", "/v1/route", {"texts": [""]}, 400, "texts"),
    ("route_bad_weighting", "/v1/route", {"texts": ["x"], "weighting": "max"}, 400, "weighting"),
]


def _send(served: Served, path: str, payload: Any) -> httpx.Response:
    if isinstance(payload, bytes):
        return httpx.post(
            f"{served.url}{path}",
            content=payload,
            headers={"content-type": "application/json"},
            timeout=120,
        )
    return httpx.post(f"{served.url}{path}", json=payload, timeout=120)


def test_bad_request_table(served: Served) -> None:
    """One pass over the table (shares the app); reports every mismatch at once."""
    statuses: dict[str, int] = {}
    problems: list[str] = []
    for case, path, payload, status, field in CASES:
        r = _send(served, path, payload)
        statuses[case] = r.status_code
        try:
            err = r.json()["error"]
        except (ValueError, KeyError, TypeError):
            problems.append(f"{case}: {r.status_code} without an error body: {r.text[:200]}")
            continue
        if r.status_code != status:
            problems.append(f"{case}: status {r.status_code} != {status}: {err}")
        if not str(err.get("param") or "").startswith(field):
            problems.append(f"{case}: param {err.get('param')!r} does not name {field!r}")
        if field.split(".")[0] not in err["message"] and field != "body":
            problems.append(f"{case}: message does not name the field: {err['message']!r}")
    server_errors = [c for c, s in statuses.items() if s >= 500]
    assert server_errors == [], f"5xx for: {server_errors}"
    assert problems == [], "\n".join(problems)
    # The replicas are still healthy: normal requests succeed right after.
    r = _send(served, "/v1/completions", OK)
    assert r.status_code == 200, r.text
    r = _send(served, "/v1/chat/completions", CHAT_OK)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "hi", "max_tokens": 1000}, "max_tokens"),
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "adapters": {"alpha": -1.0}}, "adapters"),
        ({"prompt": "hi", "model": "nope"}, "model"),
        ({}, "prompt"),
    ],
)
def test_bad_handle_requests_raise_request_error(
    served: Served, payload: dict[str, Any], field: str
) -> None:
    from ray import serve

    from deployments.api_models import RequestError

    handle = serve.get_app_handle(APP_NAME)
    with pytest.raises(RequestError) as info:
        handle.generate.remote(payload).result(timeout_s=120)
    assert 400 <= info.value.status < 500
    assert (info.value.field or "").startswith(field), info.value
    ok = handle.generate.remote({"prompt": "hi", "model": "alpha", "max_tokens": 1})
    assert ok.result(timeout_s=120).completion_tokens >= 0


def test_error_bodies_are_openai_shaped(served: Served) -> None:
    r = _send(served, "/v1/completions", body(max_tokens=0))
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    json.dumps(err)  # plain JSON
