"""Runs the forwards: eagerly (CPU, tests), or compiled, the decode step also captured as one
CUDA graph.

The step reads three static input buffers (token, position and LoRA row scales per row) and
writes two static outputs (logits, greedy token). Changing mixes only rewrites ``row_scales``;
loading an adapter rewrites pool slots in place: neither changes a shape or an address, so the
graph captured once stays valid for the engine's life.

Prefill shapes change with every admission (rows x prompt length), so it is compiled with
those two sizes dynamic (one graph for a single row, one for several: size 1 is always
specialised). Even compiled, a prefill costs ~20 ms of host time on the H200 machine (28
layers x ~13 launches through Inductor's wrapper) whatever its size, which a server that
admits a few requests at a time pays over and over. So prefills of up to
``graph_tokens`` padded tokens replay CUDA graphs captured per bucket (rows: 1, 2, 4, then
multiples of 2 to 16, of 4 to 32, of 8 beyond, by repeating the last row; tokens: multiples
of 16 up to 256, then powers of two) in one shared memory pool. Larger prefills are
compute-bound (their host time hides behind the GPU's) and run directly, padded to 16 tokens
only. All buckets are captured at start, with the decode graphs: capturing while serving would race
with adapter loads on the event loop's thread.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

from dlp.engine.decode_attention import pick_splits, triton_available
from dlp.engine.decode_path import PDL_MIN_CAPABILITY, DeviceTraits, resolve_decode_path
from dlp.engine.greedy_kernel import greedy_tokens
from dlp.engine.inductor_ops import register_inductor_fallbacks
from dlp.engine.model import CompactLM, decode_layer, prefill_layer
from dlp.engine.staging import StagingBuffer
from dlp.errors import DlpError

log = logging.getLogger(__name__)


PREFILL_PAD = 16
# triton_pdl with the fused norm: the o GEMM also writes its rows times the post-attention
# norm's weight and gate/up applies each row's rstd after its product, so gate/up's K steps
# do no norm arithmetic (CompactLM.decode_prescale_norm). On the H200 (Qwen2-1.5B step (a),
# with gate/up at one 128-wide program an SM): 1.619-1.665 ms against 1.673-1.704 ms with
# the norm inside gate/up's K steps (benchmarks/results/decode_step_h200_prescaled2.json).
PRESCALE_NORM = True
# triton_pdl: the decode GEMMs whose weights get a second copy laid out K step by K step, so
# that a program's K step is one contiguous read (CompactLM.pack_decode_weights). None by
# default: on the H200 (Qwen2-1.5B step (a)) gate/up + down packed measured 1.5% faster in
# interleaved rounds but slower first-timed, for +2.3 GB (+11 GB at Llama-3-8B)
# (benchmarks/results/decode_step_h200_packed.json).
PACKED_WEIGHTS: tuple[str, ...] = ()
# Above this many padded tokens a prefill's GPU time (~16 ms on an H200 for Qwen2-1.5B)
# covers its host time: run it directly, without a bucket's padding.
PREFILL_GRAPH_TOKENS = 4096


def _pow2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def _fill_prompts(out: np.ndarray, prompts: Sequence[Sequence[int]]) -> None:
    """Right-padded prompts (zeros after each) into the first rows of ``out`` [rows, T]."""
    out[:] = 0
    for i, prompt in enumerate(prompts):
        out[i, : len(prompt)] = prompt


class _PrefillGraph:
    """One captured prefill bucket: views of the runner's staging buffer as its static
    inputs, and the graph (which leaves logits and greedy tokens in the runner's buffers)."""

    def __init__(self, runner: DecodeRunner, rows: int, tokens: int, lora: bool) -> None:
        staging = runner.prefill_inputs
        self.n_rows, self.n_tokens = rows, tokens
        self.n_slots = runner.n_slots if lora else 0
        self.tokens = staging.device("tokens")[: rows * tokens].view(rows, tokens)
        self.lengths = staging.device("lengths")[:rows]
        self.rows = staging.device("rows")[:rows]
        self.scales = (
            staging.device("scales")[: rows * self.n_slots].view(rows, self.n_slots)
            if self.n_slots
            else None
        )
        self.graph = torch.cuda.CUDAGraph()

    def load(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        rows: torch.Tensor,
        row_scales: torch.Tensor | None,
    ) -> None:
        """Copy a prefill given as device tensors into the bucket; spare rows repeat the last
        one (same tokens, same cache row: they write the values it writes)."""
        n, t = tokens.shape
        self.tokens.zero_()
        self.tokens[:n, :t].copy_(tokens)
        self.tokens[n:].copy_(self.tokens[n - 1 : n].expand(self.tokens.shape[0] - n, -1))
        for static, real in ((self.lengths, lengths), (self.rows, rows), (self.scales, row_scales)):
            if static is None or real is None:
                continue
            static[:n].copy_(real)
            static[n:].copy_(real[n - 1 : n].expand(static.shape[0] - n, *real.shape[1:]))

    def load_host(
        self,
        staging: StagingBuffer,
        prompts: Sequence[Sequence[int]],
        rows: Sequence[int],
        row_scales: np.ndarray | None,
    ) -> None:
        """The same from host lists: numpy writes into the pinned buffer, one copy."""
        r, t, n = self.n_rows, self.n_tokens, len(prompts)
        tokens = staging.host("tokens")[: r * t].reshape(r, t)
        _fill_prompts(tokens, prompts)
        tokens[n:] = tokens[n - 1]
        lengths = staging.host("lengths")[:r]
        lengths[:n] = [len(p) for p in prompts]
        index = staging.host("rows")[:r]
        index[:n] = rows
        fields = [lengths, index]
        if self.n_slots and row_scales is not None:
            scales = staging.host("scales")[: r * self.n_slots].reshape(r, self.n_slots)
            scales[:n] = row_scales
            fields.append(scales)
        for field in fields:
            field[n:] = field[n - 1]
        staging.upload()


# prefill_layer arguments whose first dim is the number of rows (dynamic), and the ones
# whose token dim is dynamic.
_PARAMS = list(inspect.signature(prefill_layer).parameters)
_ROW_ARGS = tuple(_PARAMS.index(n) for n in ("x", "rows", "in_scales", "row_scales"))
_TOKEN_DIMS = ((_PARAMS.index("x"), 1), (_PARAMS.index("cos"), 2), (_PARAMS.index("sin"), 2))


# Dynamo keeps one cache per code object, so every engine of a process shares the entries of
# decode_layer / prefill_layer / _eager_step, and each engine adds its own (LoRA on and off,
# slot table, kernel flags). Dynamo's default limit (8) let a process hold only ~4 engines
# (tests, benchmarks, a replica that rebuilds its engine); past it a fullgraph compile fails
# and the engine falls back to slower eager graphs.
MIN_RECOMPILE_LIMIT = 64


def allow_engine_recompiles() -> None:
    """Raise dynamo's per-function recompile limit to MIN_RECOMPILE_LIMIT (never lower it)."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, MIN_RECOMPILE_LIMIT)
    config.accumulated_recompile_limit = max(
        config.accumulated_recompile_limit, 4 * MIN_RECOMPILE_LIMIT
    )


def compiled_prefill_layer() -> Callable[..., torch.Tensor]:
    """``prefill_layer`` compiled once for every layer, dynamic in rows and tokens."""
    compiled = torch.compile(prefill_layer, fullgraph=True, dynamic=False)
    mark = torch._dynamo.maybe_mark_dynamic

    def layer(*args):
        if args[0].shape[0] > 1:
            for i in _ROW_ARGS:
                if args[i] is not None:
                    mark(args[i], 0)
        for i, dim in _TOKEN_DIMS:
            mark(args[i], dim)
        return compiled(*args)

    return layer


class DecodeRunner:
    def __init__(
        self,
        model: CompactLM,
        n_slots: int,
        *,
        compile: bool = False,
        cuda_graph: bool = False,
        compile_mode: str | None = None,
        compile_scope: str = "auto",
        attention: str = "auto",
        overlap: bool = False,
        gemm: str = "auto",
        queue_ahead: bool = False,
    ) -> None:
        self.model = model
        device = model.rope_cos.device
        b = model.max_batch
        self.device = device
        self.n_slots = n_slots
        # The step's inputs: written as numpy on the host, sent in one copy (staging.py).
        fields = {"tokens": (torch.long, b), "positions": (torch.long, b)}
        if n_slots:
            fields["row_scales"] = (torch.float32, b * n_slots)
        if model.spare_rows:
            fields["slots"] = (torch.long, b)  # each decode row's cache row
        # Overlapped steps (see step_async): a row whose input is the previous step's own
        # greedy token takes it on the device; ``override`` marks the rows the host sets.
        self.overlap = overlap
        # With overlap: step_async returns at once (inputs sent from a snapshot of the staging
        # buffer) instead of once the previous step has finished, so the next step is queued
        # behind the running one and the GPU does not wait for the host between steps.
        self.queue_ahead = overlap and queue_ahead
        if overlap:
            fields["override"] = (torch.long, b)
        self.step_inputs = StagingBuffer(fields, device)
        self.tokens = self.step_inputs.device("tokens")
        self.positions = self.step_inputs.device("positions")
        self.host_tokens = self.step_inputs.host("tokens")
        self.host_positions = self.step_inputs.host("positions")
        self.host_override: np.ndarray | None = None
        if overlap:
            self.host_override = self.step_inputs.host("override")
            self.host_override[:] = 1
            # What the step ran on (host inputs or fed back) and its greedy output: the next
            # step's fed-back inputs. Read back into two pinned buffers, one per step in flight.
            self.step_tokens = torch.zeros(b, dtype=torch.long, device=device)
            self.step_positions = torch.zeros(b, dtype=torch.long, device=device)
            self.step_greedy = torch.zeros(b, dtype=torch.long, device=device)
            pin = device.type == "cuda"
            self._greedy_host = [torch.zeros(b, dtype=torch.long, pin_memory=pin) for _ in "ab"]
            self._launches = 0
        self.slots: torch.Tensor | None = None
        self.host_slots: np.ndarray | None = None
        if model.spare_rows:
            self.slots = self.step_inputs.device("slots")
            self.host_slots = self.step_inputs.host("slots")
            self.host_slots[:] = model.scratch_row  # free rows write to the scratch row
            self.step_inputs.upload()  # warm-up and capture runs read it too
        self.row_scales: torch.Tensor | None = None
        self.host_row_scales: np.ndarray | None = None
        if n_slots:
            self.row_scales = self.step_inputs.device("row_scales").view(b, n_slots)
            self.host_row_scales = self.step_inputs.host("row_scales").reshape(b, n_slots)
        # "auto" settings -> the step this device runs best (decode_path.py: the whole-step
        # PDL combination on Hopper+ with compile and graphs, the earlier choices elsewhere).
        splits = pick_splits(model.max_seq, model.max_batch, model.shape.n_kv_heads)
        traits = DeviceTraits.of(device)
        self.decode_path = resolve_decode_path(
            compile_scope,
            attention,
            gemm,
            traits=traits,
            compile=compile,
            cuda_graph=cuda_graph,
            compile_mode=compile_mode,
            max_seq=model.max_seq,
            attention_splits=splits,
        )
        compile_scope = self.decode_path.compile_scope
        attention = self.decode_path.attention
        gemm = self.decode_path.gemm
        # The Triton kernels need a GPU (Triton's interpreter is for tests only).
        use_kernel = attention in ("triton", "triton_rope")
        if use_kernel and not (device.type == "cuda" and triton_available()):
            raise DlpError(
                f"decode_attention {attention!r} needs a CUDA device and triton installed"
            )
        model.attn_splits = splits if use_kernel else 0
        # triton_rope: the kernel also applies the rotary embedding and writes the KV cache.
        model.attn_rope = attention == "triton_rope"
        if gemm.startswith("triton") and not (device.type == "cuda" and triton_available()):
            raise DlpError(f"decode_gemm {gemm!r} needs a CUDA device and triton installed")
        model.decode_gemm = gemm.startswith("triton")
        # triton_pdl: every kernel of the step a programmatic dependent launch (Hopper+): ours
        # through their ops, Inductor's through its own option (compiled steps only).
        model.decode_pdl = gemm == "triton_pdl"
        # ... with the norms inside the GEMMs (no norm kernels: model.decode_fuse_norms).
        model.decode_fuse_norms = model.decode_pdl
        # ... and gate/up reading o's rows prescaled by the norm weight (PRESCALE_NORM).
        model.decode_prescale_norm = model.decode_fuse_norms and PRESCALE_NORM
        model.pack_decode_weights(PACKED_WEIGHTS if model.decode_pdl else ())
        if model.decode_pdl and compile_mode is not None:
            raise DlpError("decode_gemm 'triton_pdl' takes the default compile_mode")
        if model.decode_pdl and traits.capability_major < PDL_MIN_CAPABILITY:
            raise DlpError("decode_gemm 'triton_pdl' needs a Hopper or later GPU (sm_90+)")
        if model.decode_pdl and not (model.attn_rope and model.attn_splits == 1):
            # A plain kernel between PDL ones costs more than PDL gains (pdl_bench.py).
            log.warning(
                "decode_gemm 'triton_pdl' without decode_attention 'triton_rope' (unsplit): "
                "the attention kernels are plain launches between PDL ones, measured slower"
            )
        compile_options = {"options": {"triton.enable_pdl": True}} if model.decode_pdl else {}
        self.layer_fn = decode_layer
        self.prefill_fn = prefill_layer
        self.compiled_step: Callable[[int, bool], tuple[torch.Tensor, torch.Tensor]] | None = None
        if compile:
            allow_engine_recompiles()
            # Our ops' fallbacks registered before Inductor meets them deep in the step
            # (inductor_ops.py: torch 2.11 would print their arguments' IR, exponentially).
            register_inductor_fallbacks()
            if compile_scope == "step":
                # The whole step (28 blocks, embedding, head, argmax) as one graph: Inductor
                # can then fuse across blocks (residual add + next norm), at a longer compile.
                self.compiled_step = torch.compile(
                    self._eager_step,
                    fullgraph=True,
                    dynamic=False,
                    mode=compile_mode,
                    **compile_options,
                )
            else:
                # One compiled block serves all layers (same shapes, weights are arguments).
                self.layer_fn = torch.compile(
                    decode_layer,
                    fullgraph=True,
                    dynamic=False,
                    mode=compile_mode,
                    **compile_options,
                )
            self.prefill_fn = compiled_prefill_layer()
        self.use_graph = cuda_graph and device.type == "cuda"
        # Two graphs: with the LoRA delta of every slot, and without it for steps in which no
        # row uses an adapter (then the base model runs at full speed).
        self.graphs: dict[bool, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.compile_failed = False
        self.graph_tokens = PREFILL_GRAPH_TOKENS if self.use_graph else 0
        self._prefill_graphs: dict[tuple[int, int, bool], _PrefillGraph] = {}
        self._prefill_pool = None
        # Prefill graphs read their inputs from one staging buffer and leave the logits and
        # greedy tokens of their rows here (allocated with the graphs).
        self.prefill_inputs: StagingBuffer | None = None
        self._prefill_logits = torch.empty(0)
        self._prefill_greedy = torch.empty(0, dtype=torch.long)

    @property
    def captured(self) -> bool:
        return bool(self.graphs)

    @property
    def prefill_compiled(self) -> bool:
        return self.prefill_fn is not prefill_layer

    def prefill_len(self, longest: int) -> int:
        """Padded prompt length of a prefill: a multiple of 16 when compiled (fewer distinct
        shapes), below max_seq (a full-cache slice would be one more specialisation)."""
        if not self.prefill_compiled:
            return longest
        padded = _round_up(longest, PREFILL_PAD)
        return padded if padded < self.model.max_seq else longest

    def upload_step_inputs(self) -> None:
        """Send ``host_tokens`` / ``host_positions`` / ``host_row_scales`` to the step's
        buffers (one copy; the next :meth:`step` reads them)."""
        self.step_inputs.upload()

    def _prefill_graph(self, n: int, t: int, lora: bool) -> _PrefillGraph | None:
        rows, tokens = self._row_bucket(n), self._token_bucket(t)
        if rows * tokens > self.graph_tokens:
            return None
        return self._prefill_graphs.get((rows, tokens, lora))

    @torch.no_grad()
    def prefill(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        rows: torch.Tensor,
        row_scales: torch.Tensor | None,
    ) -> torch.Tensor:
        """Logits [n, vocab] (float32) at each prompt's last token from device tensors; fills
        the cache rows. From a graph, the logits are a view the next prefill overwrites."""
        n, t = tokens.shape
        graph = self._prefill_graph(n, t, row_scales is not None)
        if graph is None:
            return self.model.prefill(tokens, lengths, rows, row_scales, layer_fn=self.prefill_fn)
        graph.load(tokens, lengths, rows, row_scales)
        graph.graph.replay()
        return self._prefill_logits[:n]

    @torch.no_grad()
    def prefill_host(
        self,
        prompts: Sequence[Sequence[int]],
        rows: Sequence[int],
        row_scales: np.ndarray | None,
    ) -> tuple[torch.Tensor, list[int]]:
        """The engine's prefill from host lists: (logits [n, vocab] float32 on the device,
        greedy first tokens). A graph bucket takes one staging copy, one replay and one read
        back; a larger prefill (compute-bound) builds its tensors directly."""
        n, longest = len(prompts), max(len(p) for p in prompts)
        graph = self._prefill_graph(n, longest, row_scales is not None)
        if graph is not None:
            assert self.prefill_inputs is not None
            graph.load_host(self.prefill_inputs, prompts, rows, row_scales)
            graph.graph.replay()
            return self._prefill_logits[:n], self._prefill_greedy[:n].tolist()
        tokens = torch.empty(n, self.prefill_len(longest), dtype=torch.long)
        _fill_prompts(tokens.numpy(), prompts)
        lengths = torch.tensor([len(p) for p in prompts])
        dev = self.device
        scales = None if row_scales is None else torch.from_numpy(row_scales).to(dev)
        logits = self.model.prefill(
            tokens.to(dev),
            lengths.to(dev),
            torch.tensor(list(rows)).to(dev),
            scales,
            layer_fn=self.prefill_fn,
        )
        return logits, logits.argmax(dim=-1).tolist()

    def _row_bucket(self, n: int) -> int:
        # Fine steps where admissions are small: a server admits ~8-16 rows at a time once
        # its rows finish out of step (H200 serving run: 192 prefills of 10.7 rows each),
        # and a 10-row prefill padded to 16 rows costs 60% more compute than it needs.
        if n <= 4:
            bucket = _pow2(n)
        elif n <= 16:
            bucket = _round_up(n, 2)
        elif n <= 32:
            bucket = _round_up(n, 4)
        else:
            bucket = _round_up(n, 8)
        return min(bucket, self.model.max_batch)

    def _token_bucket(self, t: int) -> int:
        bucket = _round_up(t, PREFILL_PAD) if t <= 256 else _pow2(t)
        return min(bucket, self.model.max_seq)

    def _capture_prefill(self, rows: int, tokens: int, lora: bool) -> _PrefillGraph:
        graph = _PrefillGraph(self, rows, tokens, lora)

        def run() -> None:
            hidden = self.model.prefill_hidden(
                graph.tokens, graph.lengths, graph.rows, graph.scales, layer_fn=self.prefill_fn
            )
            # The head too: the graph's temporaries go back to the shared pool, only these
            # two shared buffers outlive it.
            logits = self.model.prefill_head(hidden)
            self._prefill_logits[:rows].copy_(logits)
            self._prefill_greedy[:rows].copy_(logits.argmax(dim=-1))

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()  # compiles this shape if needed, outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(
            graph.graph, pool=self._prefill_pool, capture_error_mode="thread_local"
        ):
            run()
        self._prefill_pool = graph.graph.pool()
        self._prefill_graphs[(rows, tokens, lora)] = graph
        return graph

    def capture_prefill_graphs(self) -> None:
        """Capture every prefill bucket of up to ``graph_tokens`` tokens (below max_seq)."""
        lora = self.row_scales is not None and bool(self.model.lora)
        b = self.model.max_batch
        fields = {
            "tokens": (torch.long, self.graph_tokens),
            "lengths": (torch.long, b),
            "rows": (torch.long, b),
        }
        if lora:
            fields["scales"] = (torch.float32, b * self.n_slots)
        self.prefill_inputs = StagingBuffer(fields, self.device)
        self._prefill_logits = torch.zeros(b, self.model.shape.vocab, device=self.device)
        self._prefill_greedy = torch.zeros(b, dtype=torch.long, device=self.device)
        buckets = [
            (rows, tokens)
            for rows in {self._row_bucket(n) for n in range(1, self.model.max_batch + 1)}
            for tokens in {self._token_bucket(t) for t in range(1, self.model.max_seq + 1)}
            if rows * tokens <= self.graph_tokens
            and tokens < self.model.max_seq  # a full-cache slice would be one more compile
        ]
        for rows, tokens in sorted(set(buckets), key=lambda b: -b[0] * b[1]):
            self._capture_prefill(rows, tokens, lora)
        torch.cuda.synchronize()
        log.info("captured %d prefill graphs", len(self._prefill_graphs))

    @torch.no_grad()
    def warm_prefill(self) -> None:
        """Compile the prefill graphs (one row, several rows) before serving: a compile in
        the middle of traffic would stall every running request for seconds. Writes garbage
        into rows 0-1 of the cache, which are prefilled again before use."""
        if not self.prefill_compiled:
            return
        scales = None
        if self.row_scales is not None and self.model.lora:
            scales = torch.zeros(2, self.row_scales.shape[1], device=self.device)
        rows = min(2, self.model.max_batch)
        length = min(2 * PREFILL_PAD, self.model.max_seq - 1)
        try:
            for n, t in ((1, PREFILL_PAD), (rows, length)):
                tokens = torch.zeros(n, t, dtype=torch.long, device=self.device)
                lengths = torch.full((n,), t, device=self.device)
                index = torch.arange(n, device=self.device)
                self.prefill(tokens, lengths, index, None if scales is None else scales[:n])
        except Exception:
            log.exception("compiled prefill failed; using the eager one")
            self.prefill_fn = prefill_layer

    def _step(self, rows: int, lora: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.compiled_step is not None:
            return self.compiled_step(rows, lora)
        return self._eager_step(rows, lora)

    def _eager_step(self, rows: int, lora: bool) -> tuple[torch.Tensor, torch.Tensor]:
        scales = None
        if lora and self.row_scales is not None:
            scales = self.row_scales[:rows]
        tokens, positions = self.tokens[:rows], self.positions[:rows]
        if self.overlap:
            # Rows the host did not set continue from the previous step: its greedy token, at
            # the next position. Part of the captured graph, so no host work per row.
            host = self.step_inputs.device("override")[:rows].bool()
            self.step_tokens[:rows].copy_(torch.where(host, tokens, self.step_greedy[:rows]))
            fed = self.step_positions[:rows] + 1
            self.step_positions[:rows].copy_(torch.where(host, positions, fed))
            tokens, positions = self.step_tokens[:rows], self.step_positions[:rows]
        slots = self.slots[:rows] if self.slots is not None else None
        logits = self.model.decode(tokens, positions, scales, layer_fn=self.layer_fn, slots=slots)
        # triton_pdl: the argmax as two PDL kernels over pieces of the vocabulary (Inductor's
        # own runs one program a row); elsewhere torch's.
        pdl = self.model.decode_pdl
        greedy = greedy_tokens(logits, pdl=True) if pdl else logits.argmax(dim=-1)
        if self.overlap:
            self.step_greedy[:rows].copy_(greedy)
        return logits, greedy

    @torch.no_grad()
    def capture(self) -> None:
        """Warm up (compiles) and capture the full-batch step, compile the prefill. Rows'
        cache contents written during warm-up are garbage; every row is prefilled before use."""
        self.warm_prefill()
        if not self.use_graph:
            return
        try:
            self._capture()
        except Exception:
            if self.layer_fn is decode_layer and self.compiled_step is None:
                raise
            # A compiler failure must not take the engine down: graphs of the eager layer
            # are slower but still correct.
            log.exception("compiled decode step failed; capturing the eager one instead")
            self.compile_failed = True
            self.graphs.clear()
            self.layer_fn = decode_layer
            self.compiled_step = None
            self.model.attn_splits = 0
            self.model.decode_gemm = False
            self.model.decode_pdl = False
            self.model.decode_fuse_norms = False
            self.model.decode_prescale_norm = False
            self.model.pack_decode_weights(())
            self._capture()
        if self.graph_tokens:
            try:
                self.capture_prefill_graphs()
            except Exception:  # slower without, still correct
                log.exception("prefill graph capture failed; prefills run directly")
                self._prefill_graphs.clear()
                self.graph_tokens = 0

    def _capture(self) -> None:
        rows = self.model.max_batch
        variants = [False] + ([True] if self.row_scales is not None and self.model.lora else [])
        pool = None
        for lora in variants:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self._step(rows, lora)
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits, greedy = self._step(rows, lora)
            pool = graph.pool()  # the two graphs never run at once: share their memory
            torch.cuda.synchronize()
            self.graphs[lora] = (graph, logits, greedy)
            log.info("captured decode graph for %d rows (lora=%s)", rows, lora)

    @torch.no_grad()
    def step_async(self, rows: int, lora: bool) -> tuple[int, torch.cuda.Event | None]:
        """Send the staged inputs, queue one step and the copy of its greedy tokens to the
        host, without waiting for them (overlap mode, greedy rows only). Returns a handle for
        :meth:`collect`. Returns once the staged inputs have reached the device (that is,
        once the previous step has finished on the GPU), or with ``queue_ahead`` at once
        (they go from a snapshot): the host buffers may then be rewritten while this step
        runs. Two steps are in flight at most: the caller collects step N before it queues
        step N + 2, whose greedy tokens reuse step N's read-back buffer."""
        assert self.overlap, "step_async needs DecodeRunner(overlap=True)"
        on_cuda = self.device.type == "cuda"
        self.step_inputs.upload(snapshot=self.queue_ahead)
        uploaded = torch.cuda.Event() if on_cuda and not self.queue_ahead else None
        if uploaded is not None:
            uploaded.record()
        _, greedy = self.step(rows, lora)
        slot = self._launches % 2
        self._launches += 1
        self._greedy_host[slot][: greedy.shape[0]].copy_(greedy, non_blocking=on_cuda)
        done = None
        if on_cuda:
            done = torch.cuda.Event()
            done.record()
        if uploaded is not None:
            uploaded.synchronize()
        return slot, done

    def collect(self, handle: tuple[int, torch.cuda.Event | None]) -> list[int]:
        """The greedy tokens of a step queued by :meth:`step_async` (waits for it)."""
        slot, done = handle
        if done is not None:
            done.synchronize()
        return self._greedy_host[slot].tolist()

    @torch.no_grad()
    def step(self, rows: int, lora: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one token for rows [0, rows); inputs must already be in the buffers.
        ``lora=False`` skips the adapter path (no row uses one). Returns (logits [rows', V],
        greedy [rows']) with rows' >= rows (a captured graph always runs every row)."""
        lora = lora and self.row_scales is not None and bool(self.model.lora)
        captured = self.graphs.get(lora)
        if captured is not None:
            graph, logits, greedy = captured
            graph.replay()
            return logits, greedy
        return self._step(rows, lora)
