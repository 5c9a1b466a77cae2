"""ensure_demo_adapters installs the shipped set (sha256-checked), idempotently."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from quality_fixtures import make_tiny_llama
from safetensors.torch import load_file

from dlp.errors import DlpError
from dlp.paths import adapters_dir
from dlp.training.adapters import save_adapter
from dlp.training.demo_adapters import SHIPPED_DIR, ensure_demo_adapters
from dlp.training.package import MANIFEST, read_manifest, verify_set, write_set


@pytest.fixture
def shipped(tmp_path: Path, tokenizer) -> Path:
    model = make_tiny_llama(len(tokenizer))
    raw = tmp_path / "raw"
    for i, name in enumerate(("alpha", "beta")):
        torch.manual_seed(i)
        peft = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
        )
        save_adapter(peft, raw / name)
        peft.unload()
    write_set(raw, tmp_path / "shipped", ["alpha", "beta"], {"kind": "trained", "command": "x"})
    return tmp_path / "shipped"


def test_shipped_set_is_installed_then_reused(shipped: Path, tmp_path: Path):
    root = tmp_path / "cache"
    dest = ensure_demo_adapters(root, shipped=shipped)
    assert dest == adapters_dir(root)
    assert verify_set(dest) == ["alpha", "beta"]
    assert read_manifest(dest) == read_manifest(shipped)
    stamp = (dest / "alpha" / "adapter_model.safetensors").stat().st_mtime_ns
    os.utime(dest / MANIFEST)  # a second call must not copy again
    assert ensure_demo_adapters(root, shipped=shipped) == dest
    assert (dest / "alpha" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    # Adapters registered next to the set survive a re-install.
    (dest / "mine").mkdir()
    (dest / MANIFEST).unlink()
    ensure_demo_adapters(root, shipped=shipped)
    assert (dest / "mine").is_dir() and verify_set(dest) == ["alpha", "beta"]


def test_a_corrupted_shipped_file_is_refused(shipped: Path, tmp_path: Path):
    weights = shipped / "beta" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(DlpError, match="sha256"):
        ensure_demo_adapters(tmp_path / "cache", shipped=shipped)


def test_the_repo_ships_a_verified_compact_set_of_task_adapters():
    manifest = read_manifest(SHIPPED_DIR)
    if manifest is None:
        pytest.skip("no trained adapters shipped in this checkout")
    names = verify_set(SHIPPED_DIR)  # every file matches its sha256
    assert len(names) + len(manifest.get("missing_tasks", [])) == 26
    assert len(names) == 26 or manifest["complete"] is False
    assert all(manifest["adapters"][n]["rank"] == 8 for n in names)
    assert all(manifest["adapters"][n]["target_modules"] == ["q_proj", "v_proj"] for n in names)
    total = sum(p.stat().st_size for p in SHIPPED_DIR.rglob("*") if p.is_file())
    assert total < 40 * 2**20
    assert manifest["command"].startswith("dlp train-adapters")
    tensors = load_file(str(SHIPPED_DIR / names[0] / "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def test_shipped_adapters_fit_the_embedded_base_model():
    """Every shipped adapter passes dlp.lora's validation against SmolLM2-135M's shapes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dlp.lora.adapter import base_linear_shapes, load_adapter
    from dlp.paths import cache_dir, model_dir

    manifest = read_manifest(SHIPPED_DIR)
    config_path = model_dir(cache_dir()) / "config.json"
    if manifest is None or not config_path.is_file():
        pytest.skip("needs the shipped adapters and the embedded model's config (dlp setup)")
    config = AutoConfig.from_pretrained(config_path.parent)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = base_linear_shapes(model)
    for name in manifest["adapters"]:
        adapter = load_adapter(SHIPPED_DIR / name, base_shapes=shapes)
        assert adapter.rank == 8 and adapter.scaling == 2.0
        assert len(adapter.weights) == 2 * config.num_hidden_layers
