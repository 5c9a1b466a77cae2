"""Fixtures: tiny random Llama / Qwen2 models, the embedded default, adapter directories."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import vocab_llama_spec
from transformers import AutoModelForCausalLM, LlamaConfig

from dlp.base_model import ensure_base_model


@pytest.fixture(scope="session")
def default_model_dir():
    """The embedded default (converted once into the dlp cache; `make test` runs setup)."""
    return ensure_base_model()


@pytest.fixture(scope="session")
def default_tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir, local_files_only=True)


@pytest.fixture(scope="session")
def default_model(default_model_dir):
    from dlp.base_model import load_base_model

    model, _ = load_base_model(default_model_dir)
    return model


@pytest.fixture(scope="session")
def vocab_model(default_tokenizer):
    """Tiny random Llama with the real tokenizer's vocabulary, so text features work."""
    torch.manual_seed(3)
    config = LlamaConfig(**vocab_llama_spec(default_tokenizer))
    return AutoModelForCausalLM.from_config(config).eval()
