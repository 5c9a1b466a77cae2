"""Request and response models of the app: the OpenAI-compatible HTTP schema (plus the
``adapters`` / ``routing`` extension fields and the ``dlp`` report of the mix used), the
Python-handle models (GenerateRequest/Response, RouteRequest/Response), the internal
ingress -> worker request, and the one error type every layer raises for bad input.

Static checks (types, ranges that never change) live on the models; limits that come from
config (max_tokens cap, stop-string count, adapters per mix) are checked by
``deployments.validation`` so the numbers stay in ``dlp.config.ServingLimits``.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ROUTED_MODEL = "dlp"

# Characters a prompt may not hold: control characters other than tab / newline / carriage
# return, and lone surrogates (JSON allows "\ud800"; tokenizers do not).
_ALLOWED_CONTROL = {"\t", "\n", "\r"}


class RequestError(Exception):
    """Bad input (or a refused operation). ``status`` is the HTTP status, ``field`` the
    offending request field. Raised by every layer; Ray re-raises it at the caller, so a
    handle user can ``except RequestError``."""

    def __init__(self, status: int, field: str | None, message: str) -> None:
        super().__init__(status, field, message)
        self.status = status
        self.field = field
        # The message always names the field, whoever raised it.
        if field and field.split(".")[0] not in message:
            message = f"{field}: {message}"
        self.message = message

    def __str__(self) -> str:
        where = f" (field: {self.field})" if self.field else ""
        return f"{self.status}: {self.message}{where}"

    def to_openai(self) -> dict[str, Any]:
        kind = {
            401: "authentication_error",
            403: "permission_error",
            404: "not_found_error",
            409: "conflict_error",
            413: "request_too_large",
            429: "rate_limit_error",
            500: "server_error",
            503: "overloaded_error",
            504: "timeout_error",
        }.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.field, "code": None}}


def routing_view(text: str) -> str:
    """What the router reads of a user turn: the text without the answer-options block that
    the shared prompt format (dlp.training.prompts.user_text) appends to multiple-choice
    inputs. The router classifies the task from the input itself; a list of options (the
    same layout for every task) only blurs that."""
    from dlp.training.prompts import OPTIONS_HEADER

    head, sep, _ = text.rpartition("\n\n" + OPTIONS_HEADER + "\n")
    return head if sep and head.strip() else text


def check_text(value: str, field_name: str) -> str:
    """Refuse empty text, control characters and lone surrogates (naming the field)."""
    if not value.strip():
        raise ValueError(f"{field_name} must not be empty")
    for ch in value:
        cat = unicodedata.category(ch)
        if (cat == "Cc" and ch not in _ALLOWED_CONTROL) or cat == "Cs":
            raise ValueError(f"{field_name} holds a control character U+{ord(ch):04X}")
    return value


class _Model(BaseModel):
    # Unknown fields are ignored (OpenAI clients send fields we do not use), NaN/inf refused.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class SamplingFields(_Model):
    """Fields shared by completions, chat and the handle's GenerateRequest."""

    model: str = Field(
        ROUTED_MODEL, min_length=1, description="`dlp` routes; an adapter name uses that adapter"
    )
    max_tokens: int | None = Field(None, description="tokens to generate; capped by config")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = Field(
        False, description="extension (as in vLLM): generate max_tokens even past EOS"
    )
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    adapters: dict[str, float] | None = Field(
        None, description="explicit mix {adapter: weight}; overrides routing"
    )
    routing: Literal["prompt", "sentence"] = Field(
        "prompt", description="route once per prompt, or again at each sentence boundary"
    )

    @field_validator("max_tokens")
    @classmethod
    def _positive_tokens(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("max_tokens must be >= 1")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    echo: bool = False
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("prompt must be a string (or a list of exactly one string)")
            check_text(v[0], "prompt")
            return v
        return check_text(v, "prompt")

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: int | None) -> int | None:
        if v:
            raise ValueError("logprobs is not supported")
        return v

    def prompt_text(self) -> str:
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt


