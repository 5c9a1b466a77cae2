"""Overlapped decode steps (``overlap_steps``): step N+1 is queued before step N's tokens are
handled, greedy rows feeding their own token on the device. Every request must get exactly
the tokens and text of the synchronous engine, whatever joins, stops or leaves meanwhile."""

from __future__ import annotations

import asyncio

from engine_helpers import make_engine, request, run_all, write_adapters

from dlp.routing.mix import AdapterMix

PROMPTS = ["The quick brown fox", "Hello there", "Once upon a time", "A short one", "Why"]


def _requests(mixes, sampled: int | None = None):
    reqs = []
    for i in range(9):
        kwargs = {"max_tokens": 3 + 4 * (i % 4)}
        if i % 3 == 2:
            kwargs["stop"] = ("e",)  # in most of this random model's words
        if i == sampled:
            kwargs.update(temperature=0.8, seed=7)
        reqs.append(
            request(i, mixes[i % len(mixes)], prompt=PROMPTS[i % 5] * (1 + i % 3), **kwargs)
        )
    return reqs


async def _run(engine, reqs, delays):
    async with engine:
        results = await asyncio.wait_for(run_all(engine, reqs, delays), 120)
        return results, engine.stats()


def _outputs(results):
    return [(r.token_ids, r.text, r.finish_reason, r.completion_tokens) for r in results]


async def test_overlapped_steps_give_the_synchronous_tokens(
    vocab_model, default_tokenizer, tmp_path
):
    adapters = write_adapters(vocab_model, tmp_path, ["a0", "a1"])
    mixes = [
        AdapterMix.base(),
        AdapterMix.single("a0"),
        AdapterMix.from_weights({"a0": 0.6, "a1": 0.4}),
    ]
    # Staggered arrivals: requests join and leave while steps are in flight.
    delays = [0.0, 0.0, 0.01, 0.02, 0.02, 0.05, 0.08, 0.08, 0.12]
    runs = {}
    modes = {"sync": (False, False), "overlap": (True, False), "queue_ahead": (True, True)}
    for mode, (overlap, ahead) in modes.items():
        engine = make_engine(
            vocab_model,
            default_tokenizer,
            adapters,
            max_batch=4,
            max_seq_len=256,
            overlap_steps=overlap,
            overlap_queue_ahead=ahead,
        )
        assert engine.runner.overlap == overlap and engine.runner.queue_ahead == ahead
        runs[mode] = await _run(engine, _requests(mixes), delays)
    sync = _outputs(runs["sync"][0])
    assert _outputs(runs["overlap"][0]) == sync
    assert _outputs(runs["queue_ahead"][0]) == sync
    assert {r[2] for r in sync} >= {"length", "stop"}  # both ends are exercised
    for mode in ("overlap", "queue_ahead"):
        assert runs[mode][1]["generated_tokens"] == runs["sync"][1]["generated_tokens"]


async def test_a_sampling_request_runs_its_steps_synchronously(vocab_model, default_tokenizer):
    mixes = [AdapterMix.base()]
    delays = [0.0] * 9
    runs = {}
    for overlap in (False, True):
        engine = make_engine(
            vocab_model, default_tokenizer, max_batch=3, max_seq_len=256, overlap_steps=overlap
        )
        runs[overlap] = await _run(engine, _requests(mixes, sampled=4), delays)
    assert _outputs(runs[True][0]) == _outputs(runs[False][0])


async def test_cancelling_a_request_mid_overlap(vocab_model, default_tokenizer):
    engine = make_engine(
        vocab_model, default_tokenizer, max_batch=4, max_seq_len=512, overlap_steps=True
    )
    async with engine:
        long = asyncio.create_task(
            engine.generate(
                request(0, AdapterMix.base(), prompt=PROMPTS[0], max_tokens=300, ignore_eos=True)
            )
        )
        short = [
            request(i, AdapterMix.base(), prompt=PROMPTS[i], max_tokens=6, ignore_eos=True)
            for i in range(1, 4)
        ]
        done = await asyncio.wait_for(run_all(engine, short), 60)
        long.cancel()
        alone = await asyncio.wait_for(engine.generate(short[0]), 60)
        stats = engine.stats()
    assert [r.completion_tokens for r in done] == [6, 6, 6]
    assert alone.token_ids == done[0].token_ids
    assert stats["running"] == 0
