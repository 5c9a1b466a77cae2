"""Streaming, stop strings, EOS, sampling, cancellation, pool waits, sentence routing,
validation: on a tiny random Llama that uses the embedded default's tokenizer."""

from __future__ import annotations

import asyncio

import pytest
from engine_helpers import (
    make_engine,
    peft_reference,
    request,
    run_all,
    sentence_routing_case,
    strip_eos,
    write_adapters,
)
from peft import PeftModel

from dlp.engine.types import GenerationRequest, InvalidRequestError
from dlp.errors import DlpError, InvalidMixError
from dlp.routing.mix import AdapterMix


@pytest.fixture
def adapters(vocab_model, tmp_path):
    return write_adapters(vocab_model, tmp_path, ["a0", "a1", "a2", "a3"])


PROMPT = "The quick brown fox"


async def test_stream_matches_generate(vocab_model, default_tokenizer, adapters):
    engine = make_engine(vocab_model, default_tokenizer, adapters)
    mix = AdapterMix.from_weights({"a0": 0.6, "a1": 0.4})
    async with engine:
        full = await engine.generate(request(0, mix, prompt=PROMPT, max_tokens=20))
        chunks = [
            c async for c in engine.generate_stream(request(1, mix, prompt=PROMPT, max_tokens=20))
        ]
    assert chunks[-1].finish_reason == full.finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert "".join(c.text for c in chunks) == full.text
    assert tuple(t for c in chunks for t in c.token_ids) == full.token_ids
    assert len(full.token_ids) == full.completion_tokens == 20
    assert full.text == default_tokenizer.decode(full.token_ids, skip_special_tokens=True)
    assert engine.result_of_chunks(chunks).text == full.text


async def test_stop_string_is_trimmed_and_never_streamed(vocab_model, default_tokenizer):
    engine = make_engine(vocab_model, default_tokenizer)
    async with engine:
        free = await engine.generate(request(0, AdapterMix.base(), prompt=PROMPT, max_tokens=24))
        text = free.text
        assert len(text) > 12
        stop = text[8:12]  # a string the model will produce, mid-way
        cut = text.index(stop)
        res = await engine.generate(
            request(1, AdapterMix.base(), prompt=PROMPT, max_tokens=24, stop=(stop, "\x00"))
        )
        chunks = [
            c
            async for c in engine.generate_stream(
                request(2, AdapterMix.base(), prompt=PROMPT, max_tokens=24, stop=(stop,))
            )
        ]
    assert res.finish_reason == "stop"
    assert res.text == text[:cut]
    assert "".join(c.text for c in chunks) == text[:cut]
    assert chunks[-1].finish_reason == "stop"
    assert len(res.token_ids) < 24


async def test_eos_ends_generation(vocab_model, default_tokenizer):
    engine = make_engine(vocab_model, default_tokenizer)
    async with engine:
        free = await engine.generate(request(0, AdapterMix.base(), prompt=PROMPT, max_tokens=10))
    eos = free.token_ids[3]
    first = free.token_ids.index(eos)
    engine.eos_ids = frozenset({eos})
    async with engine:
        res = await engine.generate(request(1, AdapterMix.base(), prompt=PROMPT, max_tokens=10))
        ignored = await engine.generate(
            request(2, AdapterMix.base(), prompt=PROMPT, max_tokens=10, ignore_eos=True)
        )
    assert res.finish_reason == "stop"
    assert res.token_ids == free.token_ids[:first]
    assert ignored.token_ids == free.token_ids


