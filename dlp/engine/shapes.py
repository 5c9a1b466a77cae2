"""Published configs of the paper's backbones, as transformers config dicts: benchmarks and the
GPU serving run build random weights of these shapes (no model hub is reachable there).
Plain data, no pydantic: the engine imports it on the GPU machine."""

from __future__ import annotations

from typing import Any

PUBLISHED_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2-1.5b": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        eos_token_id=151643,
        bos_token_id=151643,
    ),
    "llama3-8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        eos_token_id=128001,
        bos_token_id=128000,
    ),
}


def decode_gemm_shapes(
    config: dict[str, Any], lora_rows: int = 0
) -> dict[str, tuple[int, int, bool]]:
    """One decoder layer's decode GEMMs for a transformers config dict, by role: (N, K, silu),
    the keys of ``skinny_gemm.MEASURED`` (for silu, N is the intermediate size: the gate/up
    weight has 2N rows). ``qkvl`` is q/k/v with ``lora_rows`` LoRA A rows appended."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kvh = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    qkv = (heads + 2 * kvh) * head_dim
    return {
        "qkv": (qkv, hidden, False),
        "qkvl": (qkv + lora_rows, hidden, False),
        "o": (heads * head_dim, hidden, False),
        "gu": (inter, hidden, True),
        "down": (hidden, inter, False),
    }
