"""The generation engine: continuous batching over a static KV cache, per-row adapter mixes.

One asyncio task runs the loop. Between two decode steps it admits waiting requests (pins
their adapters in the pool, prefills them into free cache rows) and retires finished or
cancelled ones at once, so a long request never holds short ones back. Every decode step
runs all rows together whatever their mixes: a row's mix is only its line of ``row_scales``.

Forwards run in one worker thread (``step_in_thread``) so the event loop keeps serving
streams and new requests while the accelerator works.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlp.engine.config import EngineConfig
from dlp.engine.detok import IncrementalDetokenizer
from dlp.engine.model import CompactLM
from dlp.engine.runner import DecodeRunner
from dlp.engine.sampling import make_generator, sample_row
from dlp.engine.types import (
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    InvalidRequestError,
    MixSwitch,
)
from dlp.errors import DlpError, InvalidMixError
from dlp.routing.mix import AdapterMix

log = logging.getLogger(__name__)

Reroute = Callable[[str], Awaitable[AdapterMix]]
SENTENCE_ENDS = (".", "!", "?", "\n")


@dataclass(eq=False)
class _Seq:
    """A request inside the engine."""

    req: GenerationRequest
    prompt_ids: list[int]
    prompt_text: str
    mix: AdapterMix
    stream: bool
    queue: asyncio.Queue[GenerationChunk] | None = None
    future: asyncio.Future[GenerationResult] | None = None
    detok: IncrementalDetokenizer | None = None
    generator: torch.Generator | None = None
    lease: Any = None  # dlp.lora.pool.PoolLease
    row: int = -1  # decode row, once it has one
    slot: int = -1  # KV cache row: its decode row's, or a spare row it was prefilled into
    out_ids: list[int] = field(default_factory=list)
    switches: list[MixSwitch] = field(default_factory=list)
    finished: bool = False
    cancelled: bool = False
    reroute_due: bool = False
    checked_len: int = 0  # text length already looked at for sentence ends
    arrived: float = field(default_factory=time.perf_counter)
    arrived_step: int = 0  # the engine's decode step count when it was submitted
    first_token_at: float | None = None
    # Overlapped steps: its last launched step's greedy token is its next input, on the device.
    fed_on_device: bool = False

    @property
    def next_position(self) -> int:
        """Cache position of the last generated token (the one fed to the next step)."""
        return len(self.prompt_ids) + len(self.out_ids) - 1


@dataclass
class _Launched:
    """A step queued by ``_launch_step``: the runner's handle and (row, request) it ran."""

    handle: Any
    rows: list[tuple[int, _Seq]]


