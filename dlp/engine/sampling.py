"""Next-token choice per row: greedy, or temperature + top-p with the request's own generator.

Greedy rows use the argmax computed inside the decode step; only sampling rows pay for a
softmax here. A per-request ``torch.Generator`` makes a seeded request reproducible no matter
which other requests share its batch.
"""

from __future__ import annotations

import torch

from dlp.engine.types import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.temperature <= 0:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail of ``probs`` [V] outside the smallest set whose mass reaches ``top_p``
    (the token that crosses top_p is kept). Not renormalised: multinomial does not need it."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    drop = (cumulative - sorted_probs) >= top_p  # mass before this token already reaches p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def sample_row(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """One token id from ``logits`` [V] (any float dtype)."""
    if params.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    probs = top_p_filter(probs, params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))
