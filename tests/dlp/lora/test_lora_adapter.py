"""Loading, saving and refusing PEFT LoRA adapters."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from lora_helpers import make_tiny_llama
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

from dlp.errors import AdapterValidationError
from dlp.lora.adapter import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    base_linear_shapes,
    load_adapter,
    lora_scaling,
    random_adapter,
    save_adapter,
)

PREFIX = "base_model.model."


def write_raw(path: Path, config: dict, tensors: dict[str, torch.Tensor] | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    full = {
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj"],
        "bias": "none",
        **config,
    }
    (path / CONFIG_FILE).write_text(json.dumps(full))
    if tensors is not None:
        save_file(tensors, str(path / WEIGHTS_FILE))
    return path


def qproj_tensors(
    rank_a: int = 8,
    rank_b: int = 8,
    d_in: int = 64,
    d_out: int = 64,
    module: str = "model.layers.0.self_attn.q_proj",
) -> dict[str, torch.Tensor]:
    return {
        f"{PREFIX}{module}.lora_A.weight": torch.randn(rank_a, d_in),
        f"{PREFIX}{module}.lora_B.weight": torch.randn(d_out, rank_b),
    }


def test_roundtrip_keeps_everything(tmp_path, tiny_shapes):
    adapter = random_adapter(
        "rt",
        tiny_shapes,
        targets=("q_proj", "v_proj", "down_proj"),
        rank=4,
        alpha=12,
        seed=3,
        use_rslora=True,
    )
    path = save_adapter(adapter, tmp_path / "rt", base_model_name="tiny-llama")
    loaded = load_adapter(path, base_shapes=tiny_shapes)
    assert loaded.name == "rt"
    assert loaded.base_model_name == "tiny-llama"
    assert (loaded.rank, loaded.alpha, loaded.use_rslora) == (4, 12.0, True)
    assert loaded.scaling == pytest.approx(12 / 2.0)  # rsLoRA: alpha / sqrt(r)
    assert loaded.target_modules == ("down_proj", "q_proj", "v_proj")
    assert sorted(loaded.weights) == sorted(adapter.weights)
    assert len(loaded.weights) == 6  # 2 layers x 3 modules
    for module, (a, b) in adapter.weights.items():
        assert torch.equal(loaded.weights[module][0], a)
        assert torch.equal(loaded.weights[module][1], b)
    assert (
        loaded.nbytes
        == adapter.nbytes
        == sum(4 * (tiny_shapes[m][0] + tiny_shapes[m][1]) * 4 for m in adapter.weights)
    )
    assert (
        load_adapter(path, name="other", dtype=torch.bfloat16)
        .weights["model.layers.0.self_attn.q_proj"][0]
        .dtype
        == torch.bfloat16
    )


def test_reads_what_peft_writes(tmp_path):
    """An adapter saved by PEFT itself (rank/alpha patterns included) loads with PEFT's weights
    and PEFT's per-module scalings."""
    model = make_tiny_llama()
    shapes = base_linear_shapes(model)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "o_proj"],
        rank_pattern={"v_proj": 4},
        alpha_pattern={"o_proj": 4},
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = load_adapter(tmp_path / "peft", base_shapes=shapes)
    assert loaded.rank == 8 and loaded.alpha == 16
    lora_layers = {
        name.removeprefix(PREFIX): module
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})
    }
    assert sorted(lora_layers) == sorted(loaded.weights)
    for module, layer in lora_layers.items():
        a, b = loaded.weights[module]
        assert torch.equal(a, layer.lora_A["default"].weight)
        assert torch.equal(b, layer.lora_B["default"].weight)
        assert loaded.scaling_of(module) == pytest.approx(layer.scaling["default"])
    assert loaded.weights["model.layers.1.self_attn.v_proj"][0].shape[0] == 4
    assert loaded.scaling_of("model.layers.1.self_attn.o_proj") == pytest.approx(4 / 8)