async def test_seeded_sampling_is_reproducible_in_any_batch(vocab_model, default_tokenizer):
    engine = make_engine(vocab_model, default_tokenizer)
    params = dict(max_tokens=12, temperature=1.0, top_p=0.9, seed=123)
    async with engine:
        alone = await engine.generate(request(0, AdapterMix.base(), prompt=PROMPT, **params))
        batch = await run_all(
            engine,
            [
                request(
                    1,
                    AdapterMix.base(),
                    prompt="Another prompt",
                    max_tokens=12,
                    temperature=1.0,
                    seed=5,
                ),
                request(2, AdapterMix.base(), prompt=PROMPT, **params),
                request(3, AdapterMix.base(), prompt="Hello", max_tokens=12),
            ],
        )
        other_seed = await engine.generate(
            request(4, AdapterMix.base(), prompt=PROMPT, **{**params, "seed": 999})
        )
        greedy = await engine.generate(request(5, AdapterMix.base(), prompt=PROMPT, max_tokens=12))
        tiny_p = await engine.generate(
            request(6, AdapterMix.base(), prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=1e-6)
        )
    assert batch[1].token_ids == alone.token_ids
    assert other_seed.token_ids != alone.token_ids
    assert tiny_p.token_ids == greedy.token_ids  # top-p keeps only the argmax


async def test_cancelled_stream_frees_its_row(vocab_model, default_tokenizer, adapters):
    engine = make_engine(vocab_model, default_tokenizer, adapters, max_batch=1)
    async with engine:
        stream = engine.generate_stream(
            request(0, AdapterMix.single("a0"), prompt=PROMPT, max_tokens=200)
        )
        got = 0
        async for _chunk in stream:
            got += 1
            if got == 2:
                break
        await stream.aclose()
        # The only row must come free for the next request.
        res = await asyncio.wait_for(
            engine.generate(request(1, AdapterMix.single("a1"), prompt=PROMPT, max_tokens=3)), 30
        )
        stats = engine.stats()
    assert res.completion_tokens == 3
    assert stats["cancelled"] == 1
    assert stats["running"] == 0
    assert stats["pool"]["pinned"] == []


async def test_requests_wait_for_pool_slots(vocab_model, default_tokenizer, adapters):
    """Pool of 2 slots, concurrent requests needing 4 distinct adapters: all complete, each
    with the output it gets when run alone."""
    mixes = [
        AdapterMix.from_weights({"a0": 1, "a1": 1}),
        AdapterMix.single("a2"),
        AdapterMix.from_weights({"a3": 2, "a0": 1}),
        AdapterMix.single("a1"),
    ]
    reqs = [request(i, m, prompt=PROMPT, max_tokens=8) for i, m in enumerate(mixes)]
    engine = make_engine(vocab_model, default_tokenizer, adapters, slots=2, max_batch=4)
    async with engine:
        together = await asyncio.wait_for(run_all(engine, reqs), 60)
        alone = [await engine.generate(r) for r in reqs]
        stats = engine.stats()
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert stats["pool"]["evictions"] > 0
    # After evictions and reloads into reused slots the outputs are still PEFT's.
    peft = PeftModel.from_pretrained(vocab_model, adapters["a0"], adapter_name="a0")
    for name in ("a1", "a2", "a3"):
        peft.load_adapter(adapters[name], adapter_name=name)
    ids = default_tokenizer(PROMPT, return_tensors="pt").input_ids
    for req, res in zip(reqs, together, strict=True):
        ref = peft_reference(peft, ids, req.mix, 8)
        assert list(res.token_ids) == strip_eos(ref, set(engine.eos_ids)), req.mix.key
    peft.unload()


