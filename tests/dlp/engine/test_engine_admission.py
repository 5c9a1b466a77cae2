"""Admission while rows decode: waiting requests are prefilled in groups (admit_min_rows) or
after admit_max_wait_steps decode steps, never held back by a long request, and their
outputs are the ones they get alone."""

from __future__ import annotations

import asyncio
import time

import pytest
from engine_helpers import make_engine, request

from dlp.engine.config import EngineConfig
from dlp.errors import DlpError
from dlp.routing.mix import AdapterMix

PROMPTS = ["The quick brown fox", "Hello there", "Once upon a time", "A short one"]


async def _until(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.001)


def _short(i: int):
    return request(i, AdapterMix.base(), prompt=PROMPTS[i % 4], max_tokens=4, ignore_eos=True)


async def test_waiting_requests_are_prefilled_together(vocab_model, default_tokenizer):
    engine = make_engine(
        vocab_model,
        default_tokenizer,
        max_batch=8,
        max_seq_len=512,
        admit_min_rows=3,
        admit_max_wait_steps=10_000,
    )
    async with engine:
        alone = [await engine.generate(_short(i)) for i in range(3)]
        base = engine.stats()
        long = asyncio.create_task(
            engine.generate(
                request(9, AdapterMix.base(), prompt=PROMPTS[0], max_tokens=400, ignore_eos=True)
            )
        )
        await _until(lambda: engine.stats()["decode_steps"] > base["decode_steps"])
        first_two = [asyncio.create_task(engine.generate(_short(i))) for i in range(2)]
        steps = engine.stats()["decode_steps"]
        await _until(lambda: engine.stats()["decode_steps"] >= steps + 5)
        held = engine.stats()
        # Two waiting, three needed: they wait while the long request decodes.
        assert held["waiting"] == 2 and held["running"] == 1
        assert held["prefill_calls"] == base["prefill_calls"] + 1
        third = asyncio.create_task(engine.generate(_short(2)))
        together = await asyncio.wait_for(asyncio.gather(*first_two, third), 60)
        after = engine.stats()
        # The three short ones finished while the long one still runs: one prefill for all.
        assert not long.done()
        assert after["prefill_calls"] == base["prefill_calls"] + 2
        assert after["prefill_rows"] == base["prefill_rows"] + 4
        long.cancel()
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]


async def test_a_lone_waiting_request_is_admitted_after_the_wait(vocab_model, default_tokenizer):
    engine = make_engine(
        vocab_model,
        default_tokenizer,
        max_batch=8,
        max_seq_len=512,
        admit_min_rows=4,
        admit_max_wait_steps=6,
    )
    async with engine:
        long = asyncio.create_task(
            engine.generate(
                request(9, AdapterMix.base(), prompt=PROMPTS[0], max_tokens=400, ignore_eos=True)
            )
        )
        await _until(lambda: engine.stats()["decode_steps"] > 0)
        submitted_at = engine.stats()["decode_steps"]
        # The first chunk is the prefill's token: the step count then is the admission's.
        stream = engine.generate_stream(_short(1))
        first = await asyncio.wait_for(stream.__anext__(), 30)
        admitted_at = engine.stats()["decode_steps"]
        rest = [c async for c in stream]
        assert not long.done()
        long.cancel()
    assert 6 <= admitted_at - submitted_at <= 8
    assert (rest or [first])[-1].completion_tokens == 4


async def test_deep_queue_still_prefills_in_groups(vocab_model, default_tokenizer):
    """Requests that have waited long (a deep queue) do not make every freed row a prefill of
    its own: after a prefill, the next waits for admit_min_rows free rows or the wait limit."""
    engine = make_engine(
        vocab_model,
        default_tokenizer,
        max_batch=4,
        max_seq_len=512,
        admit_min_rows=3,
        admit_max_wait_steps=6,
    )

    def job(i: int, tokens: int):
        return request(
            i, AdapterMix.base(), prompt=PROMPTS[i % 4], max_tokens=tokens, ignore_eos=True
        )

    async with engine:
        # Four rows that free one decode step apart, four requests queued behind them from
        # step 0 (so by the time rows free, the oldest has waited far past the limit).
        running = [job(i, 10 + i) for i in range(4)]
        queued = [job(4 + i, 30) for i in range(4)]
        results = await asyncio.wait_for(
            asyncio.gather(*(engine.generate(r) for r in running + queued)), 120
        )
        stats = engine.stats()
    assert [r.completion_tokens for r in results] == [10, 11, 12, 13, 30, 30, 30, 30]
    # First row frees past the wait limit: admitted alone; the next three wait until three
    # rows are free, then share one prefill (arrival-only counting gave 1+1+1+1).
    assert stats["prefill_calls"] == 3
    assert stats["prefill_rows"] == 8


async def test_idle_engine_admits_at_once(vocab_model, default_tokenizer):
    engine = make_engine(
        vocab_model, default_tokenizer, max_batch=8, admit_min_rows=8, admit_max_wait_steps=10_000
    )
    async with engine:
        result = await asyncio.wait_for(engine.generate(_short(0)), 30)
    assert result.completion_tokens == 4


def test_admission_settings_are_validated():
    assert EngineConfig(max_batch=64).admit_rows == 8
    assert EngineConfig(max_batch=4).admit_rows == 1
    assert EngineConfig(max_batch=64, admit_min_rows=1).admit_rows == 1
    for bad in ({"admit_min_rows": 0}, {"admit_max_wait_steps": -1}, {"admit_min_rows": True}):
        with pytest.raises(DlpError, match="admit_"):
            EngineConfig(**bad).validate()


async def test_compiled_forwards_match_eager(vocab_model, default_tokenizer, tmp_path):
    """torch.compile'd decode and prefill (dynamic rows x tokens, prompts padded to 16) give
    the eager engine's tokens, for single-row and multi-row prefills with mixed adapters."""
    from engine_helpers import run_all, write_adapters

    adapters = write_adapters(vocab_model, tmp_path, ["a0", "a1"])
    mixes = [
        AdapterMix.base(),
        AdapterMix.single("a0"),
        AdapterMix.from_weights({"a0": 0.7, "a1": 0.3}),
    ]
    reqs = [
        request(i, mixes[i % 3], prompt=PROMPTS[i % 4] * (1 + i), max_tokens=6, ignore_eos=True)
        for i in range(5)
    ]
    outputs = []
    for compile_ in (False, True):
        engine = make_engine(
            vocab_model, default_tokenizer, adapters, max_batch=4, compile=compile_
        )
        async with engine:
            assert engine.runner.prefill_compiled == compile_
            alone = await engine.generate(reqs[0])
            batch = await asyncio.wait_for(run_all(engine, reqs[1:]), 300)
        outputs.append([r.token_ids for r in [alone, *batch]])
    assert outputs[0] == outputs[1]
