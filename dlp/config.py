"""Serving configuration: limits and the app description, validated at the edge with pydantic.

Every limit the HTTP API enforces lives here (issue 8 item 5: limits are config, not literals);
`serve_config.yaml` passes an ``AppConfig`` as the app's ``args``. dlp/engine and dlp/lora do
not import this module (they stay pydantic-free); the Ray wiring in deployments/ turns it into
the engine's own dataclass config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dlp.engine.shapes import PUBLISHED_SHAPES
from dlp.errors import DlpError

ADAPTER_ROOT_ENV = "DLP_ADAPTER_ROOT"
ADMIN_TOKEN_ENV = "DLP_ADMIN_TOKEN"
APP_ARGS_ENV = "DLP_APP_ARGS"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServingLimits(_Strict):
    """Caps on what one request may ask for. Requests beyond them get a 4xx naming the field."""

    max_context_tokens: int = Field(
        1024, ge=16, description="prompt tokens + max_tokens must fit in this many tokens"
    )
    max_tokens_cap: int = Field(512, ge=1, description="largest max_tokens a request may ask")
    default_max_tokens: int = Field(64, ge=1, description="max_tokens when a request omits it")
    max_body_bytes: int = Field(
        1_000_000, ge=1024, description="HTTP request bodies above this size get 413"
    )
    max_adapters_per_mix: int = Field(8, ge=1, description="adapters in one explicit or routed mix")
    max_adapter_rank: int = Field(
        16, ge=1, description="registration refuses higher ranks (also the pool's slot rank)"
    )
    max_stop_strings: int = Field(4, ge=0, description="stop strings per request")
    max_stop_chars: int = Field(64, ge=1, description="characters per stop string")
    max_queued_requests: int = Field(
        256,
        ge=1,
        description="requests waiting per caller before Serve answers 503 (backpressure)",
    )
    max_route_texts: int = Field(64, ge=1, description="texts in one /v1/route call")

    @model_validator(mode="after")
    def _consistent(self) -> ServingLimits:
        if self.default_max_tokens > self.max_tokens_cap:
            raise ValueError("default_max_tokens must be <= max_tokens_cap")
        if self.max_tokens_cap >= self.max_context_tokens:
            raise ValueError("max_tokens_cap must be < max_context_tokens")
        return self


class EngineSettings(_Strict):
    """What the worker builds its engine from (mapped onto dlp.engine's EngineConfig)."""

    model: str | None = Field(
        None, description="base model dir (safetensors + tokenizer); null = embedded default"
    )
    shape: Literal["qwen2-1.5b", "llama3-8b"] | None = Field(
        None,
        description="random-weight model of a named shape instead of `model`, with the"
        " embedded tokenizer (benchmarks only: its answers are noise)",
    )
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = Field("cpu", description="cpu, cuda, cuda:N")
    max_batch: int = Field(8, ge=1, description="rows decoded together per step")
    pool_slots: int = Field(8, ge=1, description="adapters resident on the device at once")
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    compile: bool | None = Field(None, description="torch.compile decode; null = on CUDA")
    cuda_graph: bool | None = Field(None, description="CUDA-graph decode; null = on CUDA")
    overlap_steps: bool | None = Field(
        None,
        description="queue decode step N+1 before handling step N's tokens (greedy rows);"
        " null = on CUDA",
    )
    overlap_queue_ahead: bool = Field(
        False,
        description="with overlap_steps: queue step N+1 before step N has finished on the"
        " device (no clear gain measured)",
    )
    compile_scope: Literal["auto", "layer", "step"] = Field(
        "auto",
        description="compile one block for every layer, or the whole decode step (~1 minute"
        " more to start); auto: the whole step where the fast decode path runs",
    )
    decode_attention: Literal["auto", "matmul", "triton", "triton_rope"] = Field(
        "auto",
        description="triton: length-aware decode attention kernel; triton_rope: the kernel"
        " also applies the rotary embedding and writes the KV cache; auto: triton_rope on"
        " the fast decode path, else triton on CUDA for caches over 512 positions",
    )
    decode_gemm: Literal["auto", "cublas", "triton", "triton_pdl"] = Field(
        "auto",
        description="triton: weight-streaming decode GEMM kernels; triton_pdl: those with"
        " every kernel of the step a programmatic dependent launch (Hopper+); auto: the fast"
        " decode path (whole step, triton_rope, triton_pdl) on a Hopper-or-later GPU with"
        " the step compiled and graphed and the attention unsplit, else cuBLAS"
        " (dlp/engine/decode_path.py)",
    )
    admit_min_rows: int | None = Field(
        None,
        ge=1,
        description="while rows decode, prefill waiting requests in groups of this many"
        " (null = max_batch // 8); 1 = admit each at once",
    )
    spare_rows: int = Field(
        0,
        ge=0,
        description="KV cache rows beyond max_batch that waiting requests are prefilled into"
        " before a decode row frees (no gain measured through HTTP on the H200)",
    )
    admit_max_wait_steps: int = Field(
        16, ge=0, description="...or once the oldest has waited this many decode steps"
    )

    @model_validator(mode="after")
    def _one_model(self) -> EngineSettings:
        if self.model and self.shape:
            raise ValueError("engine: give model or shape, not both")
        return self


# Published configs of the paper's backbones (random weights of these shapes for benchmarks).
NAMED_SHAPES: dict[str, dict[str, Any]] = PUBLISHED_SHAPES


class WorkerSettings(_Strict):
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0, description="1 on a GPU node: one worker per GPU")
    max_ongoing_requests: int = Field(16, ge=1)
    routing_stats_period_s: float = Field(
        1.0, gt=0, description="how often replicas publish their resident adapters"
    )
    spill_queue_len: int = Field(
        4,
        ge=1,
        description="a replica holding the mix's adapters is preferred until its queue reaches"
        " this length; then the mix spreads to the least loaded replica below this length"
        " (when every replica is at it, the mix stays where its adapters are)",
    )
    engine_process: bool | None = Field(
        None,
        description="run the engine and its batching loop in a child process of the replica,"
        " so that Serve's threads do not share its GIL; null: on with a CUDA engine (on the"
        " H200 it took HTTP from 0.82-0.93x to 0.99x the engine alone's tokens/s)",
    )
    request_router: Literal["adapter_affinity", "default", "round_robin"] = Field(
        "adapter_affinity",
        description="adapter_affinity: send a mix to the replica holding its adapters"
        " (deployments/request_router.py); default: Serve's power-of-two-choices router;"
        " round_robin: replicas in turn (the baselines benchmarks/affinity_bench.py and"
        " benchmarks/multigpu_bench.py measure against)",
    )

    def uses_engine_process(self, device: str) -> bool:
        """``engine_process`` with null resolved for an engine on ``device``."""
        if self.engine_process is not None:
            return self.engine_process
        return device.startswith("cuda")


