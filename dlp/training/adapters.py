"""Train task LoRA adapters with PEFT: one per task, plus one composite adapter on all tasks.

Recipe (the DLP-LoRA released code): r=8, alpha=16, q_proj and v_proj, loss on the answer
tokens only. The composite adapter (r=64) is the baseline a single multi-task LoRA gives.
Adapters are written in the PEFT format (``adapter_config.json`` +
``adapter_model.safetensors``), one directory per adapter, plus ``training.json`` with the
recipe and loss curves.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from dlp.errors import DlpError
from dlp.training.examples import TaskExample, by_task
from dlp.training.prompts import (
    IGNORE_INDEX,
    MAX_ANSWER_TOKENS,
    MAX_INPUT_TOKENS,
    Encoded,
    encode_example,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

COMPOSITE_NAME = "composite"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class LoraRecipe:
    """Hyper-parameters of one adapter's training run."""

    rank: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.05
    lr: float = 1e-3
    batch_size: int = 8
    steps: int = 100
    warmup_frac: float = 0.1
    max_input_tokens: int = MAX_INPUT_TOKENS
    max_answer_tokens: int = MAX_ANSWER_TOKENS
    seed: int = 0
    save_dtype: str = "bfloat16"

    def validate(self) -> None:
        checks = {
            "rank": self.rank >= 1,
            "alpha": self.alpha > 0,
            "lr": self.lr > 0,
            "batch_size": self.batch_size >= 1,
            "steps": self.steps >= 1,
            "dropout": 0 <= self.dropout < 1,
            "target_modules": bool(self.target_modules),
            "save_dtype": self.save_dtype in ("float32", "bfloat16"),
        }
        for name, ok in checks.items():
            if not ok:
                raise DlpError(f"{name}: invalid value {getattr(self, name)!r}")


