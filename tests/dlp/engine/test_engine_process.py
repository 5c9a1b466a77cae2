"""The engine in a child process (``EngineProcess``): the in-process engine's tokens and text,
streams, its errors as the same classes with their fields, adapter registration, cancellation,
sentence routing through the parent's router, and a dead child answering every request."""

from __future__ import annotations

import asyncio
import shutil
import sys

import pytest
from engine_helpers import request, sentence_routing_case, vocab_llama_spec, write_adapters

from dlp.engine.config import EngineConfig
from dlp.engine.engine import Engine, load_model
from dlp.engine.engine_process import EngineProcess
from dlp.engine.types import GenerationRequest, InvalidRequestError
from dlp.errors import DlpError, InvalidMixError
from dlp.routing.mix import AdapterMix

PROMPTS = ["The quick brown fox", "Hello there", "Once upon a time", "A short one", "Why"]


def _config(default_tokenizer, default_model_dir, **kw) -> EngineConfig:
    # Random weights from a seed: the child builds the very model the parent's reference does.
    spec = dict(model_type="llama", **vocab_llama_spec(default_tokenizer))
    kw.setdefault("max_batch", 4)
    kw.setdefault("max_seq_len", 128)
    return EngineConfig(model_config=spec, tokenizer_path=str(default_model_dir), seed=3, **kw)


def _requests() -> list[GenerationRequest]:
    mixes = [
        AdapterMix.base(),
        AdapterMix.single("t0"),
        AdapterMix.from_weights({"t0": 0.6, "t1": 0.4}),
    ]
    return [
        request(i, mixes[i % 3], prompt=PROMPTS[i % 5], max_tokens=6 + i, ignore_eos=True)
        for i in range(6)
    ] + [request(6, mixes[1], prompt=PROMPTS[0], max_tokens=20, stop=("e",))]


async def _until(check, timeout_s: float = 30.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


async def test_engine_process_is_the_engine(default_tokenizer, default_model_dir, tmp_path):
    root = tmp_path / "adapters"
    config = _config(default_tokenizer, default_model_dir, adapter_root=str(root))
    model, _ = load_model(config)
    write_adapters(model, root, ["t0", "t1"])
    extra = write_adapters(model, tmp_path / "extra", ["t2"])["t2"]

    async with Engine.from_config(config) as engine:
        expected = await asyncio.gather(*(engine.generate(r) for r in _requests()))
        expected_stream = [c async for c in engine.generate_stream(_requests()[2])]

    child = EngineProcess(config, torch_threads=1)
    assert child.tokenizer is not None  # the worker counts oversized prompts itself
    async with child:
        got = await asyncio.gather(*(child.generate(r) for r in _requests()))
        stream = [c async for c in child.generate_stream(_requests()[2])]
        assert [r.token_ids for r in got] == [r.token_ids for r in expected]
        assert [(r.text, r.mix, r.finish_reason) for r in got] == [
            (r.text, r.mix, r.finish_reason) for r in expected
        ]
        assert got[-1].finish_reason == "stop"
        assert [(c.text, c.token_ids) for c in stream] == [
            (c.text, c.token_ids) for c in expected_stream
        ]
        assert stream[-1].finish_reason == "length"

        # Errors come back as the engine's classes, naming the field.
        with pytest.raises(InvalidRequestError) as err:
            await child.generate(request(0, AdapterMix.base(), prompt=PROMPTS[0], max_tokens=0))
        assert err.value.field == "max_tokens"
        with pytest.raises(InvalidRequestError) as err:
            await child.generate(request(0, AdapterMix.base(), prompt="word " * 200))
        assert err.value.field == "prompt"
        with pytest.raises(InvalidMixError, match="unknown adapter"):
            await child.generate(request(0, AdapterMix.single("nope"), prompt=PROMPTS[0]))

        # Adapters register in the child's pool (from a thread, as the worker calls it).
        await asyncio.to_thread(child.pool.register, "t2", extra, True)
        assert "t2" in await asyncio.to_thread(lambda: child.pool.stats()["host_resident"])
        res = await child.generate(request(9, AdapterMix.single("t2"), prompt=PROMPTS[1]))
        assert res.mix == AdapterMix.single("t2") and res.completion_tokens == 12
        with pytest.raises(DlpError):
            await asyncio.to_thread(child.pool.register, "bad", tmp_path / "missing", True)

        # Breaking off a stream cancels the request in the child and frees its row.
        long = request(10, AdapterMix.base(), prompt=PROMPTS[3], max_tokens=100, ignore_eos=True)
        stream_iter = child.generate_stream(long)
        assert (await anext(stream_iter)).finish_reason is None
        await stream_iter.aclose()
        await _until(lambda: child.stats()["cancelled"] == 1 and child.stats()["running"] == 0)
        stats = child.stats()
        assert stats["waiting"] == 0 and stats["pool"]["resident"]
        assert child.running
    assert not child.running
    with pytest.raises(DlpError, match="not running"):
        await child.generate(_requests()[0])


async def test_a_dead_engine_process_answers_every_request(default_tokenizer, default_model_dir):
    child = EngineProcess(
        _config(default_tokenizer, default_model_dir, max_batch=2), torch_threads=1
    )
    await child.start()
    try:
        reqs = [
            request(i, AdapterMix.base(), prompt=PROMPTS[i], max_tokens=400, ignore_eos=True)
            for i in range(4)  # two decode, two wait
        ]
        tasks = [asyncio.ensure_future(child.generate(r)) for r in reqs]
        await _until(lambda: child.stats()["running"] == 2)
        child._proc.kill()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        assert all(isinstance(r, DlpError) and "exited" in str(r) for r in results)
        assert not child.running  # the worker's health check fails: Serve replaces it
    finally:
        await child.stop()


async def test_an_engine_that_fails_to_start_says_why(default_tokenizer, default_model_dir):
    """The child fails building its engine (no such adapter root): start() raises its error."""
    config = _config(default_tokenizer, default_model_dir, adapter_root="/no/such/adapters")
    child = EngineProcess(config, torch_threads=1)
    with pytest.raises(DlpError, match="adapter_root"):
        await asyncio.wait_for(child.start(), 120)
    assert not child.running
    await child.stop()


async def test_a_child_that_dies_before_connecting_is_noticed(
    default_tokenizer, default_model_dir, monkeypatch
):
    child = EngineProcess(_config(default_tokenizer, default_model_dir), torch_threads=1)
    monkeypatch.setattr(sys, "executable", shutil.which("false"))  # exits at once, code 1
    with pytest.raises(DlpError, match="exited with code 1 on start-up"):
        await asyncio.wait_for(child.start(), 30)
    assert not child.running
    await child.stop()


async def test_sentence_routing_asks_the_parents_router(default_model, default_model_dir, tmp_path):
    """The embedded default model (it ends sentences), routed per sentence: the child asks
    the router in the parent process and switches the mix."""
    root = tmp_path / "adapters"
    write_adapters(default_model, root, ["a0", "a1"], b_std=0.05)
    reroute, calls, req = sentence_routing_case()
    config = EngineConfig(adapter_root=str(root), max_batch=2, max_seq_len=128)
    child = EngineProcess(config, reroute=reroute, torch_threads=1)
    async with child:
        routed = await child.generate(req)
    assert routed.mix_switches and routed.mix == AdapterMix.single("a1")
    assert calls and calls[0].startswith("The capital of France is")