class Engine:
    """Batched generation with per-request adapter mixes.

    Build with :meth:`from_config` (loads the model and the adapter pool) or directly from a
    transformers model + tokenizer + :class:`dlp.lora.pool.AdapterPool`. ``await start()``
    before generating; ``await stop()`` at the end.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any | None,
        pool: Any | None,
        config: EngineConfig,
        reroute: Reroute | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.tokenizer = tokenizer
        self.pool = pool
        self.reroute = reroute
        self.hf_model = model
        lora = {}
        n_slots = 0
        if pool is not None:
            lora = {m: (pool.a_stack(m), pool.b_stack(m)) for m in pool.modules}
            n_slots = pool.n_slots
        self.model = CompactLM(
            model, config.max_batch, config.max_seq_len, lora, spare_rows=config.spare_rows
        )
        self.device = self.model.rope_cos.device
        self.runner = DecodeRunner(
            self.model,
            n_slots,
            compile=config.use_compile,
            cuda_graph=config.use_cuda_graph,
            compile_mode=config.compile_mode,
            compile_scope=config.compile_scope,
            attention=config.decode_attention,
            gemm=config.decode_gemm,
            overlap=config.use_overlap,
            queue_ahead=config.use_queue_ahead,
        )
        self.eos_ids = _eos_ids(model, tokenizer)
        # Each row's LoRA scale per pool slot: the runner's staging buffer itself (sent with
        # every step's inputs), so admission writes plain numpy and no torch call.
        self._host_scales = self.runner.host_row_scales
        if self._host_scales is None:
            self._host_scales = np.zeros((config.max_batch, 1), dtype=np.float32)
        # Pool slot -> its version when last copied into the merged decode weights.
        self._synced: dict[int, int] = {}
        self._last_prefill_step = 0  # decode-step count at the last prefill (admission)
        self._rows: list[_Seq | None] = [None] * config.max_batch
        self._waiting: deque[_Seq] = deque()
        # With spare cache rows: requests prefilled (first token made) that wait for a decode
        # row, and the cache rows no request holds.
        self._ready: deque[_Seq] = deque()
        self._prefilling: list[_Seq] = []
        spare = config.spare_rows
        self._free_slots: list[int] = list(range(config.max_batch + spare)) if spare else []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stopping = False
        self._counters = {
            "requests": 0,
            "finished": 0,
            "cancelled": 0,
            "decode_steps": 0,
            "decode_s": 0.0,
            "prefill_calls": 0,
            "prefill_rows": 0,
            "prefill_tokens": 0,
            "prefill_s": 0.0,
            "generated_tokens": 0,
            "mix_switches": 0,
        }

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: EngineConfig, reroute: Reroute | None = None) -> Engine:
        from dlp.lora.pool import AdapterPool

        config.validate()
        model, tokenizer = load_model(config)
        pool = AdapterPool.for_model(
            model,
            target_modules=config.target_modules,
            max_rank=config.max_rank,
            n_slots=config.pool_slots,
            host_budget_bytes=config.host_budget_bytes,
        )
        if config.adapter_root:
            root = Path(config.adapter_root)
            if not root.is_dir():
                raise DlpError(f"engine config: adapter_root {root} is not a directory")
            pool.register_dir(root)
        return cls(model, tokenizer, pool, config, reroute=reroute)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._task is not None:
            return
        self._stopping = False
        self._wake = asyncio.Event()
        if self.config.step_in_thread:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="dlp-engine")
        await self._call(self.runner.capture)
        self._task = asyncio.create_task(self._loop(), name="dlp-engine-loop")

    async def stop(self) -> None:
        """Stop the loop; requests still running or waiting end with finish_reason 'error'."""
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for seq in self._held() + list(self._waiting):
            self._finish(seq, "error")
        self._waiting.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    @property
    def running(self) -> bool:
        """True while the batching loop is alive (health checks)."""
        return self._task is not None and not self._task.done()

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ public API
    async def generate(self, request: GenerationRequest) -> GenerationResult:
        seq = self._submit(request, stream=False)
        try:
            return await seq.future
        finally:
            if not seq.finished:
                seq.cancelled = True
                self._poke()

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Chunks as tokens are made; the last one has ``finish_reason``. Stopping the
        iteration early (break / aclose / task cancel) cancels the request and frees its row."""
        seq = self._submit(request, stream=True)
        try:
            while True:
                chunk = await seq.queue.get()
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            if not seq.finished:
                seq.cancelled = True
                self._poke()

    def result_of_chunks(self, chunks: list[GenerationChunk]) -> GenerationResult:
        """Fold streamed chunks into a result (what :meth:`generate` returns)."""
        last = chunks[-1]
        return GenerationResult(
            request_id=last.request_id,
            text="".join(c.text for c in chunks),
            token_ids=tuple(t for c in chunks for t in c.token_ids),
            mix=last.mix,
            finish_reason=last.finish_reason or "error",
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
        )

    def stats(self) -> dict[str, Any]:
        c = dict(self._counters)
        c["running"] = sum(s is not None for s in self._rows)
        c["ready"] = len(self._ready)
        c["waiting"] = len(self._waiting)
        c["max_batch"] = self.config.max_batch
        c["decode_ms_per_step"] = 1e3 * c["decode_s"] / max(1, c["decode_steps"])
        c["rows_per_step"] = c["generated_tokens"] / max(1, c["decode_steps"])
        c["rows_per_prefill"] = c["prefill_rows"] / max(1, c["prefill_calls"])
        c["prefill_compiled"] = self.runner.prefill_compiled
        c["decode_path"] = self.runner.decode_path.as_dict()  # the step it runs, "auto"s resolved
        if self.pool is not None:
            c["pool"] = self.pool.stats()
        return c

    # ------------------------------------------------------------------ submission
    def _submit(self, request: GenerationRequest, stream: bool) -> _Seq:
        if self._task is None or self._stopping:
            raise DlpError("engine is not running: await engine.start() first")
        prompt_ids, prompt_text = self._tokenize(request)
        request.sampling.validate()
        self._check_mix(request.mix)
        if len(prompt_ids) >= self.config.max_seq_len:
            raise InvalidRequestError(
                f"prompt has {len(prompt_ids)} tokens; max_seq_len is {self.config.max_seq_len}",
                field="prompt",
            )
        params = request.sampling
        need_text = (
            stream
            or bool(params.stop)
            or (request.routing == "sentence" and self.reroute is not None)
        )
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer", field="stop")
        loop = asyncio.get_running_loop()
        seq = _Seq(
            req=request,
            prompt_ids=prompt_ids,
            prompt_text=prompt_text,
            mix=request.mix,
            stream=stream,
            queue=asyncio.Queue() if stream else None,
            future=None if stream else loop.create_future(),
            detok=IncrementalDetokenizer(self.tokenizer, params.stop)
            if need_text and self.tokenizer is not None
            else None,
            generator=make_generator(params, self.device),
            arrived_step=self._counters["decode_steps"],
        )
        self._counters["requests"] += 1
        self._waiting.append(seq)
        self._poke()
        return seq

    def _tokenize(self, request: GenerationRequest) -> tuple[list[int], str]:
        if request.prompt_token_ids is not None:
            ids = [int(t) for t in request.prompt_token_ids]
            vocab = self.model.shape.vocab
            if not ids or any(t < 0 or t >= vocab for t in ids):
                raise InvalidRequestError(
                    f"prompt_token_ids must be non-empty ids in [0, {vocab})",
                    field="prompt_token_ids",
                )
            text = self.tokenizer.decode(ids) if self.tokenizer is not None else ""
            return ids, text
        if (request.prompt is None) == (request.messages is None):
            raise InvalidRequestError("give exactly one of prompt / messages", field="prompt")
        if self.tokenizer is None:
            raise InvalidRequestError(
                "this engine has no tokenizer: use prompt_token_ids", field="prompt"
            )
        if request.messages is not None:
            messages = [dict(m) for m in request.messages]
            for i, m in enumerate(messages):
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise InvalidRequestError(
                        f"messages[{i}] needs string 'role' and 'content'", field="messages"
                    )
            if not messages:
                raise InvalidRequestError("messages must not be empty", field="messages")
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            if not isinstance(request.prompt, str) or not request.prompt:
                raise InvalidRequestError("prompt must be a non-empty string", field="prompt")
            text = request.prompt
            ids = self.tokenizer(text)["input_ids"]
        if not ids:
            raise InvalidRequestError("prompt tokenizes to nothing", field="prompt")
        return list(ids), text

    def _check_mix(self, mix: AdapterMix) -> None:
        if mix.is_base:
            return
        if self.pool is None:
            raise InvalidMixError("this engine has no adapter pool; only the base mix works")
        known = set(self.pool.names())
        unknown = [n for n in mix.names if n not in known]
        if unknown:
            raise InvalidMixError(f"unknown adapter(s) {unknown} (registered: {sorted(known)})")
        if len(mix) > self.pool.n_slots:
            raise InvalidMixError(
                f"mix has {len(mix)} adapters; the pool has {self.pool.n_slots} slots"
            )

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # ------------------------------------------------------------------ the loop
    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._executor is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _loop(self) -> None:
        # With overlap_steps, step N+1 is queued before step N's tokens are handled, so the
        # host's per-token work (detokenising, stop checks, answering, admission) runs while
        # the GPU decodes. ``pending`` is the step in flight.
        pending: _Launched | None = None
        try:
            while not self._stopping:
                self._retire_cancelled()
                self._bind_ready()
                admitted = await self._admit()
                if admitted:
                    await self._prefill(admitted)
                active = [s for s in self._rows if s is not None]
                if not active and pending is None:
                    self._wake.clear()
                    if self._waiting:  # blocked on pool slots held outside the engine
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), 0.05)
                    else:
                        await self._wake.wait()
                    continue
                if active and self._can_overlap(active):
                    launched = await self._call(self._launch_step)
                    if pending is not None:
                        self._handle(pending, await self._call(self._collect_step, pending))
                    pending = launched
                elif pending is not None:  # drain before a synchronous step
                    self._handle(pending, await self._call(self._collect_step, pending))
                    pending = None
                    continue
                else:
                    tokens = await self._call(self._decode_step)
                    self._counters["decode_steps"] += 1
                    for seq, token in zip(active, tokens, strict=True):
                        if not seq.finished:
                            self._on_token(seq, token)
                await self._reroute_due()
                await asyncio.sleep(0)
        except Exception as exc:  # the loop must never die silently
            log.exception("engine loop failed")
            for seq in self._held() + list(self._waiting):
                self._finish(seq, "error", error=exc)
            self._waiting.clear()
            raise

    def _can_overlap(self, active: list[_Seq]) -> bool:
        """Overlap needs every running row greedy (its next input is its own argmax, fed on
        the device) and none routed per sentence (a switch must apply to the next token)."""
        return self.runner.overlap and all(
            s.req.sampling.temperature == 0 and s.req.routing != "sentence" for s in active
        )

    def _held(self) -> list[_Seq]:
        """Requests holding a decode row or a spare cache row (prefilled or being so)."""
        rows = [s for s in self._rows if s is not None]
        return rows + list(self._ready) + [s for s in self._prefilling if s.row < 0]

    def _retire_cancelled(self) -> None:
        for seq in [s for s in self._held() if s.cancelled]:
            self._finish(seq, "cancelled")
        if any(s.cancelled for s in self._waiting):
            for seq in [s for s in self._waiting if s.cancelled]:
                self._finish(seq, "cancelled")
            self._waiting = deque(s for s in self._waiting if not s.finished)

    def _admission_due(self, free: int) -> bool:
        """Whether to prefill waiting requests now.

        A prefill is a forward of its own whose fixed cost (kernel launches, host work) is
        several decode steps, paid by every running row. Requests that arrive one by one (as
        they do through a server, where answers go out and new requests come back staggered)
        would otherwise each get their own prefill the moment a row frees: one small prefill
        every few decode steps, which measured 3x slower than admitting in groups. So, while
        other rows decode, waiting requests are gathered until ``admit_rows`` of them can be
        prefilled together or ``admit_max_wait_steps`` decode steps have passed since the
        oldest arrived and since the last prefill (TGI's ``max_waiting_tokens``). Counting
        from the last prefill matters under a deep queue: the oldest request there has always
        waited long, so counting from its arrival alone would prefill every row the moment it
        frees (measured through HTTP on the H200: groups of 10.7 rows where 16 were asked).
        With no row running they are admitted at once.

        ``free``: rows a prefill may fill now - free decode rows, or with spare cache rows
        (``spare_rows``) free cache rows, so that requests are prefilled in groups before
        decode rows free and handed a row the moment one does (``_bind_ready``)."""
        if not self._waiting or free == 0:
            return False
        if not self._ready and all(s is None for s in self._rows):
            return True
        if min(free, len(self._waiting)) >= self.config.admit_rows:
            return True
        since = max(self._waiting[0].arrived_step, self._last_prefill_step)
        return self._counters["decode_steps"] - since >= self.config.admit_max_wait_steps

    async def _admit(self) -> list[_Seq]:
        """Waiting requests that get a row and their adapters pinned (FIFO; a request whose
        adapters do not fit right now waits, later ones may pass it)."""
        from dlp.lora.pool import PoolBusyError

        spare = self.model.spare_rows > 0
        # With spares, admission takes cache rows straight from the engine's free list.
        free = self._free_slots if spare else [i for i, s in enumerate(self._rows) if s is None]
        if not self._admission_due(len(free)):
            return []
        admitted: list[_Seq] = []
        budget = self.config.max_prefill_tokens
        still_waiting: deque[_Seq] = deque()
        while self._waiting:
            seq = self._waiting.popleft()
            # One prefill holds at most max_batch rows (its graphs and staging are that big),
            # even when spare cache rows leave room for more.
            full = len(admitted) >= self.config.max_batch
            if not free or full or (len(seq.prompt_ids) > budget and admitted):
                still_waiting.append(seq)
                continue
            if not seq.mix.is_base:
                try:
                    seq.lease = await self.pool.acquire(seq.mix.names, wait=False)
                except PoolBusyError:
                    still_waiting.append(seq)
                    continue
                except DlpError as exc:  # unregistered meanwhile, more than the pool holds
                    self._finish(seq, "error", error=exc)
                    continue
            if spare:  # a cache row now, a decode row in _bind_ready
                seq.slot = free.pop(0)
            else:
                seq.row = seq.slot = free.pop(0)
                self._rows[seq.row] = seq
                self._set_scales(seq)
            budget -= len(seq.prompt_ids)
            admitted.append(seq)
        self._waiting = still_waiting
        self._refresh([s.lease for s in admitted if s.lease is not None])
        return admitted

    def _refresh(self, leases: list[Any]) -> None:
        """Bring newly pinned adapters into the merged decode weights (one multi-tensor
        copy): a slot is copied when its pool version differs from the one last copied,
        i.e. only slots written since (a load, also of a replaced adapter into its old slot).
        The rule before (every slot of the admitted leases after any load) made 2.4x the
        copies: 0.35 s of a 1.6 s run on the H200 with 1000 adapters (0.81x of 8's)."""
        if not leases or not self.model.lora_targets:
            return
        slots = set()
        for lease in leases:
            for name in lease.names:
                slot = lease.slot_of(name)
                version = self.pool.slot_version(slot)
                if self._synced.get(slot) != version:
                    slots.add(slot)
                    self._synced[slot] = version
        if slots:
            self.model.refresh_slots(sorted(slots))

    def _set_scales(self, seq: _Seq) -> None:
        self._scales_of(seq, self._host_scales[seq.row])

    def _scales_of(self, seq: _Seq, out: np.ndarray) -> None:
        """Write the request's LoRA scale per pool slot into ``out`` (w_i * s_i of its
        adapters, 0 elsewhere)."""
        out[:] = 0.0
        if seq.lease is not None:
            for name, weight in seq.mix.entries:
                out[seq.lease.slot_of(name)] += weight * seq.lease.scaling(name)

    def _bind_ready(self) -> None:
        """Hand free decode rows to prefilled requests (spare cache rows), oldest first:
        the row reads the request's cache row through the step's slot table."""
        if not self._ready:
            return
        free = [i for i, s in enumerate(self._rows) if s is None]
        while free and self._ready:
            seq = self._ready.popleft()
            seq.row = free.pop(0)
            self._rows[seq.row] = seq
            self._set_scales(seq)

    async def _prefill(self, seqs: list[_Seq]) -> None:
        self._last_prefill_step = self._counters["decode_steps"]
        start = time.perf_counter()
        # Held while the forward runs, so that a failure answers them too (the loop's error
        # path finishes every held request; one going into a spare row has no decode row).
        self._prefilling = seqs
        first = await self._call(self._prefill_forward, seqs)
        self._prefilling = []
        self._counters["prefill_s"] += time.perf_counter() - start
        self._counters["prefill_calls"] += 1
        self._counters["prefill_rows"] += len(seqs)
        self._counters["prefill_tokens"] += sum(len(s.prompt_ids) for s in seqs)
        for seq, token in zip(seqs, first, strict=True):
            if not seq.finished:
                self._on_token(seq, token)
            if seq.row < 0 and not seq.finished:
                self._ready.append(seq)
        self._bind_ready()

    # ------------------------------------------------------------------ forwards (worker)
    @torch.no_grad()
    def _prefill_forward(self, seqs: list[_Seq]) -> list[int]:
        rows = [s.slot for s in seqs]  # the cache rows to fill
        scales = None
        if self.pool is not None and self.model.lora:
            # Every slot's scale (0 where unused): one prefill graph whatever the mixes are.
            scales = np.zeros((len(seqs), self._host_scales.shape[1]), dtype=np.float32)
            for seq, out in zip(seqs, scales, strict=True):
                self._scales_of(seq, out)
        # Greedy first tokens come back in one device->host copy: each sync releases the
        # GIL, and in a busy server process (Ray's threads) taking it back can cost a
        # switch interval.
        logits, greedy = self.runner.prefill_host([s.prompt_ids for s in seqs], rows, scales)
        return [
            self._choose(seq, logits[i]) if seq.req.sampling.temperature > 0 else greedy[i]
            for i, seq in enumerate(seqs)
        ]

    def _choose(self, seq: _Seq, logits: torch.Tensor) -> int:
        return sample_row(logits, seq.req.sampling, seq.generator)

    def _stage_rows(self, overlap: bool) -> tuple[list[int], int, bool]:
        """Write the next step's inputs as numpy into the runner's pinned staging buffer (one
        copy sends them; no torch call per row). Returns (live rows, rows to run, LoRA?).

        Free rows decode token 0 at position 0 (their output is dropped; the attention
        kernel then reads one key), into their own cache row, or with spare rows into the
        scratch row: their own may hold a prefilled request's prompt. With ``overlap``, a
        row that ran in the previous launched step takes that step's greedy token on the
        device (override 0); otherwise every row's token and position come from the host."""
        runner = self.runner
        live = [i for i, s in enumerate(self._rows) if s is not None]
        tokens, positions = runner.host_tokens, runner.host_positions
        override = runner.host_override  # None unless the runner overlaps steps
        assert override is not None or not overlap
        slots = runner.host_slots  # None unless the cache has spare rows
        tokens[:] = 0
        positions[:] = 0
        if override is not None:
            override[:] = 1
        if slots is not None:
            slots[:] = self.model.scratch_row  # free rows write their garbage there
        for i in live:
            seq = self._rows[i]
            if slots is not None:
                slots[i] = seq.slot
            if overlap and seq.fed_on_device:
                override[i] = 0
                continue
            tokens[i] = seq.out_ids[-1]
            positions[i] = seq.next_position
            seq.fed_on_device = overlap
        n = self.config.max_batch if runner.captured else live[-1] + 1
        return live, n, any(self._rows[i].lease is not None for i in live)

    @torch.no_grad()
    def _decode_step(self) -> list[int]:
        start = time.perf_counter()
        runner = self.runner
        live, n, use_lora = self._stage_rows(overlap=False)
        runner.upload_step_inputs()
        logits, greedy = runner.step(n, lora=use_lora)
        greedy_host = greedy.tolist()
        out = []
        for i in live:
            seq = self._rows[i]
            if seq.req.sampling.temperature > 0:
                out.append(self._choose(seq, logits[i]))
            else:
                out.append(greedy_host[i])
        self._counters["decode_s"] += time.perf_counter() - start
        return out

    @torch.no_grad()
    def _launch_step(self) -> _Launched:
        """Queue one overlapped step: rows that ran in the previous launched step continue
        from its greedy token on the device; the others (just prefilled, or after a
        synchronous step) get their last token and position from the host."""
        start = time.perf_counter()
        live, n, use_lora = self._stage_rows(overlap=True)
        handle = self.runner.step_async(n, lora=use_lora)
        self._counters["decode_s"] += time.perf_counter() - start
        return _Launched(handle, [(i, self._rows[i]) for i in live])

    def _collect_step(self, launched: _Launched) -> list[int]:
        start = time.perf_counter()
        tokens = self.runner.collect(launched.handle)
        self._counters["decode_s"] += time.perf_counter() - start
        return tokens

    def _handle(self, launched: _Launched, tokens: list[int]) -> None:
        """Tokens of a collected step for the requests it ran; a request that finished
        meanwhile (its previous token ended it, or it was cancelled) drops its token."""
        self._counters["decode_steps"] += 1
        for row, seq in launched.rows:
            if not seq.finished:
                self._on_token(seq, tokens[row])

    # ------------------------------------------------------------------ per-token logic
    def _on_token(self, seq: _Seq, token: int) -> None:
        params = seq.req.sampling
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        if token in self.eos_ids and not params.ignore_eos:
            self._finish(seq, "stop")
            return
        seq.out_ids.append(token)
        self._counters["generated_tokens"] += 1
        text = seq.detok.add(token) if seq.detok is not None else ""
        if seq.detok is not None and seq.detok.stopped:
            self._finish(seq, "stop", pending=(token, text))
            return
        if len(seq.out_ids) >= params.max_tokens or seq.next_position + 1 >= (
            self.config.max_seq_len
        ):
            self._finish(seq, "length", pending=(token, text))
            return
        if seq.stream:
            seq.queue.put_nowait(self._chunk(seq, text, (token,), None))
        if (
            seq.req.routing == "sentence"
            and self.reroute is not None
            and seq.detok is not None
            and len(seq.detok.text) > seq.checked_len
        ):
            seq.checked_len = len(seq.detok.text)
            if seq.detok.text.rstrip(" ").endswith(SENTENCE_ENDS):
                seq.reroute_due = True

    def _chunk(
        self, seq: _Seq, text: str, token_ids: tuple[int, ...], finish: FinishReason | None
    ) -> GenerationChunk:
        return GenerationChunk(
            request_id=seq.req.request_id,
            text=text,
            token_ids=token_ids,
            mix=seq.mix,
            finish_reason=finish,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.out_ids),
        )

    def _finish(
        self,
        seq: _Seq,
        reason: FinishReason,
        pending: tuple[int, str] | None = None,
        error: BaseException | None = None,
    ) -> None:
        if seq.finished:
            return
        seq.finished = True
        if seq.row >= 0 and self._rows[seq.row] is seq:
            self._rows[seq.row] = None
            self._host_scales[seq.row] = 0.0
        if self.model.spare_rows and seq.slot >= 0:
            # A step still in flight may write this row; a prefill into it is queued after.
            self._free_slots.append(seq.slot)
            seq.slot = -1
            if seq.row < 0 and seq in self._ready:
                self._ready.remove(seq)
        if seq.lease is not None:
            seq.lease.release()
            seq.lease = None
        self._counters["cancelled" if reason == "cancelled" else "finished"] += 1
        if seq.detok is not None:
            text = seq.detok.text
        elif self.tokenizer is not None:
            text = self.tokenizer.decode(seq.out_ids, skip_special_tokens=True)
        else:
            text = ""
        if seq.stream:
            tail = (pending[1] if pending else "") + (seq.detok.flush() if seq.detok else "")
            ids = (pending[0],) if pending else ()
            if error is not None and reason == "error":
                log.warning("request %s failed: %s", seq.req.request_id, error)
            seq.queue.put_nowait(self._chunk(seq, tail, ids, reason))
            return
        if seq.future is None or seq.future.done():
            return
        if error is not None:
            seq.future.set_exception(error)
            return
        seq.future.set_result(
            GenerationResult(
                request_id=seq.req.request_id,
                text=text,
                token_ids=tuple(seq.out_ids),
                mix=seq.mix,
                finish_reason=reason,
                prompt_tokens=len(seq.prompt_ids),
                completion_tokens=len(seq.out_ids),
                mix_switches=tuple(seq.switches),
            )
        )

    # ------------------------------------------------------------------ sentence routing
    async def _reroute_due(self) -> None:
        due = [s for s in self._rows if s is not None and s.reroute_due and not s.finished]
        if not due:
            return
        for seq in due:
            seq.reroute_due = False
        mixes = await asyncio.gather(
            *(self.reroute(seq.prompt_text + seq.detok.text) for seq in due),
            return_exceptions=True,
        )
        for seq, mix in zip(due, mixes, strict=True):
            if isinstance(mix, BaseException):
                log.warning("reroute failed for %s: %s", seq.req.request_id, mix)
                continue
            if mix.key == seq.mix.key or seq.finished:
                continue
            await self._switch(seq, mix)

    async def _switch(self, seq: _Seq, mix: AdapterMix) -> None:
        """Give row ``seq`` a new mix from its next token (keeps the old one if the new
        adapters cannot be pinned right now)."""
        from dlp.lora.pool import PoolBusyError

        lease = None
        if not mix.is_base:
            try:
                self._check_mix(mix)
                lease = await self.pool.acquire(mix.names, wait=False)
                self._refresh([lease])
            except (PoolBusyError, DlpError) as exc:
                log.info("mix switch for %s skipped: %s", seq.req.request_id, exc)
                return
        if seq.lease is not None:
            seq.lease.release()
        seq.lease = lease
        seq.mix = mix
        self._set_scales(seq)
        seq.switches.append(MixSwitch(at_token=len(seq.out_ids), mix=mix))
        self._counters["mix_switches"] += 1


