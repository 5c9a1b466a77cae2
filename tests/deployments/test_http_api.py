"""The OpenAI-compatible HTTP API through the real Serve app (official openai client included)."""

from __future__ import annotations

import httpx
import pytest
from servekit import ADAPTERS, Served

pytestmark = [pytest.mark.serve, pytest.mark.timeout(600)]


def _post(served: Served, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{served.url}{path}", json=body, timeout=120, **kw)


def test_healthz_and_models(served: Served) -> None:
    r = httpx.get(f"{served.url}/healthz", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    models = httpx.get(f"{served.url}/v1/models", timeout=30).json()
    ids = [m["id"] for m in models["data"]]
    assert ids[0] == "dlp"
    assert set(ADAPTERS) <= set(ids)


def test_completion_with_one_adapter_reports_the_mix(served: Served) -> None:
    r = _post(served, "/v1/completions", {"model": "beta", "prompt": "Once upon", "max_tokens": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["dlp"]["mix"] == {"beta": 1.0}
    assert body["dlp"]["mix_key"] == "beta=1.000"
    assert body["dlp"]["source"] == "model"
    assert body["usage"]["completion_tokens"] >= 1
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


def test_explicit_mix_overrides_routing(served: Served) -> None:
    r = _post(
        served,
        "/v1/completions",
        {
            "model": "dlp",
            "prompt": "Count: 1 2 3",
            "adapters": {"alpha": 3, "gamma": 1},
            "max_tokens": 3,
        },
    )
    assert r.status_code == 200, r.text
    dlp = r.json()["dlp"]
    assert dlp["source"] == "explicit"
    assert dlp["mix"] == {"alpha": 0.75, "gamma": 0.25}


def test_routed_mix_matches_the_router_in_process(served: Served) -> None:
    """model=dlp routes; the mix reported equals the same router + top-p run here."""
    from dlp.routing.router import RouterService

    prompts = ["Translate this sentence into French.", "How many apples are left?"]
    service = RouterService.from_dir(served.assets.router_dir, p=0.6, max_adapters=3)
    expected = service.route(prompts)
    for prompt, decision in zip(prompts, expected, strict=True):
        r = _post(served, "/v1/completions", {"model": "dlp", "prompt": prompt, "max_tokens": 2})
        assert r.status_code == 200, r.text
        dlp = r.json()["dlp"]
        assert dlp["source"] == "routed"
        assert dlp["mix_key"] == decision.mix.key
        assert dlp["top1"] == decision.top1
    route = _post(served, "/v1/route", {"texts": prompts}).json()
    assert [d["mix_key"] for d in route["decisions"]] == [d.mix.key for d in expected]


def test_served_text_equals_transformers_and_peft(served: Served) -> None:
    """Greedy output through HTTP == transformers generate (base) and PEFT (one adapter)."""
    import torch
    from peft import PeftModel

    from dlp.base_model import load_base_model

    prompt = "The capital of France is"
    n = 6
    model, tok = load_base_model()
    ids = tok(prompt, return_tensors="pt")

    def reference(m) -> str:
        with torch.no_grad():
            out = m.generate(**ids, max_new_tokens=n, do_sample=False)
        return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

    base_ref = reference(model)
    r = _post(
        served,
        "/v1/completions",
        {"prompt": prompt, "adapters": {}, "max_tokens": n, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    assert r.json()["dlp"]["mix"] == {}
    assert r.json()["choices"][0]["text"] == base_ref

    peft_model = PeftModel.from_pretrained(model, served.assets.adapters_dir / "gamma")
    adapter_ref = reference(peft_model)
    r = _post(served, "/v1/completions", {"prompt": prompt, "model": "gamma", "max_tokens": n})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == adapter_ref


def test_openai_client_completions_and_chat_streaming(served: Served) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=120)
    comp = client.completions.create(model="alpha", prompt="Hello", max_tokens=4)
    assert comp.choices[0].text is not None
    assert comp.model_extra["dlp"]["mix"] == {"alpha": 1.0}

    chat = client.chat.completions.create(
        model="dlp",
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=5,
        extra_body={"adapters": {"beta": 1, "gamma": 1}},
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.model_extra["dlp"]["mix"] == {"beta": 0.5, "gamma": 0.5}

    # Streaming: the pieces add up to the same greedy text as the non-streamed call.
    stream = client.chat.completions.create(
        model="dlp",
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"adapters": {"beta": 1, "gamma": 1}},
    )
    pieces, finish, usage, mixes = [], None, None, set()
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
            mixes.add(chunk.model_extra["dlp"]["mix_key"])
    assert "".join(pieces) == chat.choices[0].message.content
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens
    assert mixes == {"beta=0.500,gamma=0.500"}

    text_stream = client.completions.create(
        model="gamma", prompt="Once upon a time", max_tokens=4, stream=True
    )
    streamed = "".join(c.choices[0].text for c in text_stream if c.choices)
    plain = client.completions.create(model="gamma", prompt="Once upon a time", max_tokens=4)
    assert streamed == plain.choices[0].text


def test_sentence_level_routing_runs_and_reports_switches(served: Served) -> None:
    """routing=sentence re-routes at sentence ends through the router deployment; whatever
    the router decides, the response lists the switches made (possibly none)."""
    r = _post(
        served,
        "/v1/completions",
        {
            "model": "dlp",
            "prompt": "First. Second. Third.",
            "max_tokens": 24,
            "routing": "sentence",
            "stop": ["\n\n"],
        },
    )
    assert r.status_code == 200, r.text
    dlp = r.json()["dlp"]
    assert dlp["source"] == "routed"
    assert isinstance(dlp["switches"], list)
    for s in dlp["switches"]:
        assert s["at_token"] >= 1 and s["mix_key"]