class ContentPart(_Model):
    type: Literal["text"]
    text: str


class ChatMessage(_Model):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


def check_messages(messages: list[ChatMessage]) -> list[ChatMessage]:
    if not messages:
        raise ValueError("messages must not be empty")
    if not any(m.role == "user" for m in messages):
        raise ValueError("messages must hold at least one user message")
    for i, m in enumerate(messages):
        text = m.text()
        if m.role == "user" or text:
            check_text(text, f"messages[{i}].content")
    return messages


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        return check_messages(v)

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def routing_text(self) -> str:
        """What the router reads: the last user message (the current request)."""
        return routing_view(next(m.text() for m in reversed(self.messages) if m.role == "user"))


# --- responses -----------------------------------------------------------------------------


class MixSwitchInfo(BaseModel):
    at_token: int
    mix: dict[str, float]
    mix_key: str


class DlpInfo(BaseModel):
    """The extension every completion carries: which adapters, with which weights."""

    mix: dict[str, float]
    mix_key: str
    source: Literal["routed", "explicit", "model"]
    switches: list[MixSwitchInfo] = []
    top1: str | None = Field(None, description="the router's most probable adapter (routed only)")
    replica: str | None = Field(None, description="the worker replica that served the request")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    dlp: DlpInfo


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    dlp: DlpInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "dlp"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AdapterInfo(BaseModel):
    name: str
    path: str
    routable: bool = Field(description="the router can pick it (it is one of the router labels)")


class AdapterList(BaseModel):
    data: list[AdapterInfo]


class RegisterAdapterRequest(_Model):
    name: str = Field(..., min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    path: str = Field(..., min_length=1, max_length=4096, description="relative to the root")
    replace: bool = False


# --- Python handle models ------------------------------------------------------------------


class GenerateRequest(SamplingFields):
    """``await serve.get_app_handle("dlp").generate.remote(GenerateRequest(prompt=...))``.

    Exactly one of ``prompt`` / ``messages``."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | None) -> str | None:
        return None if v is None else check_text(v, "prompt")

    @field_validator("messages")
    @classmethod
    def _messages(cls, v: list[ChatMessage] | None) -> list[ChatMessage] | None:
        return None if v is None else check_messages(v)


class GenerateResponse(BaseModel):
    request_id: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    dlp: DlpInfo


class RouteRequest(_Model):
    texts: list[str] = Field(..., min_length=1)
    p: float | None = Field(None, gt=0.0, le=1.0)
    max_adapters: int | None = Field(None, ge=1)
    weighting: Literal["softmax", "renorm"] | None = None

    @field_validator("texts")
    @classmethod
    def _texts(cls, v: list[str]) -> list[str]:
        return [check_text(t, f"texts[{i}]") for i, t in enumerate(v)]


class RouteDecisionModel(BaseModel):
    mix: dict[str, float]
    mix_key: str
    top1: str
    probs: dict[str, float]


class RouteResponse(BaseModel):
    decisions: list[RouteDecisionModel]


# --- ingress -> worker ---------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerRequest:
    """What the ingress sends a LoRA worker: a validated request with its mix decided.

    ``adapter_paths`` names the file of every adapter in the mix so any replica can load it
    on first use; ``mix_names`` is what the adapter-aware request router matches replicas by.
    """

    request_id: str
    mix: dict[str, float]
    mix_key: str
    adapter_paths: dict[str, str]
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    routing: Literal["prompt", "sentence"] = "prompt"
    routing_params: dict[str, Any] = field(default_factory=dict)

    @property
    def mix_names(self) -> tuple[str, ...]:
        return tuple(self.mix)


@dataclass(frozen=True)
class WorkerChunk:
    """A streamed piece from the worker (plain data so it crosses Ray cheaply)."""

    text: str
    mix: dict[str, float]
    mix_key: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    switches: tuple[tuple[int, dict[str, float], str], ...] = ()
    replica: str | None = None
