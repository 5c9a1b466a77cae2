"""Per-row weighted multi-LoRA against PEFT's add_weighted_adapter (combination 'cat')."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from dlp.errors import DlpError
from dlp.eval.lora_mix import MultiLoraModel


def _random_adapter(model, out: Path, rank: int, alpha: int, seed: int) -> Path:
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    peft = get_peft_model(model, cfg)
    for name, p in peft.named_parameters():
        if "lora_" in name:
            p.data.normal_(0, 0.3)
    peft.save_pretrained(str(out))
    peft.unload()
    return out


@pytest.fixture
def adapters(tiny_model, tmp_path: Path) -> list[Path]:
    specs = [("a", 8, 16), ("b", 8, 16), ("c", 4, 32)]  # different rank and alpha too
    return [
        _random_adapter(tiny_model, tmp_path / n, r, al, i) for i, (n, r, al) in enumerate(specs)
    ]


def _peft_weighted(model, dirs: list[Path], weights: list[float]) -> torch.nn.Module:
    peft = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name=dirs[0].name)
    for d in dirs[1:]:
        peft.load_adapter(str(d), adapter_name=d.name)
    peft.add_weighted_adapter([d.name for d in dirs], weights, "mix", combination_type="cat")
    peft.set_adapter("mix")
    return peft


def test_rows_with_different_mixes_match_peft_cat(tiny_model, adapters):
    ids = torch.randint(3, 200, (4, 12))
    mixes = [[0.6, 0.3, 0.1], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.5, 0.5]]
    mlm = MultiLoraModel.from_dirs(tiny_model, adapters)
    with torch.no_grad(), mlm.mixing(torch.tensor(mixes)):
        ours = tiny_model(input_ids=ids).logits
    with torch.no_grad():
        base = tiny_model(input_ids=ids).logits  # outside the block: plain base model
    mlm.remove()
    for row, w in enumerate(mixes):
        if not any(w):
            ref = base[row]
        else:
            peft = _peft_weighted(tiny_model, adapters, w)
            with torch.no_grad():
                ref = peft(input_ids=ids[row : row + 1]).logits[0]
            peft.unload()
        assert (ours[row] - ref).abs().max().item() <= 1e-5
    assert not torch.allclose(ours[0], base[0], atol=1e-4)  # the adapters do change the output


def test_remove_restores_the_base_model(tiny_model, adapters):
    ids = torch.randint(3, 200, (2, 8))
    with torch.no_grad():
        before = tiny_model(input_ids=ids).logits
    mlm = MultiLoraModel.from_dirs(tiny_model, adapters)
    mlm.remove()
    with torch.no_grad(), torch.inference_mode():
        after = tiny_model(input_ids=ids).logits
    assert torch.equal(before, after)


def test_weight_shape_is_checked(tiny_model, adapters):
    mlm = MultiLoraModel.from_dirs(tiny_model, adapters)
    with pytest.raises(DlpError, match=r"shape \[rows, 3\]"), mlm.mixing(torch.ones(2, 2)):
        pass
    with pytest.raises(DlpError, match="rows"), mlm.mixing(torch.ones(3, 3)):
        tiny_model(input_ids=torch.ones(2, 4, dtype=torch.long))
    mlm.remove()
