"""Spare KV cache rows (``spare_rows``): waiting requests are prefilled into cache rows beyond
``max_batch`` before a decode row frees, and a freed row takes the next one at once through
the step's slot table. Every request must get exactly the plain engine's tokens and text."""

from __future__ import annotations

import asyncio
import contextlib

import torch
from engine_helpers import make_engine, request, run_all, tiny_model, write_adapters

from dlp.engine.model import CompactLM
from dlp.routing.mix import AdapterMix

PROMPTS = ["The quick brown fox", "Hello there", "Once upon a time", "A short one", "Why"]


def test_decode_through_a_slot_table_matches_decode_in_place():
    """Two prompts prefilled into cache rows 3 and 1 of a model with spares, decoded with
    slots [3, 1], give the logits of the same prompts in rows 0 and 1 of a plain model."""
    hf = tiny_model("qwen2")
    plain = CompactLM(hf, max_batch=2, max_seq=32)
    spare = CompactLM(hf, max_batch=2, max_seq=32, spare_rows=2)
    assert spare.cache_rows == 5 and spare.scratch_row == 4
    assert spare.k_caches[0].shape[0] == 5 and plain.k_caches[0].shape[0] == 2
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 200, (2, 6), generator=gen)
    lengths = torch.tensor([6, 4])
    tokens = torch.tensor([7, 9])
    positions = lengths.clone()  # the next position of each row
    with torch.no_grad():
        first_plain = plain.prefill(ids, lengths, torch.tensor([0, 1]), None)
        first_spare = spare.prefill(ids, lengths, torch.tensor([3, 1]), None)
        ref = plain.decode(tokens, positions, None)
        out = spare.decode(tokens, positions, None, slots=torch.tensor([3, 1]))
    torch.testing.assert_close(first_spare, first_plain)
    torch.testing.assert_close(out, ref)
    # The step wrote each row's K/V into its own cache row, not into rows 0 / 1.
    torch.testing.assert_close(spare.k_caches[0][3, :, 6], plain.k_caches[0][0, :, 6])
    assert spare.k_caches[0][0].abs().sum() == 0


def _requests(mixes):
    reqs = []
    for i in range(9):
        kwargs = {"max_tokens": 3 + 4 * (i % 4)}
        if i % 3 == 2:
            kwargs["stop"] = ("e",)
        prompt = PROMPTS[i % 5] * (1 + i % 3)
        reqs.append(request(i, mixes[i % len(mixes)], prompt=prompt, **kwargs))
    return reqs


async def _run(engine, reqs, delays):
    async with engine:
        results = await asyncio.wait_for(run_all(engine, reqs, delays), 120)
        return [(r.token_ids, r.text, r.finish_reason) for r in results], engine.stats()


async def test_spare_rows_give_the_plain_engines_tokens(vocab_model, default_tokenizer, tmp_path):
    adapters = write_adapters(vocab_model, tmp_path, ["a0", "a1"])
    mixes = [
        AdapterMix.base(),
        AdapterMix.single("a0"),
        AdapterMix.from_weights({"a0": 0.6, "a1": 0.4}),
    ]
    delays = [0.0, 0.0, 0.0, 0.0, 0.02, 0.05, 0.05, 0.08, 0.12]
    modes = {
        "plain": {},
        "spare": {"spare_rows": 3},
        "spare_overlap": {"spare_rows": 3, "overlap_steps": True, "overlap_queue_ahead": True},
    }
    runs = {}
    for mode, cfg in modes.items():
        engine = make_engine(
            vocab_model, default_tokenizer, adapters, max_batch=3, max_seq_len=256, **cfg
        )
        runs[mode] = await _run(engine, _requests(mixes), delays)
    plain = runs["plain"][0]
    assert {r[2] for r in plain} >= {"length", "stop"}
    assert runs["spare"][0] == plain
    assert runs["spare_overlap"][0] == plain
    for mode in ("spare", "spare_overlap"):
        stats = runs[mode][1]
        assert stats["running"] == 0 and stats["ready"] == 0 and stats["waiting"] == 0


