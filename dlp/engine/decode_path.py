"""Which decode step the engine runs when its settings say ``"auto"``.

Three settings shape the decode step: ``compile_scope`` (one compiled block for every layer,
or the whole step as one graph), ``decode_attention`` (two GEMMs over the static cache, the
length-aware Triton kernel, or that kernel with the rotary embedding and the cache write
inside) and ``decode_gemm`` (cuBLAS, the weight-streaming Triton GEMMs, or those with every
kernel of the step a programmatic dependent launch). They pay off together: on the H200 the
Qwen2-1.5B base step at batch 64 is 1.59-1.65 ms with all three fast choices against 1.95 ms
with cuBLAS and 2.1 ms with the old defaults, and the fusion benchmark's engine gave 26,380
against 21,366 tokens/s (``benchmarks/README.md``, session 14). So ``"auto"`` takes that
combination wherever it was built and tested to run: a CUDA GPU of compute capability 9 or
later (PDL), triton installed, the step compiled (default compile mode) and captured as a CUDA
graph, and the attention unsplit (one program per row and kv head: a split adds a plain merge
kernel between the PDL launches, which ``benchmarks/pdl_bench.py`` measured slower than no
PDL). Anywhere else ``"auto"`` keeps the earlier choices: cuBLAS, one compiled block per
layer, the Triton attention for caches over ``AUTO_KERNEL_MIN_SEQ`` positions on CUDA.

Explicit settings are kept as given; only ``"auto"`` is resolved. The resolution is a pure
function of :class:`DeviceTraits` so the CPU tests cover every branch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from dlp.engine.triton_support import triton_available

__all__ = [
    "AUTO_KERNEL_MIN_SEQ",
    "PDL_MIN_CAPABILITY",
    "DecodePath",
    "DeviceTraits",
    "resolve_decode_path",
]

# "auto" attention outside the fast path: the Triton kernel for caches longer than this. At
# 256 positions the two GEMMs over the whole cache were as fast (H200, Qwen2-1.5B, batch 64:
# 2.10 vs 2.13 ms a step); at a serving context of 2048 they read ~10x the valid keys.
AUTO_KERNEL_MIN_SEQ = 512
# decode_gemm "auto" outside the fast path: the weight-streaming Triton GEMMs (skinny_gemm)
# without PDL. Off: 5% faster steps per layer scope, but never run through the serving path.
AUTO_SKINNY_GEMM = False
PDL_MIN_CAPABILITY = 9  # programmatic dependent launch: Hopper (sm_90) or later


@dataclass(frozen=True)
class DeviceTraits:
    """What the resolution needs to know about the device the step runs on."""

    cuda: bool
    triton: bool
    capability_major: int = 0  # CUDA compute capability (0 off CUDA)

    @classmethod
    def of(cls, device: torch.device) -> DeviceTraits:
        if device.type != "cuda":
            return cls(cuda=False, triton=triton_available())
        major, _ = torch.cuda.get_device_capability(device)
        return cls(cuda=True, triton=triton_available(), capability_major=major)


@dataclass(frozen=True)
class DecodePath:
    """The resolved settings (none of them ``"auto"``)."""

    compile_scope: str  # "layer" | "step"
    attention: str  # "matmul" | "triton" | "triton_rope"
    gemm: str  # "cublas" | "triton" | "triton_pdl"

    @property
    def fast(self) -> bool:
        """The whole-step PDL combination the H200 numbers were measured with."""
        chosen = (self.compile_scope, self.attention, self.gemm)
        return chosen == ("step", "triton_rope", "triton_pdl")

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def resolve_decode_path(
    compile_scope: str,
    attention: str,
    gemm: str,
    *,
    traits: DeviceTraits,
    compile: bool,
    cuda_graph: bool,
    compile_mode: str | None,
    max_seq: int,
    attention_splits: int,
) -> DecodePath:
    """The settings with every ``"auto"`` replaced (see the module doc for the rules).

    ``attention_splits``: the split count the Triton attention would run with at this cache
    size and batch (``decode_attention.pick_splits``)."""
    kernels = traits.cuda and traits.triton
    pdl_ok = (
        kernels
        and traits.capability_major >= PDL_MIN_CAPABILITY
        and compile
        and cuda_graph
        and compile_mode is None
        and attention_splits == 1
    )
    if gemm == "auto":
        if pdl_ok and attention in ("auto", "triton_rope") and compile_scope in ("auto", "step"):
            gemm = "triton_pdl"
        else:
            gemm = "triton" if kernels and AUTO_SKINNY_GEMM else "cublas"
    if attention == "auto":
        if gemm == "triton_pdl" and kernels:
            attention = "triton_rope"
        elif kernels and max_seq > AUTO_KERNEL_MIN_SEQ:
            attention = "triton"
        else:
            attention = "matmul"
    if compile_scope == "auto":
        compile_scope = "step" if gemm == "triton_pdl" and attention == "triton_rope" else "layer"
    return DecodePath(compile_scope=compile_scope, attention=attention, gemm=gemm)
