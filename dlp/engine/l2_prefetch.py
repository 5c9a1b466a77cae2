"""L2 prefetch of later kernels' weights (and of the KV cache) by latency-bound kernels of
the PDL decode step.

At batch 64 the decode step alternates between kernels that stream at near the memory's
bandwidth (gate/up, down, the lm_head) and kernels that are latency-bound and leave HBM
mostly idle: the attention (12.6 MB of KV in ~9 us at the Qwen2-1.5B shape, ~1.4 TB/s),
the q/k/v and o GEMMs (5-6 MB in ~4.5 us), the norm kernel. The weights of the step are
read-only and the KV cache of earlier positions is not written during the step, so a
kernel may ask the L2 for bytes a *later* kernel will read: a few
``cp.async.bulk.prefetch.L2`` requests per program, no registers or shared memory held, no
result waited for. The later kernel then finds them in the 50 MB L2 instead of HBM.

Which kernel prefetches what is a :class:`~dlp.engine.prefetch_plan.PrefetchPlan`
(``CompactLM.decode_prefetch``, ``engine.decode_prefetch``); kernels take up to
:data:`MAX_REGIONS` byte ranges of tensors (:class:`Region`) and split them evenly over
their programs, whose first thread sends its share. Only PDL launches prefetch (their kernels
are custom ops that Inductor does not analyse; the inline asm would defeat its analysis of
a user kernel's stores), and never under Triton's CPU interpreter, which has no inline asm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlp.engine.triton_support import INTERPRET, tl, triton

MAX_REGIONS = 3  # w_o + a prefix of the gate rows + one of the up rows, in the attention
BULK_ALIGN = 16  # cp.async.bulk: 16-byte aligned addresses, sizes a multiple of 16
CHUNK_BYTES = 32 * 1024  # bytes per bulk prefetch request


@dataclass(frozen=True)
class Region:
    """Bytes ``[lo, hi)`` of a contiguous tensor's storage, from its first element."""

    tensor: torch.Tensor
    lo: int
    hi: int


def whole(t: torch.Tensor) -> Region:
    return Region(t, 0, t.numel() * t.element_size())


def gate_up_prefix(w_gu: torch.Tensor, inter: int, skip: int, nbytes: int) -> list[Region]:
    """Of a merged gate/up weight ``[2 * inter, K]``: ``nbytes`` of the gate rows and as many of
    the up rows, after the first ``skip`` bytes of each (the first output tiles' rows: the
    ones gate/up's first programs stream)."""
    half = inter * w_gu.shape[1] * w_gu.element_size()
    lo = min(skip, half)
    hi = min(skip + nbytes, half)
    return [Region(w_gu, lo, hi), Region(w_gu, half + lo, half + hi)]


def enabled(pdl: bool) -> bool:
    """Prefetches go with PDL launches on a real GPU only (see the module docstring)."""
    return pdl and not INTERPRET and triton is not None


def kernel_args(regions: tuple[Region, ...] | list[Region], fallback: torch.Tensor) -> tuple:
    """The kernel arguments for up to :data:`MAX_REGIONS` regions: per region a byte pointer,
    lo and hi (ranges aligned to :data:`BULK_ALIGN`); unused slots point at ``fallback``
    with an empty range. Returns ``(args, count)``."""
    if len(regions) > MAX_REGIONS:
        raise ValueError(f"at most {MAX_REGIONS} prefetch regions, got {len(regions)}")
    args: list = []
    for r in regions:
        if not r.tensor.is_contiguous():
            raise ValueError("a prefetch region must be of a contiguous tensor")
        lo = r.lo // BULK_ALIGN * BULK_ALIGN
        hi = max(lo, r.hi // BULK_ALIGN * BULK_ALIGN)
        # A byte pointer: the kernel counts in bytes whatever the tensor's dtype.
        args += [r.tensor.reshape(-1).view(torch.uint8), lo, hi]
    # Unused slots: any pointer (never read); as it is, since a reshape of a strided view
    # (the attention's q) would copy it on every call.
    for _ in range(MAX_REGIONS - len(regions)):
        args += [fallback, 0, 0]
    return tuple(args), len(regions)


def op_args(regions: tuple[Region, ...] | list[Region]) -> tuple[list[torch.Tensor], list[int]]:
    """Regions as a custom op takes them: the tensors and their (lo, hi) pairs, flat."""
    return [r.tensor for r in regions], [b for r in regions for b in (r.lo, r.hi)]


def from_op_args(tensors: list[torch.Tensor], ranges: list[int]) -> list[Region]:
    if len(ranges) != 2 * len(tensors):
        raise ValueError("prefetch ranges must be (lo, hi) per tensor")
    return [Region(t, ranges[2 * i], ranges[2 * i + 1]) for i, t in enumerate(tensors)]


@dataclass(frozen=True)
class Prefetch:
    """What one GEMM launch prefetches: ``regions``, at the kernel's start (before it waits
    for the kernel before it) or, with ``at_end``, once its own loop is done; and whether
    its own weight loads are marked evict-first."""

    regions: tuple[Region, ...] = ()
    at_end: bool = False
    evict_first: bool = False


if triton is not None:

    @triton.jit
    def prefetch_share(base, lo, hi, pid, nprog, CHUNK: tl.constexpr):
        """This program's share of bytes ``[lo, hi)`` of ``base`` (a byte pointer) to L2: the
        range cut evenly over ``nprog`` programs, sent by the program's first thread as bulk
        prefetches of up to ``CHUNK`` bytes (a multiple of 16). Nothing is waited for.
        (One thread and few, large requests: the copy engine takes them in order, and many
        small ones per program were measured to slow the kernel that issues them.)"""
        per = tl.cdiv(tl.cdiv(hi - lo, nprog), 16) * 16
        start = lo + pid * per  # byte offsets of one tensor: < 2^31 for any weight here
        end = tl.minimum(start + per, hi)
        for at in range(start, end, CHUNK):
            size = tl.minimum(end - at, CHUNK).to(tl.int32)
            tl.inline_asm_elementwise(
                "{ .reg .pred p, first; .reg .u32 t; mov.u32 t, %tid.x; "
                "setp.eq.u32 first, t, 0; setp.gt.and.s32 p, $2, 0, first; "
                "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
                "=r,l,r",
                [base + at, size],
                dtype=tl.int32,
                is_pure=False,
                pack=1,
            )
