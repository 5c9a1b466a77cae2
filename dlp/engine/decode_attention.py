"""Length-aware flash-decoding attention for the engine's decode step.

The eager decode step attends one new token per row over the *whole* static KV cache:
a matmul, a scale, an additive ``-inf`` length mask, a softmax and a second matmul - about
five kernels, each reading or writing ``[b, heads, max_seq]`` and the full cache, although
most rows have far fewer valid positions than ``max_seq``.

:func:`decode_attention` does the same in one Triton kernel (two when the sequence is split)
that reads only each row's valid prefix ``[0, lengths[r])`` of the cache:

* one program per (row, kv head, split) serves all ``group = n_heads // kvh`` query heads of
  that kv head, so each K/V block is loaded once per group (GQA) and the q·k and p·v
  products are ``tl.dot`` calls (the group dim is padded to >= 16 rows, as ``tl.dot`` needs);
* it walks the keys in blocks of ``BLOCK_N`` up to the row's length with an fp32 online
  softmax (running max ``m``, sum ``l``, output ``acc``), so no score matrix is materialised;
* with ``splits > 1`` each row's valid prefix is cut into ``splits`` BLOCK_N-aligned pieces
  that run in parallel (a small batch alone would fill few of the GPU's SMs); each writes a
  partial (acc, m, l) and a second small kernel merges them by log-sum-exp.

Everything that shapes the launch (grid, block sizes, group, splits) is a Python int, the
lengths stay on the device and outputs come from ``torch.empty``: no host sync, so the call
works inside ``torch.compile(fullgraph=True)`` and CUDA-graph capture.
:func:`decode_attention_reference` is the plain-torch equivalent (CPU path, tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dlp.engine.triton_support import INTERPRET as _INTERPRET
from dlp.engine.triton_support import tl, triton, triton_available

__all__ = [
    "LaunchConfig",
    "decode_attention",
    "decode_attention_reference",
    "decode_attention_rope",
    "pick_splits",
    "rope_rows",
    "triton_available",
]

BLOCK_N = 64  # keys per loop step: 64 x head_dim bf16 tiles keep registers low at d=128
MIN_DOT_ROWS = 16  # tl.dot needs M >= 16, so the query-head group is padded up to this
MAX_SPLITS = 16
SPLIT_TARGET = 256  # positions per split once the cache is long enough to split
TARGET_PROGRAMS = 128  # about one program per SM of an H100/H200 (132) is enough to split for


@dataclass(frozen=True)
class LaunchConfig:
    """Tile and launch settings of the attention kernel (``None``: Triton's defaults, 4 warps
    and 3 stages). ``benchmarks/decode_ops_bench.py`` sweeps them on the GPU."""

    block_n: int = BLOCK_N
    num_warps: int | None = None
    num_stages: int | None = None

    def kernel_options(self) -> dict[str, int]:
        opts = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        return {k: v for k, v in opts.items() if v is not None}


# The launch when none is given (the PDL op's, in the engine's step); decode_step_bench.py
# swaps it per variant (``+attn=BLOCKNxWARPSxSTAGES``) to compare launches inside the step.
DEFAULT_LAUNCH = LaunchConfig()


def pick_splits(max_seq: int, rows: int = 1, kv_heads: int = 1) -> int:
    """Split count for a cache of ``max_seq`` positions read by ``rows`` x ``kv_heads``
    programs: 1 up to 512 positions; beyond, enough that each split covers <= 256 positions
    (at most 16), but no more than it takes to give the GPU ~``TARGET_PROGRAMS`` programs.
    Measured on the H200 (S = 4096, rows of 64-512 keys): at batch 8, 16 splits 5.8 us vs
    9.0 us unsplit; at batch 64 (128 programs already), 17.2 us vs 10.7 us."""
    if max_seq <= 2 * SPLIT_TARGET:
        return 1
    by_length = min(MAX_SPLITS, math.ceil(max_seq / SPLIT_TARGET))
    by_programs = max(1, math.ceil(TARGET_PROGRAMS / (rows * kv_heads)))
    return min(by_length, by_programs)


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain torch (fp32 softmax), same contract as :func:`decode_attention`."""
    b, n_heads, d = q.shape
    kvh, s = k_cache.shape[1], k_cache.shape[2]
    if slots is not None:
        k_cache, v_cache = k_cache[slots], v_cache[slots]
    k = k_cache[:b].float()
    v = v_cache[:b].float()
    qg = q.float().reshape(b, kvh, n_heads // kvh, d)
    att = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [b, kvh, group, S]
    visible = torch.arange(s, device=q.device)[None, :] < lengths.to(q.device)[:, None]
    att = att.masked_fill(~visible[:, None, None, :], float("-inf"))
    att = torch.softmax(att, dim=-1)
    return torch.matmul(att, v).reshape(b, n_heads, d).to(q.dtype)


if triton is not None:

    @triton.jit
    def _decode_attn_kernel(
        Q, K, V, Lengths, Slots, Out, PartAcc, PartM, PartL, KNew, VNew, Cos, Sin,
        stride_qb, stride_qh,
        stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs,
        stride_ob, stride_oh,
        stride_knb, stride_knh, stride_vnb, stride_vnh, stride_cb, stride_piece,
        scale,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SPLITS: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
        HAS_SLOTS: tl.constexpr,
        ROPE: tl.constexpr,
        PIECES: tl.constexpr,
        USE_GDC: tl.constexpr,
    ):  # fmt: skip
        # No nested @triton.jit helpers here: with one, Inductor cannot tell which arguments
        # a user kernel stores to and clones them all (the KV caches, with ROPE).
        # int64 row index: row * stride_kb overflows int32 for large caches.
        row = tl.program_id(0).to(tl.int64)
        if USE_GDC:  # a programmatic dependent launch: wait for the kernel before to finish
            tl.extra.cuda.gdc_wait()
        # The row's cache row: its own index, or its entry in the slot table.
        cache_row = row
        if HAS_SLOTS:
            cache_row = tl.load(Slots + row).to(tl.int64)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.load(Lengths + row).to(tl.int32)

        # This split's share of the row's valid prefix, BLOCK_N-aligned. Cutting the row's
        # own length (not the static cache) keeps the splits balanced for short rows; a split
        # past the end gets an empty range and leaves m = -inf, l = 0, acc = 0.
        split_len = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
        start = split * split_len
        end = tl.minimum(start + split_len, length)

        g = tl.arange(0, GROUP_PAD)
        dims = tl.arange(0, HEAD_DIM)
        g_ok = g < GROUP
        # The group's query heads are consecutive: head = kv_head * GROUP + g.
        q_ptrs = Q + row * stride_qb + (kv_head * GROUP + g)[:, None] * stride_qh + dims[None, :]
        if ROPE:
            # Rotary embedding here (HF's rotate-half: x * cos + [-x2, x1] * sin), in fp32 and
            # rounded once to the model dtype, as the compiled step's fused pointwise does.
            rot_dims = (dims + HEAD_DIM // 2) % HEAD_DIM
            sign = tl.where(dims < HEAD_DIM // 2, -1.0, 1.0)
            cos = tl.load(Cos + row * stride_cb + dims).to(tl.float32)
            sin = tl.load(Sin + row * stride_cb + dims).to(tl.float32)
            # q (and k/v below) may come as the q/k/v GEMM's split-K pieces: their fp32 sum,
            # rounded once to the model dtype, is the GEMM's output.
            q_rot_ptrs = q_ptrs + (rot_dims - dims)[None, :]
            q_raw = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
            q_rot = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
            for piece in tl.static_range(PIECES):
                at = piece * stride_piece
                q_raw += tl.load(q_ptrs + at, mask=g_ok[:, None], other=0.0).to(tl.float32)
                q_rot += tl.load(q_rot_ptrs + at, mask=g_ok[:, None], other=0.0).to(tl.float32)
            q_raw = q_raw.to(K.dtype.element_ty).to(tl.float32)
            q_rot = q_rot.to(K.dtype.element_ty).to(tl.float32)
            q = q_raw * cos[None, :] + sign[None, :] * q_rot * sin[None, :]
            q = q.to(K.dtype.element_ty)
            # This token's key and value, read here so their loads overlap the cache's.
            k_ptr = KNew + row * stride_knb + kv_head * stride_knh
            v_ptr = VNew + row * stride_vnb + kv_head * stride_vnh
            k_raw = tl.zeros([HEAD_DIM], tl.float32)
            k_rot = tl.zeros([HEAD_DIM], tl.float32)
            v_sum = tl.zeros([HEAD_DIM], tl.float32)
            for piece in tl.static_range(PIECES):
                at = piece * stride_piece
                k_raw += tl.load(k_ptr + at + dims).to(tl.float32)
                k_rot += tl.load(k_ptr + at + rot_dims).to(tl.float32)
                v_sum += tl.load(v_ptr + at + dims).to(tl.float32)
            k_raw = k_raw.to(K.dtype.element_ty).to(tl.float32)
            k_rot = k_rot.to(K.dtype.element_ty).to(tl.float32)
            k_new = (k_raw * cos + sign * k_rot * sin).to(K.dtype.element_ty)
            v_new = v_sum.to(V.dtype.element_ty)
        else:
            q = tl.load(q_ptrs, mask=g_ok[:, None], other=0.0).to(K.dtype.element_ty)

        # torch.compile (inductor) passes a Python float as fp64; keep the scores fp32.
        qk_scale = tl.cast(scale, tl.float32)
        k_base = K + cache_row * stride_kb + kv_head * stride_kh
        v_base = V + cache_row * stride_vb + kv_head * stride_vh
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_sum = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        # With ROPE this token's key is not in the cache yet: the loop stops before it and
        # it is added (and written) below, so no program reads what another one writes.
        stop = end
        if ROPE:
            stop = tl.minimum(end, length - 1)
        for n0 in range(start, stop, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < stop
            # K is loaded transposed ([d, BLOCK_N]) so q @ k^T is a plain dot.
            k_ptrs = k_base + n[None, :] * stride_ks + dims[:, None]
            k = tl.load(k_ptrs, mask=n_ok[None, :], other=0.0)
            if UPCAST:  # the interpreter's dot wants fp32
                s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision=PRECISION)
            else:
                s = tl.dot(q, k, input_precision=PRECISION)
            s = s * qk_scale
            s = tl.where(n_ok[None, :], s, float("-inf"))
            # Online softmax: every block holds >= 1 valid key, so m_new is finite (no NaN).
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l_sum = l_sum * alpha + tl.sum(p, 1)
            # Masked rows must be 0, not garbage: p = 0 times a NaN would still poison acc.
            v_ptrs = v_base + n[:, None] * stride_vs + dims[None, :]
            v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
            # p is rounded to V's dtype for the dot, as the eager path's softmax(...).to(v).
            pv = p.to(v.dtype)
            if UPCAST:
                pv_dot = tl.dot(pv.to(tl.float32), v.to(tl.float32), input_precision=PRECISION)
            else:
                pv_dot = tl.dot(pv, v, input_precision=PRECISION)
            acc = acc * alpha[:, None] + pv_dot
            m = m_new
        if USE_GDC:
            tl.extra.cuda.gdc_launch_dependents()

        if ROPE:
            last = length - 1
            if (last >= start) & (last < end):  # this split holds the new key: one writer
                tl.store(k_base + last * stride_ks + dims, k_new)
                tl.store(v_base + last * stride_vs + dims, v_new)
                s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * qk_scale
                m_new = tl.maximum(m, s_new)
                alpha = tl.exp(m - m_new)
                p_new = tl.exp(s_new - m_new)
                l_sum = l_sum * alpha + p_new
                p_v = p_new.to(V.dtype.element_ty).to(tl.float32)
                acc = acc * alpha[:, None] + p_v[:, None] * v_new.to(tl.float32)[None, :]
                m = m_new

        if SPLITS == 1:
            # Split 0 always holds key 0 (lengths >= 1), so l_sum > 0 for real heads.
            out = acc / l_sum[:, None]
            o_ptrs = (
                Out + row * stride_ob + (kv_head * GROUP + g)[:, None] * stride_oh + dims[None, :]
            )
            tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=g_ok[:, None])
        else:
            # Scratch is contiguous [b, kvh, SPLITS, GROUP(, d)]: partial stats of each head.
            part = ((row * tl.num_programs(1) + kv_head) * SPLITS + split) * GROUP + g
            tl.store(PartM + part, m, mask=g_ok)
            tl.store(PartL + part, l_sum, mask=g_ok)
            acc_ptrs = PartAcc + part[:, None] * HEAD_DIM + dims[None, :]
            tl.store(acc_ptrs, acc, mask=g_ok[:, None])

    @triton.jit
    def _rope_rows_kernel(
        RopeCos, RopeSin, Positions, Cos, Sin, Lengths, stride_table,
        D: tl.constexpr,
        D_PAD: tl.constexpr,
    ):  # fmt: skip
        # One program a row: its table rows and its length.
        row = tl.program_id(0)
        pos = tl.load(Positions + row)
        dims = tl.arange(0, D_PAD)
        ok = dims < D
        at = pos.to(tl.int64) * stride_table + dims
        tl.store(Cos + row * D + dims, tl.load(RopeCos + at, mask=ok), mask=ok)
        tl.store(Sin + row * D + dims, tl.load(RopeSin + at, mask=ok), mask=ok)
        tl.store(Lengths + row, pos + 1)

    @triton.jit
    def _combine_kernel(
        PartAcc, PartM, PartL, Out,
        stride_ob, stride_oh,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        SPLITS: tl.constexpr,
        SPLITS_PAD: tl.constexpr,
    ):  # fmt: skip
        # One program per (row, query head) merges that head's SPLITS partials.
        row = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        kv_head = head // GROUP
        g = head % GROUP
        sp = tl.arange(0, SPLITS_PAD)
        sp_ok = sp < SPLITS
        dims = tl.arange(0, HEAD_DIM)
        part = ((row * (tl.num_programs(1) // GROUP) + kv_head) * SPLITS + sp) * GROUP + g
        m = tl.load(PartM + part, mask=sp_ok, other=float("-inf"))
        l_sum = tl.load(PartL + part, mask=sp_ok, other=0.0)
        acc_ptrs = PartAcc + part[:, None] * HEAD_DIM + dims[None, :]
        acc = tl.load(acc_ptrs, mask=sp_ok[:, None], other=0.0)
        # Split 0 is never empty, so m_max is finite and empty splits weigh exp(-inf) = 0.
        m_max = tl.max(m, 0)
        w = tl.exp(m - m_max)
        out = tl.sum(acc * w[:, None], 0) / tl.sum(l_sum * w, 0)
        o_ptrs = Out + row * stride_ob + head * stride_oh + dims
        tl.store(o_ptrs, out.to(Out.dtype.element_ty))


def rope_rows(
    rope_cos: torch.Tensor, rope_sin: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rope attention's per-row inputs, made once a step for every layer: each row's cos
    and sin ``[b, d]`` (rows ``positions`` of the model's tables ``[S, d]``) and its number of
    valid keys ``positions + 1``.

    On CUDA (and under the interpreter) this is one kernel behind the ``dlp::rope_rows`` op.
    Made by plain indexing inside a compiled step, Inductor does not keep these rows as one
    buffer: it copies them again for each attention op that reads them (groups of four
    layers a kernel, 14 kernels and ~14 us a step on the H200,
    ``benchmarks/results/decode_step_h200_default.json``); an op's outputs are buffers it
    passes as they are (none of those copies in ``..._rows.json``)."""
    if triton is None or not (positions.is_cuda or _INTERPRET):
        return rope_cos[positions], rope_sin[positions], positions + 1
    return torch.ops.dlp.rope_rows(rope_cos, rope_sin, positions)


@torch.library.custom_op("dlp::rope_rows", mutates_args=())
def _rope_rows_op(
    rope_cos: torch.Tensor, rope_sin: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, d = positions.shape[0], rope_cos.shape[1]
    if rope_cos.shape != rope_sin.shape or rope_cos.stride(1) != 1 or rope_sin.stride(1) != 1:
        raise ValueError("rope_cos and rope_sin need one shape [S, d], contiguous rows")
    cos = rope_cos.new_empty((b, d))
    sin = rope_sin.new_empty((b, d))
    lengths = torch.empty_like(positions)
    _rope_rows_kernel[(b,)](
        rope_cos, rope_sin, positions, cos, sin, lengths, rope_cos.stride(0),
        D=d, D_PAD=triton.next_power_of_2(d),
    )  # fmt: skip
    return cos, sin, lengths


@_rope_rows_op.register_fake
def _rope_rows_fake(
    rope_cos: torch.Tensor, rope_sin: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, d = positions.shape[0], rope_cos.shape[1]
    return rope_cos.new_empty((b, d)), rope_sin.new_empty((b, d)), torch.empty_like(positions)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    splits: int = 1,
    slots: torch.Tensor | None = None,
    launch: LaunchConfig | None = None,
) -> torch.Tensor:
    """q [b, n_heads, d]; k_cache/v_cache [B, kvh, S, d] (any strides with last dim
    contiguous); lengths [b] int (valid keys per row, 1..S); ``slots`` [b] int: row r's
    cache row (default: r, then B >= b). Returns [b, n_heads, d] in q.dtype. Lengths and
    slots are not checked on the host (that would sync): out of range is undefined."""
    return _launch(q, k_cache, v_cache, lengths, scale, splits, slots, None, launch)


def decode_attention_rope(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    splits: int = 1,
    slots: torch.Tensor | None = None,
    launch: LaunchConfig | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """The decode step's rotary embedding, cache write and attention in one kernel (in the
    compiled step, two kernels a layer fewer than rope + cache write + :func:`decode_attention`).

    q [b, n_heads, d] and this token's k_new / v_new [b, kvh, d] come before the rotary
    embedding; cos / sin [b, d] are each row's at its position ``lengths - 1``. The rotated
    key and the value are written into the row's cache row at that position, and the rotated
    q attends over positions ``0 .. lengths - 1``. Same contract as :func:`decode_attention`
    otherwise (last dims contiguous; lengths and slots not checked on the host).

    q / k_new / v_new may also come as split-K pieces ``[pieces, b, ...]`` (views of one
    ``[pieces, b, width]`` tensor: one piece stride), which the kernel sums in fp32 and rounds
    to the cache dtype: the q/k/v GEMM's sum then costs no kernel of its own. The output is
    in the cache dtype. ``pdl``: a programmatic dependent launch (splits = 1 only)."""
    if q.dim() == 4:
        pieces = q.shape[0]
        if k_new.dim() != 4 or v_new.dim() != 4 or {t.shape[0] for t in (k_new, v_new)} != {pieces}:
            raise ValueError("q, k_new and v_new must all be pieces [pieces, b, ...] or none")
        if pieces > 1 and len({t.stride(0) for t in (q, k_new, v_new)}) != 1:
            raise ValueError("q, k_new and v_new pieces need one piece stride (one tensor)")
    else:
        pieces = 1
    if pieces > 1 and splits != 1:
        raise ValueError("pieces of q/k/v need the unsplit kernel (splits=1)")
    b, kvh, d = k_new.shape[-3:]
    if v_new.shape[-3:] != (b, kvh, d) or tuple(cos.shape) != (b, d) or cos.shape != sin.shape:
        shapes = [tuple(t.shape) for t in (q, k_new, v_new, cos, sin)]
        raise ValueError(f"q/k_new/v_new/cos/sin shapes do not fit: {shapes}")
    if k_new.stride(-1) != 1 or v_new.stride(-1) != 1 or cos.stride() != sin.stride():
        raise ValueError("k_new and v_new need a contiguous last dim, cos and sin one layout")
    if cos.stride(-1) != 1:
        raise ValueError("cos and sin need a contiguous last dim")
    if pdl:
        if splits != 1:
            raise ValueError("pdl launches the unsplit kernel only (splits=1)")
        return torch.ops.dlp.decode_attention_rope_pdl(
            q, k_new, v_new, cos, sin, k_cache, v_cache, lengths, scale, slots
        )
    return _launch_rope(
        q, k_new, v_new, cos, sin, k_cache, v_cache, lengths, scale, splits, slots, launch
    )


def _launch_rope(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    splits: int,
    slots: torch.Tensor | None,
    launch: LaunchConfig | None,
    pdl: bool = False,
) -> torch.Tensor:
    """Pieces (a leading dim on q/k/v) become piece 0's views plus the piece count and stride."""
    pieces = (q.shape[0], q.stride(0)) if q.dim() == 4 else (1, 0)
    if q.dim() == 4:
        q, k_new, v_new = q[0], k_new[0], v_new[0]
    rope = (k_new, v_new, cos, sin)
    return _launch(q, k_cache, v_cache, lengths, scale, splits, slots, rope, launch, pdl, pieces)


# The PDL launch as an op Inductor does not look into (see skinny_gemm's ``dlp::skinny_pdl``):
# it declares the two caches it writes, so Inductor clones nothing.
@torch.library.custom_op("dlp::decode_attention_rope_pdl", mutates_args=("k_cache", "v_cache"))
def _rope_pdl(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    slots: torch.Tensor | None,
) -> torch.Tensor:
    return _launch_rope(
        q, k_new, v_new, cos, sin, k_cache, v_cache, lengths, scale, 1, slots, None, pdl=True
    )


@_rope_pdl.register_fake
def _rope_pdl_fake(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    slots: torch.Tensor | None,
) -> torch.Tensor:
    # The dtype rule of _launch: the cache dtype for pieces (fp32 sums), else q's.
    pieces = q.shape[0] if q.dim() == 4 else 1
    return q.new_empty(q.shape[-3:], dtype=k_cache.dtype if pieces > 1 else q.dtype)


def _launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    splits: int,
    slots: torch.Tensor | None,
    rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
    launch: LaunchConfig | None = None,
    pdl: bool = False,
    pieces: tuple[int, int] = (1, 0),
) -> torch.Tensor:
    if triton is None:
        raise RuntimeError(
            "decode_attention needs triton, which is not installed "
            "(use decode_attention_reference on CPU)"
        )
    b, n_heads, d = q.shape
    big_b, kvh, _, d_k = k_cache.shape
    if v_cache.shape != k_cache.shape or d_k != d or (slots is None and big_b < b):
        shapes = [tuple(t.shape) for t in (q, k_cache, v_cache)]
        raise ValueError(f"q/k_cache/v_cache shapes do not fit: {shapes}")
    if n_heads % kvh != 0:
        raise ValueError(f"n_heads {n_heads} is not a multiple of kv heads {kvh}")
    if d & (d - 1) or d < 16:
        raise ValueError(f"head_dim {d} must be a power of two >= 16")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last dim")
    if tuple(lengths.shape) != (b,) or splits < 1:
        raise ValueError(f"lengths must be [b]={b} and splits >= 1 (got {splits})")
    if slots is not None and tuple(slots.shape) != (b,):
        raise ValueError(f"slots must be [b]={b}, got {tuple(slots.shape)}")
    if rope is not None and rope[0].shape[:2] != (b, kvh):
        raise ValueError(f"k_new must be [b, kvh, d] = [{b}, {kvh}, {d}]")

    group = n_heads // kvh
    launch = launch or DEFAULT_LAUNCH
    pdl = pdl and not _INTERPRET  # the CPU interpreter has no griddepcontrol (inline asm)
    # Pieces are fp32 sums in the making: the output takes the cache (model) dtype then.
    out_dtype = k_cache.dtype if pieces[0] > 1 else q.dtype
    out = torch.empty((b, n_heads, d), dtype=out_dtype, device=q.device)
    common = {
        "GROUP": group,
        "GROUP_PAD": max(MIN_DOT_ROWS, triton.next_power_of_2(group)),
        "HEAD_DIM": d,
        "BLOCK_N": launch.block_n,
        "SPLITS": splits,
        # fp32 caches get exact fp32 dots (not tf32); bf16/fp16 ignore the setting.
        "PRECISION": "ieee" if k_cache.dtype == torch.float32 else "tf32",
        "UPCAST": _INTERPRET,
        "HAS_SLOTS": slots is not None,
        "ROPE": rope is not None,
        # Always passed: Inductor's analysis of a user kernel wants every argument, defaulted
        # constexprs included.
        "PIECES": pieces[0],
        "USE_GDC": pdl,
    }
    if splits == 1:
        part_acc = part_m = part_l = out  # unused: the kernel writes `out` directly
    else:
        part_acc = torch.empty((b, kvh, splits, group, d), dtype=torch.float32, device=q.device)
        part_m = torch.empty((b, kvh, splits, group), dtype=torch.float32, device=q.device)
        part_l = torch.empty((b, kvh, splits, group), dtype=torch.float32, device=q.device)
    # Without rope its inputs are never read: q stands in for them.
    k_new, v_new, cos, sin = rope if rope is not None else (q, q, q, q)
    _decode_attn_kernel[(b, kvh, splits)](
        q, k_cache, v_cache, lengths, slots if slots is not None else lengths,
        out, part_acc, part_m, part_l, k_new, v_new, cos, sin,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1), cos.stride(0),
        pieces[1],
        scale,
        **common,
        **launch.kernel_options(),
        **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip
    if splits > 1:
        _combine_kernel[(b, n_heads)](
            part_acc, part_m, part_l, out,
            out.stride(0), out.stride(1),
            GROUP=group, HEAD_DIM=d, SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits),
        )  # fmt: skip
    return out