async def test_merged_weights_copy_only_slots_written_since(
    vocab_model, default_tokenizer, adapters, tmp_path
):
    """The engine copies a pool slot into its merged decode weights only when the slot was
    written since its last copy: a resident adapter costs no copy, a load copies its own
    slot, and an adapter replaced under its name is used with its new weights at once."""
    engine = make_engine(vocab_model, default_tokenizer, adapters, slots=2, max_batch=2)
    copies: list[list[int]] = []
    refresh = engine.model.refresh_slots

    def recorded(slots):
        copies.append(list(slots))
        refresh(slots)

    engine.model.refresh_slots = recorded
    new_a1 = write_adapters(vocab_model, tmp_path / "v2", ["a1"], b_std=0.5)["a1"]

    async def run(*mixes: AdapterMix) -> list[int]:
        """Slots copied per admission while ``mixes`` run (submitted together)."""
        before = len(copies)
        reqs = [request(i, m, prompt=PROMPT, max_tokens=4) for i, m in enumerate(mixes)]
        await asyncio.gather(*(engine.generate(r) for r in reqs))
        return [len(c) for c in copies[before:]]

    single = AdapterMix.single
    async with engine:
        assert await run(single("a0")) == [1]  # loaded: its slot
        assert await run(single("a0")) == []  # resident, unchanged
        assert await run(single("a1")) == [1]
        assert await run(AdapterMix.from_weights({"a0": 1, "a1": 1})) == []
        # One admission: a0 resident, a2 loaded over a1: only a2's slot is copied.
        assert await run(single("a0"), single("a2")) == [1]
        engine.pool.register("a1", new_a1, replace=True)
        assert await run(single("a1")) == [1]
        replaced = await engine.generate(
            request(1, AdapterMix.single("a1"), prompt=PROMPT, max_tokens=8)
        )
    peft = PeftModel.from_pretrained(vocab_model, new_a1, adapter_name="a1")
    ids = default_tokenizer(PROMPT, return_tensors="pt").input_ids
    ref = peft_reference(peft, ids, AdapterMix.single("a1"), 8)
    peft.unload()
    assert list(replaced.token_ids) == strip_eos(ref, set(engine.eos_ids))


async def test_sentence_routing_switches_mix(default_model, default_tokenizer, tmp_path):
    paths = write_adapters(default_model, tmp_path, ["a0", "a1"], b_std=0.05)
    reroute, calls, req = sentence_routing_case()
    engine = make_engine(default_model, default_tokenizer, paths, reroute=reroute)
    async with engine:
        routed = await engine.generate(req)
        fixed = await engine.generate(
            GenerationRequest(request_id="p", mix=req.mix, prompt=req.prompt, sampling=req.sampling)
        )
    assert routed.mix_switches, routed.text
    switch = routed.mix_switches[0]
    assert switch.mix == AdapterMix.single("a1") and routed.mix == switch.mix
    # Up to the switch the routed request is the fixed-mix one; a sentence ended there.
    assert routed.token_ids[: switch.at_token] == fixed.token_ids[: switch.at_token]
    head = default_tokenizer.decode(routed.token_ids[: switch.at_token])
    assert head.rstrip(" ")[-1] in ".!?\n"
    assert calls[0].startswith("The capital of France is")
    assert fixed.mix_switches == ()


async def test_bad_requests_name_the_field(vocab_model, default_tokenizer, adapters):
    engine = make_engine(vocab_model, default_tokenizer, adapters, max_seq_len=32)
    async with engine:
        with pytest.raises(InvalidRequestError) as err:
            await engine.generate(request(0, AdapterMix.base(), prompt=PROMPT, max_tokens=0))
        assert err.value.field == "max_tokens"
        with pytest.raises(InvalidRequestError) as err:
            await engine.generate(request(0, AdapterMix.base(), prompt=PROMPT, top_p=0.0))
        assert err.value.field == "top_p"
        with pytest.raises(InvalidRequestError) as err:
            await engine.generate(request(0, AdapterMix.base(), prompt="word " * 64))
        assert err.value.field == "prompt"
        with pytest.raises(InvalidRequestError) as err:
            await engine.generate(GenerationRequest(request_id="x", mix=AdapterMix.base()))
        assert err.value.field == "prompt"
        with pytest.raises(InvalidMixError, match="unknown adapter"):
            await engine.generate(request(0, AdapterMix.single("nope"), prompt=PROMPT))
        # A request whose prompt + max_tokens overflow the row ends with 'length' at the end.
        res = await engine.generate(request(0, AdapterMix.base(), prompt=PROMPT, max_tokens=100))
        assert res.finish_reason == "length"
        assert res.prompt_tokens + res.completion_tokens == 32
    with pytest.raises(DlpError, match="not running"):
        await engine.generate(request(0, AdapterMix.base(), prompt=PROMPT))