@dataclass
class AdapterResult:
    name: str
    path: str
    examples: int
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)

    @property
    def first_loss(self) -> float:
        return _mean(self.losses[: max(1, len(self.losses) // 10)])

    @property
    def last_loss(self) -> float:
        return _mean(self.losses[-max(1, len(self.losses) // 10) :])


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def encode_examples(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[TaskExample], recipe: LoraRecipe
) -> list[Encoded]:
    """Chat-formatted prompt + target; the answer for MCQ is the gold choice's text."""
    return [
        encode_example(
            tokenizer,
            ex.input,
            ex.target,
            ex.prompt_choices,
            max_input_tokens=recipe.max_input_tokens,
            max_answer_tokens=recipe.max_answer_tokens,
        )
        for ex in examples
    ]


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels (-100 on prompt and padding)."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _batches(data: Sequence[Encoded], batch_size: int, steps: int, seed: int):
    """``steps`` batches, reshuffling the data each epoch (seeded, deterministic)."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(data)))
            rng.shuffle(fresh)
            order.extend(fresh)
        take, order = order[:batch_size], order[batch_size:]
        yield [data[i] for i in take]


def _lr_lambda(recipe: LoraRecipe):
    warmup = max(1, int(recipe.steps * recipe.warmup_frac))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, recipe.steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def train_lora(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: Sequence[Encoded],
    recipe: LoraRecipe,
    out_dir: Path,
    name: str,
    progress: bool = True,
) -> AdapterResult:
    """Wrap ``model`` with a fresh PEFT LoRA, train it, save it to ``out_dir`` and unwrap.

    ``model`` is returned to its original module tree afterwards (PEFT ``unload``), so the
    same base serves the next task.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    recipe.validate()
    if not data:
        raise DlpError(f"adapter {name}: no training examples")
    device = next(model.parameters()).device
    torch.manual_seed(recipe.seed)
    config = LoraConfig(
        r=recipe.rank,
        lora_alpha=recipe.alpha,
        target_modules=list(recipe.target_modules),
        lora_dropout=recipe.dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, _lr_lambda(recipe))
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )
    pad_id = _pad_id(tokenizer)
    losses: list[float] = []
    started = time.monotonic()
    peft_model.train()
    bar = tqdm(
        _batches(data, recipe.batch_size, recipe.steps, recipe.seed),
        total=recipe.steps,
        desc=f"train {name}",
        leave=False,
        disable=not progress,
    )
    try:
        for batch in bar:
            inputs = {k: v.to(device) for k, v in collate(batch, pad_id).items()}
            with autocast:
                loss = peft_model(**inputs).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        peft_model.eval()
        save_adapter(peft_model, out_dir, recipe.save_dtype)
    finally:
        peft_model.unload()
    return AdapterResult(
        name=name,
        path=str(out_dir),
        examples=len(data),
        steps=recipe.steps,
        seconds=time.monotonic() - started,
        losses=losses,
    )


def save_adapter(peft_model: Any, out_dir: Path, dtype: str = "bfloat16") -> None:
    """PEFT ``save_pretrained``, then the tensors re-stored in ``dtype`` (bf16 halves the
    size; PEFT casts back to the model dtype when it loads them)."""
    import torch
    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir))
    weights = out_dir / "adapter_model.safetensors"
    if dtype == "bfloat16":
        tensors = load_file(str(weights))
        save_file(
            {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
            str(weights),
            metadata={"format": "pt"},
        )
    readme = out_dir / "README.md"  # PEFT's model-card template; not part of the format
    readme.unlink(missing_ok=True)


def steps_for(n_examples: int, batch_size: int, epochs: float, min_steps: int, max_steps: int):
    """Steps for ``epochs`` passes over ``n_examples``, clamped to [min_steps, max_steps]."""
    return int(max(min_steps, min(max_steps, math.ceil(epochs * n_examples / batch_size))))


@dataclass(frozen=True)
class TrainPlan:
    """What ``dlp train-adapters`` runs: the per-task recipe, the composite recipe, and how
    steps scale with the data (epochs, clamped)."""

    task: LoraRecipe = LoraRecipe()
    composite: LoraRecipe | None = LoraRecipe(rank=64, alpha=128, batch_size=16)
    epochs: float = 2.0
    min_steps: int = 20
    max_steps: int = 300
    composite_max_steps: int = 3000
    skip_existing: bool = False  # keep adapters already in the output dir (resume a run)


def train_all(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_examples: Sequence[TaskExample],
    tasks: Sequence[str],
    out: Path,
    plan: TrainPlan,
    command: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Train every task adapter (and the composite) into ``out``; write ``training.json``."""
    grouped = by_task(train_examples)
    missing = [t for t in tasks if t not in grouped]
    if missing:
        raise DlpError(f"tasks: no training examples for {', '.join(missing)}")
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, AdapterResult] = {}
    all_data: list[Encoded] = []
    started = time.monotonic()
    outer = tqdm(list(tasks), desc="adapters", disable=not progress)
    for i, task in enumerate(outer):
        outer.set_postfix(task=task)
        data = encode_examples(tokenizer, grouped[task], plan.task)
        all_data.extend(data)
        steps = steps_for(
            len(data), plan.task.batch_size, plan.epochs, plan.min_steps, plan.max_steps
        )
        recipe = replace(plan.task, steps=steps, seed=plan.task.seed + i)
        if plan.skip_existing and all((out / task / f).is_file() for f in ADAPTER_FILES):
            results[task] = AdapterResult(task, str(out / task), len(data), 0, 0.0)
            continue
        results[task] = train_lora(model, tokenizer, data, recipe, out / task, task, progress)
        log.info("%s: loss %.3f -> %.3f", task, results[task].first_loss, results[task].last_loss)
    done = plan.skip_existing and all((out / COMPOSITE_NAME / f).is_file() for f in ADAPTER_FILES)
    if plan.composite is not None and not done:
        steps = steps_for(
            len(all_data),
            plan.composite.batch_size,
            plan.epochs,
            plan.min_steps,
            plan.composite_max_steps,
        )
        recipe = replace(plan.composite, steps=steps)
        results[COMPOSITE_NAME] = train_lora(
            model, tokenizer, all_data, recipe, out / COMPOSITE_NAME, COMPOSITE_NAME, progress
        )
    report = {
        "command": command,
        "tasks": list(tasks),
        "plan": _plan_dict(plan),
        "seconds": round(time.monotonic() - started, 1),
        "adapters": {
            name: {
                "path": Path(r.path).name,
                "examples": r.examples,
                "steps": r.steps,
                "seconds": round(r.seconds, 2),
                "first_loss": round(r.first_loss, 4) if r.losses else None,
                "last_loss": round(r.last_loss, 4) if r.losses else None,
                "skipped": not r.losses,
                "losses": [round(x, 4) for x in r.losses],
            }
            for name, r in results.items()
        },
    }
    (out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _plan_dict(plan: TrainPlan) -> dict[str, Any]:
    d = asdict(plan)
    for key in ("task", "composite"):
        if d.get(key):
            d[key]["target_modules"] = list(d[key]["target_modules"])
    return d
