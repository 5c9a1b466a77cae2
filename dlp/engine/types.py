"""Requests and results the engine takes and gives: the contract between dlp/engine and
deployments/ (the Ray worker wraps exactly these)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dlp.errors import DlpError
from dlp.routing.mix import AdapterMix


class InvalidRequestError(DlpError, ValueError):
    """A generation request the engine refuses; ``field`` names the offending field."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


FinishReason = Literal["stop", "length", "error", "cancelled"]
RoutingMode = Literal["prompt", "sentence"]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: always generate max_tokens

    def validate(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise InvalidRequestError("max_tokens must be an integer", field="max_tokens")
        if self.max_tokens < 1:
            raise InvalidRequestError(
                f"max_tokens must be >= 1, got {self.max_tokens}", field="max_tokens"
            )
        if not self.temperature >= 0:  # also refuses NaN
            raise InvalidRequestError(
                f"temperature must be >= 0, got {self.temperature}", field="temperature"
            )
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", field="top_p")
        if any(not isinstance(s, str) for s in self.stop):
            raise InvalidRequestError("stop must be a list of strings", field="stop")


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
    # Pre-tokenised prompt (benchmarks, or callers that tokenised already); used instead of
    # ``prompt`` / ``messages`` when set.
    prompt_token_ids: tuple[int, ...] | None = None


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