class RouterSettings(_Strict):
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0, description="autoscaling target")
    num_cpus: float = Field(0.5, ge=0)
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    p: float = Field(0.6, gt=0, le=1, description="top-p threshold over router probabilities")
    weighting: Literal["softmax", "renorm"] = "softmax"


class IngressSettings(_Strict):
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, ge=0)
    max_ongoing_requests: int = Field(256, ge=1)
    request_timeout_s: float = Field(120.0, gt=0, description="per-request deadline")


class AppConfig(_Strict):
    """The `args` of the Serve application (serve_config.yaml)."""

    cache_dir: str | None = Field(None, description="dlp cache root; null = $DLP_CACHE_DIR")
    adapter_root: str | None = Field(
        None,
        description="registration accepts only paths under this dir; null = $DLP_ADAPTER_ROOT"
        " or <cache>/adapters",
    )
    adapters_dir: str | None = Field(
        None,
        description="adapters available at start (one PEFT subdir per name); null = the demo"
        " adapters (trained on first use)",
    )
    router_dir: str | None = Field(
        None, description="trained MiniMLP router; null = the default router (trained once)"
    )
    limits: ServingLimits = ServingLimits()
    engine: EngineSettings = EngineSettings()
    worker: WorkerSettings = WorkerSettings()
    router: RouterSettings = RouterSettings()
    ingress: IngressSettings = IngressSettings()

    @model_validator(mode="after")
    def _replicas(self) -> AppConfig:
        if self.router.min_replicas > self.router.max_replicas:
            raise ValueError("router.min_replicas must be <= router.max_replicas")
        # Otherwise a routed mix may not fit the pool, and the request fails with a 400 that
        # blames a field the user never sent.
        if self.limits.max_adapters_per_mix > self.engine.pool_slots:
            raise ValueError(
                f"limits.max_adapters_per_mix ({self.limits.max_adapters_per_mix}) must be <="
                f" engine.pool_slots ({self.engine.pool_slots}): a mix must fit the pool"
            )
        return self

    def resolved_cache_dir(self) -> Path:
        from dlp.paths import cache_dir

        return cache_dir(self.cache_dir)

    def resolved_adapter_root(self) -> Path:
        from dlp.paths import adapters_dir

        raw = self.adapter_root or os.environ.get(ADAPTER_ROOT_ENV)
        if raw:
            return Path(raw).expanduser().resolve()
        return adapters_dir(self.resolved_cache_dir()).resolve()


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` wins key by key; nested dicts merge instead of replacing each other."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_set_option(text: str) -> dict[str, Any]:
    """``worker.num_gpus=1`` -> ``{"worker": {"num_gpus": 1}}`` (value parsed as YAML)."""
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise DlpError(f"--set expects KEY=VALUE with a dotted KEY, got {text!r}")
    value: Any = yaml.safe_load(raw) if raw.strip() else None
    for part in reversed(key.strip().split(".")):
        if not part:
            raise DlpError(f"--set key {key!r} has an empty part")
        value = {part: value}
    return value


def load_app_config(args: dict[str, Any] | None = None) -> AppConfig:
    """Validate app args, with ``$DLP_APP_ARGS`` (JSON) merged over them (the GPU override)."""
    merged = dict(args or {})
    env = os.environ.get(APP_ARGS_ENV)
    if env:
        try:
            extra = json.loads(env)
        except ValueError as exc:
            raise DlpError(f"{APP_ARGS_ENV} is not valid JSON: {exc}") from exc
        if not isinstance(extra, dict):
            raise DlpError(f"{APP_ARGS_ENV} must be a JSON object")
        merged = deep_merge(merged, extra)
    return AppConfig.model_validate(merged)
