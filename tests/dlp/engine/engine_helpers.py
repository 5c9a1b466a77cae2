"""Helpers for the engine tests (a module, not conftest, so tests can import it)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from dlp.engine.config import EngineConfig
from dlp.engine.engine import Engine
from dlp.engine.types import GenerationRequest, SamplingParams
from dlp.lora.adapter import base_linear_shapes, random_adapter, save_adapter
from dlp.lora.pool import AdapterPool
from dlp.routing.mix import AdapterMix

TINY_VOCAB = 256


def tiny_config(kind: str):
    # initializer_range well above the default spreads the logits, so greedy choices are not
    # near-ties that float noise could flip.
    common = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        eos_token_id=TINY_VOCAB - 1,
        bos_token_id=0,
    )
    if kind == "llama":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=False)
    return Qwen2Config(**common, tie_word_embeddings=True)


def vocab_llama_spec(tokenizer) -> dict:
    """A tiny Llama's config fields with ``tokenizer``'s vocabulary, so text features work."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        eos_token_id=tokenizer.eos_token_id,
    )


def tiny_model(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(kind)).eval()


def write_adapters(
    model: torch.nn.Module, root: Path, names: Sequence[str], b_std: float = 0.3, **kwargs
) -> dict[str, Path]:
    shapes = base_linear_shapes(model)
    out = {}
    for i, name in enumerate(names):
        adapter = random_adapter(name, shapes, seed=100 + i, b_std=b_std, **kwargs)
        out[name] = save_adapter(adapter, root / name)
    return out


def make_engine(
    model, tokenizer, adapters: dict[str, Path] | None = None, slots: int = 8, **cfg
) -> Engine:
    pool = AdapterPool.for_model(
        model, n_slots=slots, max_rank=8, target_modules=cfg.pop("targets", ("q_proj", "v_proj"))
    )
    for name, path in (adapters or {}).items():
        pool.register(name, path)
    reroute = cfg.pop("reroute", None)
    cfg.setdefault("max_batch", 4)
    cfg.setdefault("max_seq_len", 128)
    return Engine(model, tokenizer, pool, EngineConfig(**cfg), reroute=reroute)


def request(i, mix: AdapterMix, prompt=None, ids=None, max_tokens=12, **sampling):
    return GenerationRequest(
        request_id=f"r{i}",
        mix=mix,
        prompt=prompt,
        prompt_token_ids=tuple(ids) if ids is not None else None,
        sampling=SamplingParams(max_tokens=max_tokens, **sampling),
    )


async def run_all(engine: Engine, reqs, delays: Sequence[float] | None = None):
    """Submit ``reqs`` (optionally after per-request delays: continuous batching)."""

    async def one(req, delay):
        if delay:
            await asyncio.sleep(delay)
        return await engine.generate(req)

    delays = delays or [0.0] * len(reqs)
    return await asyncio.gather(*(one(r, d) for r, d in zip(reqs, delays, strict=True)))


def peft_reference(
    peft_model, input_ids: torch.Tensor, mix: AdapterMix, max_tokens: int, eos=None
) -> list[int]:
    """Greedy tokens from transformers/PEFT for one request (batch of one, no padding)."""
    kwargs = dict(max_new_tokens=max_tokens, do_sample=False)
    if eos is not None:
        kwargs["eos_token_id"] = eos
    if mix.is_base:
        with peft_model.disable_adapter():
            out = peft_model.generate(input_ids=input_ids, **kwargs)
    else:
        if len(mix) == 1:
            peft_model.set_adapter(mix.names[0])
        else:
            name = "mix_" + mix.key.replace(",", "_").replace("=", "_").replace(".", "p")
            if name not in peft_model.peft_config:
                peft_model.add_weighted_adapter(
                    list(mix.names), list(mix.weights), name, combination_type="cat"
                )
            peft_model.set_adapter(name)
        out = peft_model.generate(input_ids=input_ids, **kwargs)
    tokens = out[0, input_ids.shape[1] :].tolist()
    return tokens


def strip_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return tokens


def sentence_routing_case() -> tuple[
    Callable[[str], Awaitable[AdapterMix]], list[str], GenerationRequest
]:
    """A request routed per sentence that starts on a0, and a router stub that records the
    texts it is asked about and always answers a1: (reroute, calls, request)."""
    calls: list[str] = []

    async def reroute(text: str) -> AdapterMix:
        calls.append(text)
        return AdapterMix.single("a1")

    req = GenerationRequest(
        request_id="s",
        mix=AdapterMix.single("a0"),
        prompt="The capital of France is",
        sampling=SamplingParams(max_tokens=12),
        routing="sentence",
    )
    return reroute, calls, req
