"""EngineConfig: everything needed to build an Engine (plain dataclass: no pydantic inside
dlp/engine, so the engine imports on machines without it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dlp.errors import DlpError

DTYPES = ("float32", "bfloat16", "float16")
COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs")
COMPILE_SCOPES = ("auto", "layer", "step")
DECODE_ATTENTIONS = ("auto", "matmul", "triton", "triton_rope")
DECODE_GEMMS = ("auto", "cublas", "triton", "triton_pdl")


@dataclass
class EngineConfig:
    """How the engine is built.

    Base model: ``model_path`` (a transformers checkpoint dir); or ``model_config`` (a config
    dict such as ``{"model_type": "qwen2", ...}``: random weights, for benchmarks); or neither,
    which means the embedded default (SmolLM2-135M-Instruct from the dlp cache).
    """

    model_path: str | None = None
    model_config: dict[str, Any] | None = None
    tokenizer_path: str | None = None  # default: model_path; None with model_config = no text
    dtype: str = "float32"
    device: str = "cpu"
    max_batch: int = 16  # rows of the KV cache = concurrently decoding requests
    max_seq_len: int = 1024  # prompt + generated tokens per row
    # Adapter pool
    pool_slots: int = 32
    max_rank: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    adapter_root: str | None = None  # every adapter dir directly under it is registered
    host_budget_bytes: int = 2 << 30
    # Speed
    compile: bool | None = None  # torch.compile the decode layer (default: on CUDA)
    # torch.compile mode of the decode layer: None (default) or "max-autotune-no-cudagraphs"
    # (Triton GEMM templates with fused epilogues, minutes of autotuning at start). The step
    # is captured as a CUDA graph by the engine itself either way.
    compile_mode: str | None = None
    # "layer": one compiled block serves every layer (fast to compile); "step": the whole
    # decode step is one compiled graph (fusions across blocks, ~1 minute more to compile);
    # "auto": "step" where the fast decode path runs (below), else "layer".
    compile_scope: str = "auto"
    # Decode attention: "triton" (length-aware kernel: reads each row's valid prefix only),
    # "triton_rope" (the same kernel, also applying the rotary embedding and writing the KV
    # cache), "matmul" (two GEMMs over the whole static cache), "auto" (below).
    decode_attention: str = "auto"
    # Decode GEMMs: "triton" (weight-streaming kernels of skinny_gemm, silu * up fused into
    # gate/up), "triton_pdl" (the same, and every kernel of the step a programmatic dependent
    # launch: Hopper or later), "cublas" (F.linear), "auto" (below).
    # The three "auto"s resolve together (dlp/engine/decode_path.py): on a Hopper-or-later GPU
    # with triton, the step compiled and graphed and the attention unsplit, the fast path
    # step + triton_rope + triton_pdl (H200, Qwen2-1.5B, batch 64: 1.59-1.65 ms a base step
    # against 2.1 ms); elsewhere layer scope, cuBLAS, and the Triton attention on CUDA for
    # caches over 512 positions.
    decode_gemm: str = "auto"
    cuda_graph: bool | None = None  # capture the decode step (default: on CUDA)
    # Queue decode step N+1 before handling step N's tokens (greedy rows feed their own token
    # on the device), so the host's per-token work runs while the GPU decodes. Steps with a
    # sampling or sentence-routed row run synchronously. None: on CUDA (measured on the H200:
    # +12% tokens/s through HTTP, +14% engine alone); on the CPU the forward itself is the
    # host's work, so there is nothing to overlap.
    overlap_steps: bool | None = None
    # With overlap_steps: queue step N+1 without waiting for step N to finish (inputs go from
    # a snapshot of the staging buffer), so the GPU never waits for the host to wake up and
    # launch. Token-identical on the H200 (test_engine_cuda), but no clear gain through HTTP
    # there: 0.925, 0.873 and 0.822 of the engine alone's tokens/s in three runs, against
    # 0.862 and 0.866 without it (the runs vary by +-5%). Off.
    overlap_queue_ahead: bool = False
    max_prefill_tokens: int = 8192  # padded tokens per prefill forward
    # KV cache rows beyond max_batch: waiting requests are prefilled into them in groups
    # before decode rows free, and a freed row takes the next one at once (decode rows read
    # their cache row through a slot table; one more row is scratch). 0: off: the engine's
    # tokens are right on the H200, but through HTTP there it gave no gain (groups stayed at
    # the wait limit's size; a rule for bigger groups lost 12% of throughput).
    spare_rows: int = 0
    # Admission while other rows decode (see Engine._admission_due): gather waiting requests
    # until this many can be prefilled together (None: max_batch // 8, at least 1) or the
    # oldest has waited this many decode steps. 1 / 0 admits at once (every free row).
    admit_min_rows: int | None = None
    admit_max_wait_steps: int = 16
    step_in_thread: bool = True  # run forwards in a worker thread: the event loop stays free
    seed: int = 0  # random weights (model_config)
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.model_path is not None and self.model_config is not None:
            raise DlpError("engine config: give model_path or model_config, not both")
        if self.dtype not in DTYPES:
            raise DlpError(f"engine config: dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("max_batch", "max_seq_len", "pool_slots", "max_rank", "max_prefill_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DlpError(f"engine config: {name} must be a positive integer, got {value!r}")
        for name in ("spare_rows", "admit_max_wait_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise DlpError(f"engine config: {name} must be an integer >= 0, got {value!r}")
        if self.admit_min_rows is not None and (
            isinstance(self.admit_min_rows, bool)
            or not isinstance(self.admit_min_rows, int)
            or self.admit_min_rows < 1
        ):
            raise DlpError(
                f"engine config: admit_min_rows must be a positive integer or None,"
                f" got {self.admit_min_rows!r}"
            )
        choices = {
            "compile_mode": COMPILE_MODES,
            "compile_scope": COMPILE_SCOPES,
            "decode_attention": DECODE_ATTENTIONS,
            "decode_gemm": DECODE_GEMMS,
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise DlpError(f"engine config: {name} must be one of {allowed}, got {value!r}")
        for name in ("decode_attention", "decode_gemm"):  # Triton kernels: GPU code
            value = getattr(self, name)
            if value.startswith("triton") and not self.on_cuda:
                raise DlpError(f"engine config: {name} {value!r} needs a cuda device")
        if not self.device.startswith(("cpu", "cuda")):
            raise DlpError(f"engine config: device must be cpu or cuda[:N], got {self.device!r}")

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def admit_rows(self) -> int:
        """Rows worth one prefill forward while others decode."""
        if self.admit_min_rows is not None:
            return self.admit_min_rows
        return max(1, self.max_batch // 8)

    @property
    def use_compile(self) -> bool:
        return self.on_cuda if self.compile is None else self.compile

    @property
    def use_overlap(self) -> bool:
        return self.on_cuda if self.overlap_steps is None else self.overlap_steps

    @property
    def use_queue_ahead(self) -> bool:
        return self.use_overlap and self.overlap_queue_ahead

    @property
    def use_cuda_graph(self) -> bool:
        return self.on_cuda if self.cuda_graph is None else (self.cuda_graph and self.on_cuda)
