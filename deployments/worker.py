"""LoRA worker deployment: one engine (base model + adapter pool) per replica, one per GPU.

The engine batches continuously: every decode step runs all running requests together, each
row with its own adapter mix (the fused LoRA layers compute the per-row weighted sum), so
"grouping by mix" costs no extra kernels. This deployment only wires it to Serve:

- adapters are registered on first use from the paths the ingress sends with each request
  (no broadcast needed when the catalogue changes);
- resident adapters are published as routing stats for the adapter-aware request router;
- engine errors become RequestError with the field named (4xx at the ingress);
- metrics: batch size and distinct mixes per step (sampled), pool hits/loads/evictions.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.api_models import RequestError, WorkerChunk, WorkerRequest
from deployments.metrics import WorkerMetrics
from dlp.config import NAMED_SHAPES, AppConfig, ServingLimits
from dlp.engine.config import EngineConfig
from dlp.engine.types import (
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    InvalidRequestError,
    SamplingParams,
)
from dlp.errors import AdapterValidationError, DlpError, InvalidMixError
from dlp.lora.pool import AdapterInUseError
from dlp.routing.mix import AdapterMix

log = logging.getLogger("ray.serve")

METRICS_PERIOD_S = 0.5
SWITCH_INTERVAL_S = 0.0001


def engine_config_dict(cfg: AppConfig) -> dict[str, Any]:
    """AppConfig -> the keyword arguments of dlp.engine's EngineConfig (plain data)."""
    e = cfg.engine
    out: dict[str, Any] = {
        "dtype": e.dtype,
        "device": e.device,
        "max_batch": e.max_batch,
        "max_seq_len": cfg.limits.max_context_tokens,
        "pool_slots": e.pool_slots,
        "max_rank": cfg.limits.max_adapter_rank,
        "target_modules": tuple(e.target_modules),
        "compile": e.compile,
        "cuda_graph": e.cuda_graph,
        "compile_scope": e.compile_scope,
        "decode_attention": e.decode_attention,
        "decode_gemm": e.decode_gemm,
        "overlap_steps": e.overlap_steps,
        "overlap_queue_ahead": e.overlap_queue_ahead,
        "admit_min_rows": e.admit_min_rows,
        "admit_max_wait_steps": e.admit_max_wait_steps,
        "spare_rows": e.spare_rows,
    }
    if e.model:
        out["model_path"] = str(Path(e.model).expanduser().resolve())
    elif e.shape:
        from dlp.paths import model_dir

        out["model_config"] = dict(NAMED_SHAPES[e.shape])
        # Random weights, but real text in and out: the embedded model's tokenizer.
        out["tokenizer_path"] = str(model_dir(cfg.resolved_cache_dir()))
    return out


def _placement() -> dict[str, Any]:
    """Where this replica runs: its node and the GPUs Ray gave it (one per worker on a GPU
    node; Ray sets CUDA_VISIBLE_DEVICES to them, and the engine's child inherits it)."""
    import os

    import ray

    ctx = ray.get_runtime_context()
    return {
        "node_id": ctx.get_node_id(),
        "gpu_ids": [str(i) for i in ctx.get_accelerator_ids().get("GPU", [])],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "pid": os.getpid(),
    }


def _field_of(exc: BaseException, default: str) -> str:
    return getattr(exc, "field", None) or default