class _SideEffect:
    """Unpickling this creates ``marker``: proof that a pickle was (not) opened."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_only_adapter_is_refused_without_being_opened(tmp_path, monkeypatch):
    # The payload really has a side effect when unpickled...
    probe = tmp_path / "probe-marker"
    pickle.loads(pickle.dumps(_SideEffect(probe)))
    assert probe.exists()
    # ...and load_adapter refuses the directory without running it.
    marker = tmp_path / "marker"
    path = write_raw(tmp_path / "pickled", {}, None)
    (path / "adapter_model.bin").write_bytes(pickle.dumps(_SideEffect(marker)))

    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle loader was called")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    with pytest.raises(AdapterValidationError, match=r"pickle.*never loaded"):
        load_adapter(path)
    assert not marker.exists()


def test_pickle_next_to_safetensors_is_ignored(tmp_path, tiny_shapes):
    marker = tmp_path / "marker"
    adapter = random_adapter("both", tiny_shapes, seed=1)
    path = save_adapter(adapter, tmp_path / "both")
    (path / "adapter_model.bin").write_bytes(pickle.dumps(_SideEffect(marker)))
    assert load_adapter(path, base_shapes=tiny_shapes).name == "both"
    assert not marker.exists()


REFUSALS = [
    # (case, config overrides, tensors, expected message regex)
    ("dora", {"use_dora": True}, qproj_tensors(), r"DoRA"),
    ("bias", {"bias": "all"}, qproj_tensors(), r"bias='all'"),
    ("lora-bias", {"lora_bias": True}, qproj_tensors(), r"lora_bias"),
    ("modules-to-save", {"modules_to_save": ["lm_head"]}, qproj_tensors(), r"modules_to_save"),
    ("fan-in-fan-out", {"fan_in_fan_out": True}, qproj_tensors(), r"fan_in_fan_out"),
    ("not-lora", {"peft_type": "IA3"}, qproj_tensors(), r"peft_type 'IA3'"),
    ("bad-r", {"r": 0}, qproj_tensors(), r"field 'r' must be a positive integer"),
    ("bad-alpha", {"lora_alpha": "x"}, qproj_tensors(), r"field 'lora_alpha'"),
    ("bad-targets", {"target_modules": []}, qproj_tensors(), r"target_modules"),
    (
        "unknown-target",
        {"target_modules": ["q_proj", "foo_proj"]},
        qproj_tensors(),
        r"unknown target modules \['foo_proj'\]",
    ),
    (
        "unknown-module",
        {},
        qproj_tensors(module="model.layers.7.self_attn.q_proj"),
        r"unknown target module 'model.layers.7.self_attn.q_proj'",
    ),
    ("shape-in", {}, qproj_tensors(d_in=32), r"shape mismatch.*32->64.*64->64"),
    ("shape-out", {}, qproj_tensors(d_out=48), r"shape mismatch.*64->48"),
    ("ab-rank", {}, qproj_tensors(rank_a=8, rank_b=4), r"A/B rank mismatch.*8.*4"),
    ("config-rank", {"r": 16}, qproj_tensors(), r"rank 8 in the weights but 16"),
    (
        "above-max",
        {"r": 128},
        qproj_tensors(rank_a=128, rank_b=128),
        r"rank 128 is above the maximum rank 64",
    ),
    (
        "missing-b",
        {},
        {k: v for k, v in qproj_tensors().items() if "lora_A" in k},
        r"lora_B missing",
    ),
    (
        "dora-tensor",
        {},
        {
            **qproj_tensors(),
            f"{PREFIX}model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(64),
        },
        r"unsupported tensor",
    ),
    (
        "int-weights",
        {},
        {k: v.to(torch.int32) for k, v in qproj_tensors().items()},
        r"need a float",
    ),
    ("no-weights", {}, {"something": torch.ones(1)}, r"unsupported tensor 'something'"),
]


@pytest.mark.parametrize(
    ("case", "config", "tensors", "message"), REFUSALS, ids=[r[0] for r in REFUSALS]
)
def test_refusals(tmp_path, tiny_shapes, case, config, tensors, message):
    path = write_raw(tmp_path / case, config, tensors)
    with pytest.raises(AdapterValidationError, match=message) as info:
        load_adapter(path, base_shapes=tiny_shapes)
    assert str(path) in str(info.value)  # the message names the adapter


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_values_are_refused(tmp_path, tiny_shapes, value):
    tensors = qproj_tensors()
    tensors[f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"][3, 2] = value
    path = write_raw(tmp_path / "nonfinite", {}, tensors)
    with pytest.raises(AdapterValidationError, match="non-finite"):
        load_adapter(path, base_shapes=tiny_shapes)


def test_configured_max_rank(tmp_path, tiny_shapes):
    path = write_raw(tmp_path / "r8", {}, qproj_tensors())
    assert load_adapter(path, base_shapes=tiny_shapes, max_rank=8).rank == 8
    with pytest.raises(AdapterValidationError, match="above the maximum rank 4"):
        load_adapter(path, base_shapes=tiny_shapes, max_rank=4)


def test_missing_files(tmp_path):
    with pytest.raises(AdapterValidationError, match="not a directory"):
        load_adapter(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterValidationError, match=re.escape(f"missing {CONFIG_FILE}")):
        load_adapter(tmp_path / "empty")
    path = write_raw(tmp_path / "noweights", {}, None)
    with pytest.raises(AdapterValidationError, match=re.escape(f"missing {WEIGHTS_FILE}")):
        load_adapter(path)
    (path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(AdapterValidationError, match="not valid JSON"):
        load_adapter(path)
    path = write_raw(tmp_path / "corrupt", {}, None)
    (path / WEIGHTS_FILE).write_bytes(b"\x00garbage")
    with pytest.raises(AdapterValidationError, match="not a valid safetensors"):
        load_adapter(path)


def test_lora_scaling_rules():
    assert lora_scaling(16, 8, False) == 2.0
    assert lora_scaling(16, 4, True) == 8.0
