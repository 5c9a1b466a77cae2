"""The fused layers on the embedded default model (SmolLM2-135M-Instruct) against PEFT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dlp.lora.adapter import base_linear_shapes, random_adapter, save_adapter
from dlp.lora.inject import inject_fused_lora, remove_fused_lora
from dlp.lora.pool import AdapterPool
from dlp.paths import cache_dir, model_dir
from dlp.routing.mix import AdapterMix


def embedded_model_path() -> Path:
    from dlp.base_model import is_ready

    path = model_dir(cache_dir())
    if not is_ready(path):
        pytest.skip(f"embedded default model not converted at {path}: run `dlp setup` first")
    return path


@pytest.mark.slow
def test_fused_mixes_on_embedded_model_match_peft(tmp_path):
    from peft import PeftModel

    from dlp.base_model import load_base_model

    model, tokenizer = load_base_model(embedded_model_path(), dtype=torch.float32)
    shapes = base_linear_shapes(model)
    assert shapes["model.layers.29.self_attn.q_proj"] == (576, 576)
    assert shapes["model.layers.0.self_attn.v_proj"] == (576, 192)
    specs = {"t0": (8, 16.0, False), "t1": (4, 8.0, True), "t2": (16, 32.0, False)}
    paths = {}
    for i, (name, (rank, alpha, rslora)) in enumerate(specs.items()):
        adapter = random_adapter(
            name, shapes, rank=rank, alpha=alpha, use_rslora=rslora, seed=i, b_std=0.05
        )
        paths[name] = save_adapter(adapter, tmp_path / name, base_model_name="smollm2")
    mixes = [
        AdapterMix.single("t0"),
        AdapterMix.from_weights({"t0": 0.6, "t1": 0.4}),
        AdapterMix.from_weights({"t0": 0.2, "t1": 0.3, "t2": 0.5}),
        AdapterMix.base(),
    ]
    prompts = [
        "Translate to French: cat",
        "How many legs does a spider have?",
        "Sort: 3 1 2",
        "Hello",
    ]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)

    pool = AdapterPool.for_model(model, n_slots=4, max_rank=16)
    for name, path in paths.items():
        pool.register(name, path)
    handle = inject_fused_lora(model, pool)
    probe = ["model.layers.0.self_attn.q_proj", "model.layers.29.self_attn.v_proj"]
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        handle.fused[m].register_forward_hook(
            lambda mod, args, out, m=m: seen.__setitem__(m, (args[0].clone(), out.clone()))
        )
        for m in probe
    ]
    with pool.acquire_sync(list(specs)) as lease, torch.no_grad():
        context = pool.batch_context(lease, mixes)
        with handle.use(context):
            fused_logits = model(**batch).logits
    for h in hooks:
        h.remove()
    remove_fused_lora(model, handle)

    peft = PeftModel.from_pretrained(model, str(paths["t0"]), adapter_name="t0").eval()
    for name in ("t1", "t2"):
        peft.load_adapter(str(paths[name]), adapter_name=name)
    with torch.no_grad():
        # every layer we probed: fused == base + sum_i w_i (PEFT with adapter i - base)
        for module, (x, out) in seen.items():
            layer = peft.base_model.model.get_submodule(module)
            for row, mix in enumerate(mixes):
                base = layer.base_layer(x[row : row + 1]).double()
                ref = base.clone()
                for name, weight in mix.entries:
                    peft.set_adapter(name)
                    ref += weight * (layer(x[row : row + 1]).double() - base)
                assert (ref - base).abs().max() > 1e-3 or mix.is_base
                assert (out[row : row + 1].double() - ref).abs().max().item() <= 1e-5
        # whole model: the single-adapter row and the base row equal PEFT's logits
        peft.set_adapter("t0")
        t0 = peft(**batch).logits
        with peft.disable_adapter():
            base_logits = peft(**batch).logits
    mask = batch["attention_mask"].bool()
    assert (fused_logits[0][mask[0]] - t0[0][mask[0]]).abs().max().item() <= 1e-4
    assert (fused_logits[3][mask[3]] - base_logits[3][mask[3]]).abs().max().item() <= 1e-4
