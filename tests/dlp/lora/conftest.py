"""Shared fixtures: a tiny random Llama and PEFT adapter directories written by save_adapter."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from lora_helpers import make_tiny_llama
from transformers import LlamaForCausalLM

from dlp.lora.adapter import LoraAdapter, base_linear_shapes, random_adapter, save_adapter


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def tiny_shapes(tiny_model: LlamaForCausalLM) -> dict[str, tuple[int, int]]:
    return base_linear_shapes(tiny_model)


AdapterFactory = Callable[..., tuple[LoraAdapter, Path]]


@pytest.fixture
def make_adapter(tmp_path: Path, tiny_shapes: dict[str, tuple[int, int]]) -> AdapterFactory:
    """``make_adapter(name, rank=8, alpha=16, ...) -> (adapter, dir)`` saved in PEFT format."""

    def factory(name: str, **kwargs: object) -> tuple[LoraAdapter, Path]:
        kwargs.setdefault("b_std", 0.2)
        kwargs.setdefault("seed", zlib.crc32(name.encode()))
        adapter = random_adapter(name, tiny_shapes, **kwargs)  # type: ignore[arg-type]
        path = save_adapter(adapter, tmp_path / name, base_model_name="tiny-llama")
        return adapter, path

    return factory
