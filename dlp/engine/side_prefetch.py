"""L2 prefetch for the decode step from a second CUDA stream.

At batch 64 a decode layer alternates between kernels that are bound by latency and leave
HBM mostly idle (the input norm, the q/k/v GEMM, the attention, the o GEMM: ~23 us of a
~52 us layer at the Qwen2-1.5B shape, moving ~1 TB/s) and the MLP GEMMs that stream weights
at close to the memory's rate. The step's weights and the past KV cache are never written
during a step, so bytes that later kernels read may be asked of the L2 early.

Sessions 9 and 11 had the latency-bound kernels themselves issue those prefetches: each
issuing kernel got slower by more than its successors gained
(``benchmarks/results/decode_step_h200_l2pf.json``): a kernel's programs hold their SM
until their requests drain, and the next kernel waits for the whole grid. Here a small
kernel on a *side stream* issues them instead, forked from the main stream after each
layer's input norm: nothing on the main stream waits for it until the step ends, so its
cost is off the step's critical path; what it asks for is

- ``kv``: each row's cached keys and values of this layer (the positions before its new
  token), for the attention (~12.6 MB a layer at batch 64, 192 keys);
- ``o``: the o GEMM's weight (4.7 MB);
- ``gu=F``: the first fraction ``F`` of every gate/up weight row, so that every gate/up
  program finds its first K steps in L2 (a prefix of whole rows would only speed up the
  first programs, and the GEMM takes as long as its slowest);
- ``down=F``: the same of every split-K piece of every down weight row.

Each request is sent as ``prefetch.global.L2`` of its 128-byte lines, spread over the
side kernel's threads (no registers held, nothing waited for). Addresses come
from a per-layer int64 table built once (the caches and weights never move), and each
row's number of cached keys from the step's ``positions`` (a persistent buffer), clamped to
the cache: a stale value can only ask for the wrong bytes of the same cache, never outside
it. The step joins the side stream before it ends (:func:`join`), so a CUDA graph captures
the whole fork / join. Only on a real GPU (Hopper or later: bulk prefetch), never under
Triton's CPU interpreter (inline asm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dlp.engine.triton_support import INTERPRET, tl, triton

CHUNK_BYTES = 32 * 1024  # bytes per bulk request; longer ranges are sent in pieces
ALIGN = 16  # cp.async.bulk: 16-byte aligned addresses, sizes a multiple of 16
PROGRAMS = 64  # side kernel programs (4 warps each, no shared memory)
BLOCK = 1024  # 128-byte lines a program asks for per loop step
MAX_WEIGHTS = 3
# Per layer: k base, v base, cache row stride, kv-head stride, bytes a position, bytes of
# the cache's positions - 1, then per weight region: address, rows, row stride, segments,
# segment stride, prefix bytes.
KV_FIELDS = 6
WEIGHT_FIELDS = 6
FIELDS = KV_FIELDS + MAX_WEIGHTS * WEIGHT_FIELDS


@dataclass(frozen=True)
class SidePrefetchPlan:
    """What the side stream prefetches for each layer (see the module docstring)."""

    kv: bool = False
    o: bool = False
    gu: float = 0.0
    down: float = 0.0

    @property
    def active(self) -> bool:
        return self.kv or self.o or self.gu > 0 or self.down > 0

    @classmethod
    def parse(cls, spec: str) -> SidePrefetchPlan:
        """``"kv.o.gu25.down25"`` (parts joined by ``.``; ``guN``/``downN``: N percent of
        each row, or of each split-K piece of a row); ``""`` or ``none``: nothing."""
        fields: dict[str, object] = {}
        for part in (p.strip() for p in spec.split(".")):
            if part in ("", "none"):
                continue
            if part in ("kv", "o"):
                fields[part] = True
                continue
            for name in ("gu", "down"):
                value = part.removeprefix(name)
                if value != part and value.isdigit() and 0 < int(value) <= 100:
                    fields[name] = int(value) / 100
                    break
            else:
                raise ValueError(f"side prefetch: unknown part {part!r} (kv, o, guN, downN)")
        return cls(**fields)  # type: ignore[arg-type]


NOTHING = SidePrefetchPlan()


@dataclass(frozen=True)
class WeightRegion:
    """Bytes of a row-major weight to prefetch: of each of ``rows`` rows (``row_stride``
    bytes apart), the first ``prefix`` bytes of each of ``segments`` pieces that start
    ``segment_stride`` bytes apart."""

    address: int
    rows: int
    row_stride: int
    segments: int
    segment_stride: int
    prefix: int

    def fields(self) -> list[int]:
        return [
            self.address, self.rows, self.row_stride, self.segments, self.segment_stride,
            self.prefix,
        ]  # fmt: skip

    def requests(self) -> list[tuple[int, int]]:
        """(address, bytes) of every request, as the kernel sends them (tests, docs)."""
        return [
            (self.address + r * self.row_stride + s * self.segment_stride, self.prefix)
            for r in range(self.rows)
            for s in range(self.segments)
        ]


def row_prefix_region(
    w: torch.Tensor, fraction: float, segment_elems: int | None = None, step_elems: int = 1
) -> WeightRegion | None:
    """The first ``fraction`` of each of a ``[N, K]`` weight's rows (with ``segment_elems``:
    of each piece of a row that many elements long, a split-K GEMM's pieces), rounded down
    to whole K steps of ``step_elems`` elements and to 16 bytes, at most
    :data:`CHUNK_BYTES`. None if empty."""
    if w.dim() != 2 or w.stride(1) != 1 or fraction <= 0:
        return None
    item = w.element_size()
    k = w.shape[1]
    per_segment = min(segment_elems or k, k)
    segments = math.ceil(k / per_segment)
    elems = int(per_segment * min(fraction, 1.0)) // step_elems * step_elems
    prefix = min(elems * item // ALIGN * ALIGN, CHUNK_BYTES)
    if prefix <= 0:
        return None
    return WeightRegion(
        w.data_ptr(), w.shape[0], w.stride(0) * item, segments, per_segment * item, prefix
    )


def whole_region(w: torch.Tensor) -> WeightRegion | None:
    """Every byte of a contiguous weight, as rows (each at most :data:`CHUNK_BYTES`)."""
    if w.dim() != 2 or not w.is_contiguous():
        return None
    row = w.shape[1] * w.element_size()
    if row % ALIGN or row > CHUNK_BYTES:
        return None
    return WeightRegion(w.data_ptr(), w.shape[0], row, 1, row, row)


def kv_fields(k_cache: torch.Tensor, v_cache: torch.Tensor) -> list[int]:
    """The table's KV part for one layer's caches ``[B, kvh, S, d]`` (contiguous per head)."""
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k and v caches need one shape and layout")
    _, _, s, d = k_cache.shape
    if k_cache.stride(3) != 1 or k_cache.stride(2) != d:
        raise ValueError("side prefetch needs each head's positions contiguous in the cache")
    item = k_cache.element_size()
    per_position = d * item
    return [
        k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0) * item,
        k_cache.stride(1) * item, per_position, (s - 1) * per_position,
    ]  # fmt: skip


def layer_table_row(kv: list[int] | None, weights: list[WeightRegion | None]) -> list[int]:
    """One layer's row of the int64 table the side kernel reads (unused parts are zeros)."""
    regions = [w for w in weights if w is not None]
    if len(regions) > MAX_WEIGHTS:
        raise ValueError(f"at most {MAX_WEIGHTS} weight regions a layer")
    row = list(kv) if kv is not None else [0] * KV_FIELDS
    for region in regions:
        row += region.fields()
    row += [0] * (FIELDS - len(row))
    return row


