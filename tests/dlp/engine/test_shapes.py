"""The published shapes' decode GEMMs (:func:`decode_gemm_shapes`): the keys the engine's
table of measured GEMM configs and the GPU benchmarks share."""

from __future__ import annotations

from transformers import LlamaConfig, Qwen2Config

from dlp.engine.shapes import PUBLISHED_SHAPES, decode_gemm_shapes
from dlp.engine.skinny_gemm import MEASURED


def test_decode_gemm_shapes_are_the_measured_tables_keys() -> None:
    for name, config_cls in (("qwen2-1.5b", Qwen2Config), ("llama3-8b", LlamaConfig)):
        shape = PUBLISHED_SHAPES[name]
        # From the plain dict and from the transformers config built of it: the same keys.
        keys = decode_gemm_shapes(shape, lora_rows=512)
        config = config_cls(**{k: v for k, v in shape.items() if k != "model_type"})
        assert decode_gemm_shapes(config.to_dict(), lora_rows=512) == keys
        # Every role of both shapes has a config measured on the H200.
        assert set(keys.values()) <= set(MEASURED), (name, keys)
    qwen = decode_gemm_shapes(PUBLISHED_SHAPES["qwen2-1.5b"], lora_rows=512)
    # 12 q heads + 2 k + 2 v of 128; gate/up by its intermediate size (2 x 8960 weight rows)
    assert qwen["qkv"] == (2048, 1536, False) and qwen["qkvl"] == (2560, 1536, False)
    assert qwen["gu"] == (8960, 1536, True) and qwen["down"] == (1536, 8960, False)
