"""Batched model calls for evaluation, each row with its own adapter weights.

``continuation_logprobs``: sum of log p(continuation | prompt) per (prompt, continuation)
pair, the MCQ score. ``greedy_generate``: greedy answers for prompts (left-padded batches).
Rows are sorted by length before batching so padding stays small; results come back in the
caller's order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from dlp.eval.lora_mix import MultiLoraModel


@dataclass(frozen=True)
class ScoreItem:
    prompt_ids: tuple[int, ...]
    continuation_ids: tuple[int, ...]
    weights: tuple[float, ...]


@dataclass(frozen=True)
class GenerateItem:
    prompt_ids: tuple[int, ...]
    weights: tuple[float, ...]


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _token_budget_batches(lengths: Sequence[int], max_tokens: int, max_rows: int):
    """Indices sorted by length, cut into batches of at most max_tokens padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batch: list[int] = []
    for i in order:
        width = lengths[i]  # sorted ascending: the newest row is the widest
        if (batch and (len(batch) + 1) * width > max_tokens) or len(batch) >= max_rows:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


@torch.inference_mode()
def continuation_logprobs(
    mlm: MultiLoraModel,
    items: Sequence[ScoreItem],
    pad_id: int,
    max_tokens: int = 16384,
    max_rows: int = 256,
    desc: str = "score",
) -> list[float]:
    """Sum over continuation tokens of log p(token | everything before it).

    Rows are left-padded (explicit position ids keep them equal to unpadded rows), so every
    continuation sits in the last columns and the vocabulary projection runs only there
    (``logits_to_keep``): with a 49k vocabulary that is most of the memory and a fifth of the
    FLOPs of a full-length forward.
    """
    model = mlm.model
    device = next(model.parameters()).device
    lengths = [len(it.prompt_ids) + len(it.continuation_ids) for it in items]
    out = [0.0] * len(items)
    batches = list(_token_budget_batches(lengths, max_tokens, max_rows))
    for batch in tqdm(batches, desc=desc, leave=False, disable=False):
        width = max(lengths[i] for i in batch)
        tail = max(len(items[i].continuation_ids) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            seq = items[i].prompt_ids + items[i].continuation_ids
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        weights = torch.tensor([items[i].weights for i in batch], dtype=torch.float32)
        with mlm.mixing(weights), _autocast(device):
            logits = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                logits_to_keep=tail + 1,
            ).logits  # [rows, tail + 1, vocab]: predictions for the last tail tokens
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        targets = ids[:, width - tail :].to(device)
        picked = logp.gather(-1, targets[..., None])[..., 0]  # [rows, tail]
        for row, i in enumerate(batch):
            n = len(items[i].continuation_ids)
            out[i] = float(picked[row, tail - n :].sum())
    return out


@torch.inference_mode()
def greedy_generate(
    mlm: MultiLoraModel,
    items: Sequence[GenerateItem],
    pad_id: int,
    stop_ids: Sequence[int],
    max_new_tokens: int,
    max_rows: int = 128,
    desc: str = "generate",
) -> list[list[int]]:
    """Greedy continuations (token ids, stop token excluded), via ``model.generate``."""
    model = mlm.model
    device = next(model.parameters()).device
    lengths = [len(it.prompt_ids) for it in items]
    out: list[list[int]] = [[] for _ in items]
    batches = list(_token_budget_batches(lengths, max_rows * max(lengths, default=1), max_rows))
    for batch in tqdm(batches, desc=desc, leave=False, disable=False):
        width = max(lengths[i] for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # left padding: every row ends where generation starts
            n = lengths[i]
            ids[row, width - n :] = torch.tensor(items[i].prompt_ids)
            mask[row, width - n :] = 1
        weights = torch.tensor([items[i].weights for i in batch], dtype=torch.float32)
        with mlm.mixing(weights), _autocast(device):
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=list(stop_ids),
                pad_token_id=pad_id,
            )
        for row, i in enumerate(batch):
            toks = gen[row, width:].tolist()
            cut = next((k for k, t in enumerate(toks) if t in stop_ids), len(toks))
            out[i] = toks[:cut]
    return out