def enabled(device: torch.device) -> bool:
    """Bulk L2 prefetch needs a real CUDA device of compute capability 9.0 or later."""
    if triton is None or INTERPRET or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


_STREAMS: dict[int, torch.cuda.Stream] = {}
_FORKED: set[int] = set()


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _STREAMS:
        _STREAMS[index] = torch.cuda.Stream(device=index)
    return _STREAMS[index]


def join(device: torch.device) -> None:
    """Make the current stream wait for the side stream's prefetch kernels (each step ends
    with this, so that a captured graph joins its fork)."""
    if device.type != "cuda":
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index in _FORKED:
        torch.cuda.current_stream(index).wait_stream(_STREAMS[index])
        _FORKED.discard(index)


def issue(
    anchor: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor | None,
    table: torch.Tensor,
    layer: int,
    token: torch.Tensor,
    rows: int,
    kv_heads: int,
    cache_rows: int,
) -> None:
    """Fork the side stream after ``anchor`` (the layer's input, so after its producer) and
    prefetch the layer's table row there. ``token`` is a buffer the op declares it writes,
    so that the compiler keeps the call."""
    torch.ops.dlp.side_prefetch(
        anchor, positions, slots, table, layer, token, rows, kv_heads, cache_rows
    )


@torch.library.custom_op("dlp::side_prefetch", mutates_args=("token",))
def _side_prefetch_op(
    anchor: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor | None,
    table: torch.Tensor,
    layer: int,
    token: torch.Tensor,
    rows: int,
    kv_heads: int,
    cache_rows: int,
) -> None:
    device = table.device
    main = torch.cuda.current_stream(device)
    side = _side_stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        _side_prefetch_kernel[(PROGRAMS,)](
            table, positions, slots if slots is not None else positions,
            layer * FIELDS, rows, cache_rows,
            KV_HEADS=kv_heads,
            HAS_SLOTS=slots is not None,
            N_WEIGHTS=MAX_WEIGHTS,
            CHUNK=CHUNK_BYTES,
            BLOCK=BLOCK,
            num_warps=4,
        )  # fmt: skip
    _FORKED.add(device.index if device.index is not None else torch.cuda.current_device())