def _eos_ids(model: torch.nn.Module, tokenizer: Any | None) -> frozenset[int]:
    """The ids transformers ``generate`` stops at: generation_config first, else tokenizer."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = getattr(model.config, "eos_token_id", None)
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return frozenset()
    return frozenset([ids] if isinstance(ids, int) else ids)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(config: EngineConfig) -> Any | None:
    """The tokenizer that ``config``'s model comes with (what :func:`load_model` returns
    beside the model), without loading the model."""
    from transformers import AutoTokenizer

    if config.model_config is not None:
        if not config.tokenizer_path:
            return None
        return AutoTokenizer.from_pretrained(config.tokenizer_path, local_files_only=True)
    if config.model_path is None:
        from dlp.base_model import ensure_base_model

        return AutoTokenizer.from_pretrained(ensure_base_model(), local_files_only=True)
    return AutoTokenizer.from_pretrained(
        config.tokenizer_path or config.model_path, local_files_only=True
    )


def load_model(config: EngineConfig) -> tuple[torch.nn.Module, Any | None]:
    """The base model (+ tokenizer) that ``config`` names, on its device, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = _DTYPES[config.dtype]
    if config.model_config is not None:
        spec = dict(config.model_config)
        model_type = spec.pop("model_type", None)
        if model_type is None:
            raise DlpError("engine config: model_config needs a model_type")
        hf_config = AutoConfig.for_model(model_type, **spec)
        torch.manual_seed(config.seed)
        with torch.device(config.device):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        model.eval()
        tokenizer = None
        if config.tokenizer_path:
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_path, local_files_only=True)
        return model, tokenizer
    if config.model_path is None:
        from dlp.base_model import load_base_model

        return load_base_model(dtype=dtype, device=config.device)
    path = Path(config.model_path)
    if not path.is_dir():
        raise DlpError(f"engine config: model_path {path} is not a directory")
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_path or path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    model.to(config.device).eval()
    return model, tokenizer
