"""PEFT adapter training on a tiny random Llama: answer-only loss, learning, format, seeding."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from quality_fixtures import make_examples
from safetensors.torch import load_file

from dlp.errors import DlpError
from dlp.training.adapters import (
    COMPOSITE_NAME,
    LoraRecipe,
    TrainPlan,
    collate,
    encode_examples,
    steps_for,
    train_all,
    train_lora,
)
from dlp.training.cli import main as train_main
from dlp.training.prompts import IGNORE_INDEX

FAST = LoraRecipe(lr=2e-2, batch_size=8, steps=40, dropout=0.0)


def _data(tokenizer, task: str, n: int = 24):
    exs = [e for e in make_examples("train", n, seed=1) if e.task == task]
    return encode_examples(tokenizer, exs, FAST)


def test_loss_is_computed_on_answer_tokens_only(tiny_model, tokenizer):
    batch = collate(_data(tokenizer, "parity")[:4], tokenizer.pad_token_id)
    logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    # Hand-computed: cross-entropy of position t predicting token t+1, where label != -100.
    total, count = 0.0, 0
    for row in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[row, t] != IGNORE_INDEX:
                logp = torch.log_softmax(logits[row, t - 1], dim=-1)
                total -= float(logp[labels[row, t]])
                count += 1
    model_loss = float(tiny_model(**batch).loss)
    assert model_loss == pytest.approx(total / count, rel=1e-5)
    # Only "even"/"odd" + <|im_end|> are supervised; padding and prompt are not.
    supervised = (labels != IGNORE_INDEX).sum(dim=1).tolist()
    assert all(n in (len("even") + 1, len("odd") + 1) for n in supervised)
    assert bool((labels[batch["attention_mask"] == 0] == IGNORE_INDEX).all())


def test_training_lowers_the_loss_saves_peft_format_and_restores_the_model(
    tokenizer, tmp_path: Path
):
    from quality_fixtures import make_tiny_llama

    # A random base predicts bytes almost uniformly (loss ~ ln 259 = 5.56); a rank-8 LoRA on
    # q/v of a random 2-layer model can only move that so far in 40 steps, but it must move.
    tiny_model = make_tiny_llama(len(tokenizer), hidden=64)
    before = {n for n, _ in tiny_model.named_modules()}
    result = train_lora(
        tiny_model, tokenizer, _data(tokenizer, "echo"), FAST, tmp_path / "a", "a", progress=False
    )
    assert len(result.losses) == FAST.steps
    assert result.first_loss > 5.3
    assert result.last_loss < result.first_loss - 0.25
    # The base model is back to its original module tree (PEFT unload) and stays frozen.
    assert {n for n, _ in tiny_model.named_modules()} == before
    assert not any(p.requires_grad for p in tiny_model.parameters())

    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 16)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 2 * 2  # layers x {q,v} x {A,B}
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert not any(k.endswith(".bin") for k in map(str, (tmp_path / "a").iterdir()))

    # PEFT loads it back and it changes the model's answers (B was trained away from zero).
    from peft import PeftModel

    ids = collate(_data(tokenizer, "echo")[:2], tokenizer.pad_token_id)["input_ids"]
    base_logits = tiny_model(input_ids=ids).logits
    peft = PeftModel.from_pretrained(tiny_model, str(tmp_path / "a"))
    assert not torch.allclose(peft(input_ids=ids).logits, base_logits, atol=1e-3)


def test_training_is_seeded(tokenizer, tmp_path: Path):
    from quality_fixtures import make_tiny_llama

    data = _data(tokenizer, "parity")
    recipe = replace(FAST, steps=5)
    for name in ("x", "y"):
        train_lora(
            make_tiny_llama(len(tokenizer)),
            tokenizer,
            data,
            recipe,
            tmp_path / name,
            name,
            progress=False,
        )
    x = load_file(str(tmp_path / "x" / "adapter_model.safetensors"))
    y = load_file(str(tmp_path / "y" / "adapter_model.safetensors"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_train_all_writes_each_task_and_the_composite(tiny_model, tokenizer, tmp_path: Path):
    train = make_examples("train", 16, seed=1)
    plan = TrainPlan(
        task=replace(FAST, steps=1),
        composite=replace(FAST, rank=16, alpha=32),
        epochs=1.0,
        min_steps=3,
        max_steps=4,
        composite_max_steps=5,
    )
    report = train_all(
        tiny_model,
        tokenizer,
        train,
        ["echo", "parity"],
        tmp_path,
        plan,
        command="test",
        progress=False,
    )
    assert set(report["adapters"]) == {"echo", "parity", COMPOSITE_NAME}
    assert report["adapters"]["echo"]["steps"] == steps_for(16, 8, 1.0, 3, 4)
    assert report["adapters"][COMPOSITE_NAME]["steps"] == steps_for(32, 8, 1.0, 3, 5)
    composite = json.loads((tmp_path / COMPOSITE_NAME / "adapter_config.json").read_text())
    assert composite["r"] == 16
    saved = json.loads((tmp_path / "training.json").read_text())
    assert saved["tasks"] == ["echo", "parity"] and saved["command"] == "test"


def test_steps_follow_epochs_within_bounds():
    assert steps_for(100, 8, 2.0, 20, 300) == 25
    assert steps_for(10, 8, 2.0, 20, 300) == 20
    assert steps_for(10_000, 8, 2.0, 20, 300) == 300


def test_bad_recipe_and_empty_data_are_refused(tiny_model, tokenizer, tmp_path: Path):
    with pytest.raises(DlpError, match="rank"):
        train_lora(
            tiny_model,
            tokenizer,
            _data(tokenizer, "echo"),
            replace(FAST, rank=0),
            tmp_path,
            "x",
            progress=False,
        )
    with pytest.raises(DlpError, match="no training examples"):
        train_lora(tiny_model, tokenizer, [], FAST, tmp_path, "x", progress=False)


def test_cli_names_the_unknown_task(data_dir: Path, tmp_path: Path, capsys):
    code = train_main(
        ["train-adapters", "--tasks", "echo,nope", "--out", str(tmp_path), "--data", str(data_dir)]
    )
    assert code == 2
    assert "tasks: unknown task(s) nope" in capsys.readouterr().err


def test_skip_existing_resumes_without_retraining(tiny_model, tokenizer, tmp_path: Path):
    train = make_examples("train", 8, seed=1)
    plan = TrainPlan(
        task=replace(FAST, steps=1), composite=None, epochs=1.0, min_steps=1, max_steps=1
    )
    train_all(tiny_model, tokenizer, train, ["echo"], tmp_path, plan, progress=False)
    weights = tmp_path / "echo" / "adapter_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    resumed = replace(plan, skip_existing=True)
    report = train_all(
        tiny_model, tokenizer, train, ["echo", "parity"], tmp_path, resumed, progress=False
    )
    assert report["adapters"]["echo"]["skipped"] and not report["adapters"]["parity"]["skipped"]
    assert weights.stat().st_mtime_ns == stamp
    assert (tmp_path / "parity" / "adapter_model.safetensors").is_file()