@serve.deployment(name="LoraWorker")
class LoraWorker:
    async def __init__(
        self,
        engine_config: dict[str, Any],
        limits: dict[str, Any],
        router: DeploymentHandle | None = None,
        registry: DeploymentHandle | None = None,
        torch_threads: int | None = None,
        engine_process: bool = False,
    ) -> None:
        # Async constructor (Serve awaits it): the model loads in a thread, then the engine
        # starts (CUDA graph capture / compile on GPUs) before the replica takes traffic, so
        # a replica is only RUNNING once it is warm.
        import torch

        from dlp.engine.engine import Engine
        from dlp.engine.engine_process import EngineProcess

        if torch_threads:
            torch.set_num_threads(torch_threads)
        # The engine thread gives up the GIL at every torch call and device sync (three per
        # decode step); with Python's default 5 ms switch interval, Ray's own threads in this
        # process can then keep it for longer than a whole decode step. At 0.5 ms a step
        # through HTTP still took 0.23 ms more than the engine alone (H200, 2.64 vs 2.41 ms).
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.limits = ServingLimits.model_validate(limits)
        config = EngineConfig(**engine_config)
        reroute = self._reroute if router is not None else None
        # With the engine in a child, stats calls are round trips (see _ask).
        self._stats_off_loop = engine_process
        if engine_process:
            # The engine's loop in a child process: Serve's threads here no longer share
            # its GIL. Same API and errors (dlp/engine/engine_process.py).
            self.engine = await asyncio.to_thread(EngineProcess, config, reroute, torch_threads)
        else:
            self.engine = await asyncio.to_thread(Engine.from_config, config, reroute)
        self.pool = self.engine.pool
        self.tokenizer = self.engine.tokenizer
        self.router = router
        self.registry = registry
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (never in production)
            self.replica = "local"
        self.placement = _placement()
        self.metrics = WorkerMetrics()
        self._adapter_locks: dict[str, asyncio.Lock] = {}
        self._registered: dict[str, str] = {}  # name -> path in this replica's pool
        self._inflight: dict[str, str] = {}  # request id -> mix key
        self._catalogue: dict[str, str] = {}
        self._catalogue_at = 0.0
        await self.engine.start()
        self._metrics_task = asyncio.get_running_loop().create_task(self._metrics_loop())

    # --- lifecycle -----------------------------------------------------------------------

    async def _metrics_loop(self) -> None:
        while True:
            await asyncio.sleep(METRICS_PERIOD_S)
            try:
                stats = await self._ask(self.engine.stats)
                if stats.get("running"):
                    self.metrics.step(stats["running"], len(set(self._inflight.values())))
                if self.pool is not None:
                    pool = stats.get("pool", {})
                    self.metrics.pool_stats(pool, len(pool.get("resident", ())))
            except Exception:  # metrics must never take the replica down
                log.exception("worker metrics")

    async def __del__(self) -> None:
        # Serve's shutdown hook: stop the engine (with engine_process, its child too; a
        # replica that dies without this leaves the child to exit on the closed socket).
        task = getattr(self, "_metrics_task", None)
        if task is not None:  # first: it would ask a stopping engine for its stats
            task.cancel()
        engine = getattr(self, "engine", None)
        if engine is not None:
            await engine.stop()

    async def check_health(self) -> None:
        if not self.engine.running:
            raise RuntimeError("engine loop is not running")

    async def _ask(self, stats: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """A stats call: from a thread when it is a round trip to the engine's child process
        (answered between its steps, up to a prefill later), else directly."""
        if self._stats_off_loop:
            return await asyncio.to_thread(stats)
        return stats()

    async def record_routing_stats(self) -> dict[str, Any]:
        """What the adapter-aware request router reads: adapters this replica holds."""
        if self.pool is None:
            return {"adapters": []}
        stats = await self._ask(self.pool.stats)
        held = sorted(set(stats["resident"]) | set(stats["host_resident"]))
        # Only what routing needs: every change of this dict is broadcast to all routers.
        # `resident`: the device slots, least recently used first (what a request can use
        # without a load); `adapters`: also the host tier (no disk read).
        return {"adapters": held, "resident": list(stats["resident"])}

    async def stats(self) -> dict[str, Any]:
        out = await self._ask(self.engine.stats)
        out["replica"] = self.replica
        out["placement"] = self.placement
        return out

    # --- adapters --------------------------------------------------------------------------

    async def _ensure_adapters(self, paths: dict[str, str], field: str) -> None:
        for name, path in paths.items():
            if self._registered.get(name) == path:
                continue
            lock = self._adapter_locks.setdefault(name, asyncio.Lock())
            async with lock:
                if self._registered.get(name) == path:
                    continue
                try:
                    await asyncio.to_thread(self.pool.register, name, path, True)
                except AdapterInUseError:
                    # Replaced while a running batch pins the old version: serve this request
                    # with the version in use; a later request picks up the new one.
                    continue
                except (AdapterValidationError, DlpError) as exc:
                    raise RequestError(
                        400, field, f"adapter {name!r} cannot be loaded: {exc}"
                    ) from None
                self._registered[name] = path

    async def register_adapter(self, name: str, path: str) -> dict[str, Any]:
        """Load and validate an adapter against this base model (admin registration)."""
        if self.pool is None:
            raise RequestError(400, "name", "this worker has no adapter pool")
        lock = self._adapter_locks.setdefault(name, asyncio.Lock())
        async with lock:
            try:
                await asyncio.to_thread(self.pool.register, name, path, True)
            except AdapterInUseError as exc:
                raise RequestError(409, "name", f"{exc}") from None
            except (AdapterValidationError, DlpError) as exc:
                # pool.register leaves nothing behind on failure, and the registry has not
                # been told: a refused adapter is not half-registered anywhere.
                raise RequestError(400, "path", str(exc)) from None
            self._registered[name] = path
        return {"name": name, "path": path}

    async def _reroute(self, text: str) -> AdapterMix:
        """Sentence-level routing: the router deployment decides the mix for the text so far."""
        assert self.router is not None
        decision = await self.router.route.remote(text[-4000:])
        mix = AdapterMix.from_weights(decision["mix"])
        paths = await self._paths(list(mix.names))
        kept = {n: w for n, w in mix.entries if n in paths}
        await self._ensure_adapters({n: paths[n] for n in kept}, "routing")
        return AdapterMix.from_weights(kept) if kept else AdapterMix.base()

    async def _paths(self, names: list[str]) -> dict[str, str]:
        if self.registry is None:
            return {}
        if (
            any(n not in self._catalogue for n in names)
            or time.monotonic() - (self._catalogue_at) > 1.0
        ):
            _, self._catalogue = await self.registry.snapshot.remote()
            self._catalogue_at = time.monotonic()
        return {n: self._catalogue[n] for n in names if n in self._catalogue}

    # --- generation ------------------------------------------------------------------------

    def _prompt_tokens(self, req: WorkerRequest) -> int | None:
        tok = self.tokenizer
        if tok is None:
            return None
        if req.messages is not None:
            text = tok.apply_chat_template(
                [dict(m) for m in req.messages], tokenize=False, add_generation_prompt=True
            )
            return len(tok(text, add_special_tokens=False)["input_ids"])
        return len(tok(req.prompt or "")["input_ids"])

    def _surely_fits(self, req: WorkerRequest, cap: int) -> bool:
        """Cheap upper bound: a byte-level BPE token covers >= 1 byte, so UTF-8 bytes (plus
        room for special tokens and the chat template) bound the prompt's token count. Most
        requests pass here and are tokenised once, by the engine."""
        if req.messages is not None:
            size = sum(len(m["content"].encode()) + 128 for m in req.messages) + 256
        else:
            size = len((req.prompt or "").encode()) + 8
        return size + req.max_tokens <= cap

    async def _prepare(self, req: WorkerRequest) -> GenerationRequest:
        field = "prompt" if req.messages is None else "messages"
        cap = self.limits.max_context_tokens
        fits = self._surely_fits(req, cap)
        n_prompt = None if fits else await asyncio.to_thread(self._prompt_tokens, req)
        if n_prompt is not None and n_prompt + req.max_tokens > cap:
            raise RequestError(
                400,
                field if n_prompt >= cap else "max_tokens",
                f"this model's context is {cap} tokens; the request needs {n_prompt} prompt"
                f" + {req.max_tokens} max_tokens",
            )
        mix = AdapterMix.from_weights(req.mix)
        if not mix.is_base:
            await self._ensure_adapters(req.adapter_paths, "adapters")
        sampling = SamplingParams(
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stop=req.stop,
            ignore_eos=req.ignore_eos,
        )
        return GenerationRequest(
            request_id=req.request_id,
            mix=mix,
            prompt=req.prompt,
            messages=req.messages,
            sampling=sampling,
            routing=req.routing if self.router is not None else "prompt",
        )

    def _chunk(
        self, part: GenerationChunk | GenerationResult, text: str, switches: tuple = ()
    ) -> WorkerChunk:
        return WorkerChunk(
            text=text,
            mix=part.mix.as_dict(),
            mix_key=part.mix.key,
            finish_reason=part.finish_reason,
            prompt_tokens=part.prompt_tokens,
            completion_tokens=part.completion_tokens,
            switches=switches,
            replica=self.replica,
        )

    async def generate(self, req: WorkerRequest) -> WorkerChunk:
        greq = await self._prepare(req)
        self._inflight[req.request_id] = req.mix_key
        try:
            result = await self.engine.generate(greq)
        except (InvalidRequestError, InvalidMixError) as exc:
            raise RequestError(400, _field_of(exc, "adapters"), str(exc)) from None
        except DlpError as exc:
            raise RequestError(503, None, f"engine unavailable: {exc}") from None
        finally:
            self._inflight.pop(req.request_id, None)
        self.metrics.requests.inc(tags={"finish_reason": result.finish_reason})
        if result.finish_reason == "error":
            raise RequestError(503, None, "generation failed on this replica, retry")
        switches = tuple((s.at_token, s.mix.as_dict(), s.mix.key) for s in result.mix_switches)
        return self._chunk(result, result.text, switches)

    async def generate_stream(self, req: WorkerRequest) -> AsyncIterator[WorkerChunk]:
        greq = await self._prepare(req)
        self._inflight[req.request_id] = req.mix_key
        stream = self.engine.generate_stream(greq)
        try:
            try:
                part = await stream.__anext__()
            except (InvalidRequestError, InvalidMixError) as exc:
                raise RequestError(400, _field_of(exc, "adapters"), str(exc)) from None
            except DlpError as exc:
                raise RequestError(503, None, f"engine unavailable: {exc}") from None
            switches: list[tuple[int, dict[str, float], str]] = []
            last_key = part.mix.key
            generated = 0
            while True:
                if part.mix.key != last_key:
                    switches.append((generated, part.mix.as_dict(), part.mix.key))
                    last_key = part.mix.key
                generated = part.completion_tokens
                yield self._chunk(part, part.text, tuple(switches))
                if part.finish_reason is not None:
                    self.metrics.requests.inc(tags={"finish_reason": part.finish_reason})
                    return
                part = await stream.__anext__()
        finally:
            self._inflight.pop(req.request_id, None)
            # Closing the engine stream cancels the request there and frees its row
            # (client disconnects end up here through Serve's cancellation).
            await stream.aclose()
