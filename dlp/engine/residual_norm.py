"""The decode step's residual add and RMSNorm between two layers, as one kernel of ours.

In the PDL decode step a layer ends with the down GEMM's split-K pieces, and the next layer
starts with ``x = residual + sum(pieces)`` and ``h = rms_norm(x)``. Inductor fuses those
into one looped reduction kernel of 32 programs (two rows each) that reads each row twice
(once for the sum of squares, once to normalise): 2.2-2.4 us a layer on the H200 at batch 64
(``benchmarks/results/decode_step_h200_packed.json``), on the step's critical path between
two PDL GEMMs. Here one kernel does it in one pass, ``rows x SPLIT_N`` programs: a program
reads its row's pieces and residual once (the whole row, for the sum of squares) and writes
its ``1 / SPLIT_N`` of the columns of ``x`` and ``h``.

The roundings are the eager path's (``CompactLM``'s ``x + linear(...)`` then ``rms_norm``):
the pieces summed in fp32 in piece order and rounded to the model dtype, added to the
residual and rounded, the sum of squares and rstd in fp32, ``x * rstd`` rounded, times the
norm's weight and rounded. :func:`residual_rms_norm_reference` is the same in plain torch
(CPU path, tests).
"""

from __future__ import annotations

import torch

from dlp.engine.triton_support import INTERPRET, tl, triton

# Programs a row: each reads the whole row (the sum of squares needs it) and writes its
# share of the columns; 0: the PDL step leaves the add + norm to Inductor (its own fused
# kernel). decode_step_bench.py's ``+norm=N`` and ``dlp bench fusion --residual-norm N`` set
# it per run. On the H200 (Qwen2-1.5B step (a), benchmarks/results/decode_step_h200_norm.json)
# 1 took 1.8 us a layer against Inductor's 2.2-2.4: step 1.623 ms against 1.634 interleaved
# (1.593 / 1.595 first-timed); 2 programs a row 1.655. In the fusion benchmark's engine
# (results/fusion_h200_qwen2_norm1.json) step (a) 1.584 ms, the default-0 run of the same
# session 1.631 (fusion_h200_run17.json, another machine start). Its first end-to-end runs
# never finished compiling: Inductor's implicit-fallback message for our ops (inductor_ops.py).
SPLIT_N = 1


def residual_rms_norm_reference(
    pieces: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """pieces ``[P, M, N]`` (their sum is the product), residual ``[M, N]``, weight ``[N]``
    -> (x ``[M, N]``, rms_norm(x) ``[M, N]``), both in the residual's dtype."""
    dtype = residual.dtype
    total = pieces[0].float()
    for p in range(1, pieces.shape[0]):
        total = total + pieces[p].float()
    x = (residual.float() + total.to(dtype).float()).to(dtype)
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    return x, (weight.float() * normed.float()).to(dtype)


def supported(pieces: torch.Tensor, residual: torch.Tensor) -> bool:
    """True where the kernel runs: triton, CUDA (or interpreted) contiguous tensors."""
    return (
        triton is not None
        and pieces.dim() == 3
        and pieces.shape[1:] == residual.shape
        and pieces.is_contiguous()
        and residual.is_contiguous()
        and (pieces.is_cuda or INTERPRET)
    )


def residual_rms_norm(
    pieces: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, rms_norm(x) * weight)`` with ``x = residual + sum(pieces)`` (see the module
    docstring); the reference where the kernel does not apply. ``pdl``: a programmatic
    dependent launch, through the ``dlp::residual_norm_pdl`` op."""
    if not supported(pieces, residual):
        return residual_rms_norm_reference(pieces, residual, weight, eps)
    split_n = max(1, SPLIT_N)
    if pdl:
        return torch.ops.dlp.residual_norm_pdl(pieces, residual, weight, eps, split_n)
    return _launch(pieces, residual, weight, eps, False, split_n)


def _launch(
    pieces: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    pdl: bool,
    split_n: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    n_pieces, m, n = pieces.shape
    x = torch.empty_like(residual)
    h = torch.empty_like(residual)
    pdl = pdl and not INTERPRET  # the CPU interpreter has no griddepcontrol (inline asm)
    block = triton.next_power_of_2(n)
    _residual_norm_kernel[(m, split_n)](
        pieces, residual, weight, x, h, n, m * n, eps,
        PIECES=n_pieces, BLOCK=block, SPLIT_N=split_n, USE_GDC=pdl,
        num_warps=4 if block <= 2048 else 8,
        **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip
    return x, h


@torch.library.custom_op("dlp::residual_norm_pdl", mutates_args=())
def _residual_norm_pdl(
    pieces: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, split_n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(pieces, residual, weight, eps, True, split_n)


@_residual_norm_pdl.register_fake
def _residual_norm_pdl_fake(
    pieces: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, split_n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(residual), torch.empty_like(residual)


if triton is not None:

    @triton.jit
    def _residual_norm_kernel(
        Pieces, Residual, Weight, X, H, N, PIECE_STRIDE, eps,
        PIECES: tl.constexpr,
        BLOCK: tl.constexpr,
        SPLIT_N: tl.constexpr,
        USE_GDC: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        part = tl.program_id(1)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        at = row * N + cols
        dt = Residual.dtype.element_ty
        w = tl.load(Weight + cols, mask=ok, other=0.0).to(tl.float32)  # not the step's data
        if USE_GDC:  # the pieces come from the kernel before (the down GEMM)
            tl.extra.cuda.gdc_wait()
        total = tl.load(Pieces + at, mask=ok, other=0.0).to(tl.float32)
        for p in tl.static_range(1, PIECES):
            total += tl.load(Pieces + p * PIECE_STRIDE + at, mask=ok, other=0.0).to(tl.float32)
        res = tl.load(Residual + at, mask=ok, other=0.0).to(tl.float32)
        if USE_GDC:
            tl.extra.cuda.gdc_launch_dependents()
        x = (res + total.to(dt).to(tl.float32)).to(dt)
        xf = x.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(xf * xf, 0) / N + eps)
        normed = (xf * rstd).to(dt).to(tl.float32)
        h = (w * normed).to(dt)
        # This program's share of the columns (all of them with SPLIT_N = 1).
        share = tl.cdiv(N, SPLIT_N)
        mine = ok & (cols >= part * share) & (cols < (part + 1) * share)
        tl.store(X + at, x, mask=mine)
        tl.store(H + at, h, mask=mine)