async def test_waiting_requests_are_prefilled_into_spare_rows_ahead(vocab_model, default_tokenizer):
    """Six requests on three decode rows with three spare rows: one prefill fills the rows, the
    next the spare rows (a prefill holds at most max_batch rows), and each of those takes a
    row the moment one frees, with no prefill of its own."""
    reqs = [
        request(i, AdapterMix.base(), prompt=PROMPTS[i % 5], max_tokens=4 + 2 * i, ignore_eos=True)
        for i in range(6)
    ]
    results = {}
    for spare in (0, 3):
        engine = make_engine(
            vocab_model, default_tokenizer, max_batch=3, max_seq_len=128, spare_rows=spare
        )
        async with engine:
            task = asyncio.ensure_future(run_all(engine, reqs))
            max_ready = 0
            while not task.done():
                max_ready = max(max_ready, engine.stats()["ready"])
                await asyncio.sleep(0)
            done = await asyncio.wait_for(task, 60)
            stats = engine.stats()
        results[spare] = ([r.token_ids for r in done], stats, max_ready)
    plain, spare = results[0], results[3]
    assert spare[0] == plain[0]
    assert [len(t) for t in spare[0]] == [4 + 2 * i for i in range(6)]
    assert spare[1]["prefill_calls"] == 2 and spare[2] == 3
    assert plain[1]["prefill_calls"] == 4 and plain[2] == 0  # one per freed row


async def test_cancelling_a_request_that_waits_prefilled(vocab_model, default_tokenizer):
    engine = make_engine(vocab_model, default_tokenizer, max_batch=1, max_seq_len=256, spare_rows=2)
    async with engine:
        first = asyncio.ensure_future(
            engine.generate(
                request(0, AdapterMix.base(), prompt=PROMPTS[0], max_tokens=40, ignore_eos=True)
            )
        )
        ready = asyncio.ensure_future(
            engine.generate(
                request(1, AdapterMix.base(), prompt=PROMPTS[1], max_tokens=40, ignore_eos=True)
            )
        )
        for _ in range(2000):  # until request 1 waits prefilled behind request 0
            if engine.stats()["ready"] == 1:
                break
            await asyncio.sleep(0.001)
        assert engine.stats()["ready"] == 1
        ready.cancel()
        later = request(2, AdapterMix.base(), prompt=PROMPTS[2], max_tokens=5, ignore_eos=True)
        results = await asyncio.wait_for(asyncio.gather(first, engine.generate(later)), 60)
        stats = engine.stats()
    assert [r.completion_tokens for r in results] == [40, 5]
    assert stats["cancelled"] == 1 and stats["ready"] == 0 and stats["running"] == 0
    assert sorted(engine._free_slots) == [0, 1, 2]  # every cache row back


async def test_a_failed_prefill_into_spare_rows_answers_every_request(
    vocab_model, default_tokenizer
):
    """Fault injection: the second prefill (into the spare rows) fails. The requests it was
    prefilling hold no decode row, and must be answered with the error like the others."""
    engine = make_engine(vocab_model, default_tokenizer, max_batch=3, max_seq_len=128, spare_rows=3)
    real = engine.runner.prefill_host
    calls = []

    def prefill_host(*args, **kwargs):
        calls.append(len(args[0]))
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return real(*args, **kwargs)

    engine.runner.prefill_host = prefill_host
    reqs = [
        request(i, AdapterMix.base(), prompt=PROMPTS[i % 5], max_tokens=30, ignore_eos=True)
        for i in range(6)
    ]
    await engine.start()
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(engine.generate(r) for r in reqs), return_exceptions=True), 60
        )
    finally:
        with contextlib.suppress(RuntimeError):  # the loop's own failure, re-raised at stop
            await engine.stop()
    assert calls == [3, 3]
    assert all(isinstance(r, RuntimeError) and "device lost" in str(r) for r in results)
