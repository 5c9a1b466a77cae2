"""Greedy output of the engine is token-identical to transformers `generate` (base), PEFT
(single adapter) and PEFT add_weighted_adapter(combination_type="cat") (weighted mix), for
batches mixing all three and for requests arriving while others decode."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import (
    TINY_VOCAB,
    make_engine,
    peft_reference,
    request,
    run_all,
    strip_eos,
    tiny_model,
    write_adapters,
)
from peft import PeftModel

from dlp.routing.mix import AdapterMix

MIXES = [
    AdapterMix.base(),
    AdapterMix.single("a0"),
    AdapterMix.from_weights({"a1": 0.7, "a2": 0.3}),
    AdapterMix.single("a2"),
    AdapterMix.from_weights({"a0": 0.5, "a1": 0.25, "a2": 0.25}),
    AdapterMix.base(),
]


def _peft(model, paths):
    names = list(paths)
    peft = PeftModel.from_pretrained(model, paths[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(paths[name], adapter_name=name)
    return peft.eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
async def test_tiny_models_continuous_batching_match_peft(kind, tmp_path):
    model = tiny_model(kind)
    paths = write_adapters(model, tmp_path, ["a0", "a1", "a2"])
    # 3 rows for 6 requests arriving at different times: later ones join a running batch.
    engine = make_engine(model, None, paths, slots=4, max_batch=3)
    gen = torch.Generator().manual_seed(7)
    prompts = [
        torch.randint(0, TINY_VOCAB - 1, (n,), generator=gen).tolist() for n in (5, 9, 3, 12, 7, 4)
    ]
    reqs = [
        request(i, m, ids=p, max_tokens=16)
        for i, (m, p) in enumerate(zip(MIXES, prompts, strict=True))
    ]
    async with engine:
        results = await run_all(engine, reqs, delays=[0, 0, 0.01, 0.02, 0.05, 0.08])
    assert engine.stats()["decode_steps"] > 0
    peft = _peft(model, paths)
    eos = {TINY_VOCAB - 1}
    for req, res in zip(reqs, results, strict=True):
        ref = peft_reference(peft, torch.tensor([req.prompt_token_ids]), req.mix, 16)
        assert list(res.token_ids) == strip_eos(ref, eos), req.mix.key
        assert res.finish_reason == ("stop" if len(res.token_ids) < 16 else "length")


@pytest.mark.slow
async def test_embedded_default_matches_transformers_and_peft(
    default_model, default_tokenizer, tmp_path
):
    model, tok = default_model, default_tokenizer
    paths = write_adapters(model, tmp_path, ["a0", "a1", "a2"], b_std=0.3)
    engine = make_engine(model, tok, paths, slots=4, max_batch=4, max_seq_len=256)
    prompts = [
        "The capital of France is",
        "Write a haiku about the sea:",
        "Question: what is 12 + 30?\nAnswer:",
        "List three colours:",
        "Once upon a time",
    ]
    reqs = [
        request(i, m, prompt=p, max_tokens=16)
        for i, (m, p) in enumerate(zip(MIXES, prompts, strict=False))
    ]
    chat = {"role": "user", "content": "Name a large animal."}
    from dlp.engine.types import GenerationRequest, SamplingParams

    reqs.append(
        GenerationRequest(
            request_id="chat",
            mix=AdapterMix.single("a1"),
            messages=(chat,),
            sampling=SamplingParams(max_tokens=16),
        )
    )
    async with engine:
        results = await run_all(engine, reqs, delays=[0, 0, 0, 0.05, 0.3, 0.6])
    peft = _peft(model, paths)
    eos = set(engine.eos_ids)
    for req, res in zip(reqs, results, strict=True):
        if req.messages:
            text = tok.apply_chat_template([chat], tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        else:
            ids = tok(req.prompt, return_tensors="pt").input_ids
        assert res.prompt_tokens == ids.shape[1]
        ref = strip_eos(peft_reference(peft, ids, req.mix, 16), eos)
        assert list(res.token_ids) == ref, req.mix.key
        assert res.text == tok.decode(ref, skip_special_tokens=True)
    peft.unload()
