"""The decode step's greedy token per row (``logits.argmax(-1)``) as two Triton kernels.

At the end of a compiled decode step Inductor reduces each row's 151,936 logits (Qwen2) in
one program a row: 64 programs for a 132-SM GPU, 34 us of a 1.7 ms step on the H200 for
19 MB of logits (``benchmarks/results/decode_step_h200_pdl.json``). Here ``CHUNKS``
programs a row each find the max of one piece of the vocabulary (and its first index: each
lane keeps its best as it walks the piece, one reduction at the end), and a second kernel
picks each row's best piece. Ties resolve to the lowest index, as ``argmax``
does: the first max within a block, earlier blocks over later ones, earlier pieces over
later ones. (A NaN logit is not treated as the max, unlike ``argmax``.)

With ``pdl`` both are programmatic dependent launches, as in the engine's ``triton_pdl``
step, through the ``dlp::greedy_pdl`` op Inductor does not look into.
"""

from __future__ import annotations

import torch

from dlp.engine.triton_support import INTERPRET, tl, triton

CHUNKS = 64  # pieces a row: rows * CHUNKS programs (4096 at batch 64)
BLOCK = 1024  # logits per load


def supported(logits: torch.Tensor) -> bool:
    """True where the kernels run: triton, a CUDA (or interpreted) [rows, V] tensor."""
    return (
        triton is not None
        and logits.dim() == 2
        and logits.stride(1) == 1
        and (logits.is_cuda or INTERPRET)
        and logits.shape[1] >= CHUNKS
    )


def greedy_tokens(logits: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """``logits.argmax(-1)`` (int64 [rows]) for [rows, V]; ``argmax`` itself where the
    kernels do not apply."""
    if not supported(logits):
        return logits.argmax(dim=-1)
    if pdl:
        return torch.ops.dlp.greedy_pdl(logits)
    return _launch(logits, False)


def _launch(logits: torch.Tensor, pdl: bool) -> torch.Tensor:
    rows, vocab = logits.shape
    width = -(-vocab // CHUNKS)
    part_val = torch.empty((rows, CHUNKS), dtype=torch.float32, device=logits.device)
    part_idx = torch.empty((rows, CHUNKS), dtype=torch.int64, device=logits.device)
    out = torch.empty((rows,), dtype=torch.int64, device=logits.device)
    pdl = pdl and not INTERPRET  # the CPU interpreter has no griddepcontrol (inline asm)
    launch = {"launch_pdl": True} if pdl else {}
    _chunk_max_kernel[(rows, CHUNKS)](
        logits, part_val, part_idx, vocab, width, logits.stride(0),
        CHUNKS=CHUNKS, BLOCK=BLOCK, USE_GDC=pdl, **launch,
    )  # fmt: skip
    _best_chunk_kernel[(rows,)](part_val, part_idx, out, CHUNKS=CHUNKS, USE_GDC=pdl, **launch)
    return out


@torch.library.custom_op("dlp::greedy_pdl", mutates_args=())
def _greedy_pdl(logits: torch.Tensor) -> torch.Tensor:
    return _launch(logits, True)


@_greedy_pdl.register_fake
def _greedy_pdl_fake(logits: torch.Tensor) -> torch.Tensor:
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


if triton is not None:

    @triton.jit
    def _chunk_max_kernel(
        Logits, PartVal, PartIdx, V, WIDTH, stride_row,
        CHUNKS: tl.constexpr,
        BLOCK: tl.constexpr,
        USE_GDC: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        lo = chunk * WIDTH
        hi = tl.minimum(lo + WIDTH, V)
        if USE_GDC:
            tl.extra.cuda.gdc_wait()
        # Each lane keeps the best logit it has seen (and where): an elementwise compare a
        # block, and one reduction at the end instead of two (max, argmax) a block.
        lanes = tl.arange(0, BLOCK)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        best_idx = lo + lanes  # a piece of -inf only: its first index, as argmax
        for start in range(lo, hi, BLOCK):
            idx = start + lanes
            x = tl.load(Logits + row * stride_row + idx, mask=idx < hi, other=float("-inf"))
            x = x.to(tl.float32)
            take = x > best  # strictly greater: a lane's earlier block keeps a tie
            best = tl.where(take, x, best)
            best_idx = tl.where(take, idx, best_idx)
        if USE_GDC:
            tl.extra.cuda.gdc_launch_dependents()
        top = tl.max(best, 0)
        # The lowest index holding the max (lanes tie in any order; V < 2^31).
        top_idx = tl.min(tl.where(best == top, best_idx, 2147483647), 0)
        at = row * CHUNKS + chunk + tl.arange(0, 1)
        tl.store(PartVal + at, top + tl.zeros([1], tl.float32))
        tl.store(PartIdx + at, (top_idx + tl.zeros([1], tl.int32)).to(tl.int64))

    @triton.jit
    def _best_chunk_kernel(
        PartVal, PartIdx, Out,
        CHUNKS: tl.constexpr,
        USE_GDC: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, CHUNKS)
        if USE_GDC:
            tl.extra.cuda.gdc_wait()
        vals = tl.load(PartVal + row * CHUNKS + c)
        best = tl.argmax(vals, 0, tie_break_left=True)  # the first piece holding the max
        idx = tl.load(PartIdx + row * CHUNKS + c)
        tl.store(Out + row, tl.sum(tl.where(c == best, idx, 0), 0))