@_side_prefetch_op.register_fake
def _side_prefetch_fake(
    anchor: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor | None,
    table: torch.Tensor,
    layer: int,
    token: torch.Tensor,
    rows: int,
    kv_heads: int,
    cache_rows: int,
) -> None:
    return None


if triton is not None:

    @triton.jit
    def _prefetch_lines(at, ok):
        """Ask the L2 for the 128-byte line at each address where ``ok`` (fire and forget)."""
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
            "=r,l,r",
            [at, ok.to(tl.int32)],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )

    @triton.jit
    def _side_prefetch_kernel(
        Table, Positions, Slots, row_at, rows, cache_rows,
        KV_HEADS: tl.constexpr,
        HAS_SLOTS: tl.constexpr,
        N_WEIGHTS: tl.constexpr,
        CHUNK: tl.constexpr,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        # Every request is cut into 128-byte lines, and the lines of all requests are shared
        # evenly by the programs' threads: one ``prefetch.global.L2`` a line. (Bulk
        # prefetches, one a request, kept the kernel ~70 us a layer: the copy engine takes
        # them one after another, benchmarks/results/decode_step_h200_side_bulk.json.)
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        t = Table + row_at
        lanes = tl.arange(0, BLOCK)
        # The keys and values each row's attention reads this step: its positions before
        # the new token (``positions[r]`` of them), K and V as two requests per (row, head).
        k_base = tl.load(t)
        v_base = tl.load(t + 1)
        stride_row = tl.load(t + 2)
        stride_head = tl.load(t + 3)
        per_position = tl.load(t + 4)
        max_bytes = tl.load(t + 5)
        kv_lines = (max_bytes + 127) // 128
        n_kv = tl.where(k_base != 0, rows * KV_HEADS * 2 * kv_lines, 0)
        for start in range(pid * BLOCK, n_kv, nprog * BLOCK):
            i = start + lanes
            ok = i < n_kv
            req = i // kv_lines
            line = i % kv_lines
            pair = req // 2
            row = pair // KV_HEADS
            head = pair % KV_HEADS
            pos = tl.load(Positions + row, mask=ok, other=0).to(tl.int64)
            cache_row = row.to(tl.int64)
            if HAS_SLOTS:
                cache_row = tl.load(Slots + row, mask=ok, other=0).to(tl.int64)
            cache_row = tl.minimum(tl.maximum(cache_row, 0), cache_rows - 1)
            nbytes = tl.minimum(tl.maximum(pos * per_position, 0), max_bytes)
            base = tl.where(req % 2 == 0, k_base, v_base)
            base = base + cache_row * stride_row + head.to(tl.int64) * stride_head
            _prefetch_lines(base + line * 128, ok & (line * 128 < nbytes))
        # Weight regions: the first `prefix` bytes of each segment of each row.
        for w in tl.static_range(N_WEIGHTS):
            wt = t + 6 + w * 6
            address = tl.load(wt)
            n_rows = tl.load(wt + 1)
            row_stride = tl.load(wt + 2)
            segments = tl.load(wt + 3)
            segment_stride = tl.load(wt + 4)
            prefix = tl.load(wt + 5)
            w_lines = (prefix + 127) // 128
            n_req = tl.where(address != 0, n_rows * segments * w_lines, 0)
            for start in range(pid * BLOCK, n_req, nprog * BLOCK):
                i = start + lanes
                req = i // w_lines
                line = i % w_lines
                w_row = req // segments
                seg = req % segments
                at = address + w_row * row_stride + seg * segment_stride + line * 128
                _prefetch_lines(at, i < n_req)
