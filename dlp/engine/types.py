"""Requests and results the engine takes and gives: the contract between dlp/engine and
deployments/ (the Ray worker wraps exactly these)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dlp.routing.mix import AdapterMix

FinishReason = Literal["stop", "length", "error", "cancelled"]
RoutingMode = Literal["prompt", "sentence"]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    """One generation. Exactly one of ``prompt`` / ``messages`` is set (messages use the
    tokenizer's chat template)."""

    request_id: str
    mix: AdapterMix
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    routing: RoutingMode = "prompt"


@dataclass(frozen=True)
class MixSwitch:
    """A mix change made by sentence-level routing, after ``at_token`` generated tokens."""

    at_token: int
    mix: AdapterMix


@dataclass(frozen=True)
class GenerationChunk:
    """A streamed piece: ``text`` is the new text since the last chunk. The last chunk of a
    request has ``finish_reason`` set."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    mix: AdapterMix
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    mix: AdapterMix
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    mix_switches: tuple[MixSwitch, ...] = ()
