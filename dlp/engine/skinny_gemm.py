"""Weight-streaming GEMMs for the decode step: ``x [M, K] @ w[N, K]^T`` with few rows (M <= 128).

At decode, a linear layer multiplies a handful of rows (the batch) by a large weight, so its
time is the time to stream the weight from HBM once. cuBLAS picks tiles made for square
problems: on the H200 at M = 64 its kernels for Qwen2-1.5B's layers reached 0.9-3.0 TB/s of
the 4.3 TB/s the memory gives (``benchmarks/results/decode_step_h200.json``), and the GEMMs
alone took 1.6x the whole step's memory floor. Here each program owns a ``BLOCK_N`` slice of
the output for all M rows (one ``BLOCK_M`` tile covers the batch) and walks K in ``BLOCK_K``
steps, so each weight byte is read once; ``split_k`` cuts K into pieces that run in parallel
so that small layers (q/k/v, o) still give every SM work, and the pieces land as fp32
partials ``[split_k, M, N]`` that the caller sums (under ``torch.compile`` that sum fuses into
the next pointwise kernel, so the split costs no extra launch).

:func:`skinny_silu_mul` is the MLP's gate/up GEMM with ``silu(gate) * up`` in the epilogue:
each program streams the gate rows and the matching up rows of one output slice.

Two modes take the RMSNorm between two GEMMs into the GEMMs, so no norm kernel runs between
them (the PDL decode step does this around the MLP's norm): :func:`skinny_residual` adds
the residual to its product, its split-K pieces summed by the last piece of each tile to
finish, and leaves each row's partial sums of squares; a GEMM given those as a
:class:`NormInput` reads its input through the norm, tile by tile. With ``scale`` the
residual GEMM also writes its rows times the norm's weight, and a GEMM given those
(``NormInput.prescaled``) reads them as they are and applies each row's rstd after its
product: no norm arithmetic in its K steps (the PDL step's default, ``runner.PRESCALE_NORM``).

Configs (:class:`GemmConfig`) come from :func:`pick_config`: the best measured on the H200 per
shape where one was measured (``benchmarks/gemm_bench.py``), else a rule that aims for a few
programs per SM. Everything that shapes a launch is a Python int: the calls work inside
``torch.compile(fullgraph=True)`` and CUDA-graph capture.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dlp.engine.triton_support import INTERPRET, tl, triton

MAX_ROWS = 128  # beyond this the problem is no longer weight-bound: cuBLAS is the right tool
SM_COUNT_DEFAULT = 132  # H100 / H200
# Shared memory the pipeline stages may take: an H100/H200 SM has 227 KB for one block;
# Triton needs a little for itself.
SHARED_MEMORY_BYTES = 216 * 1024


@dataclass(frozen=True)
class GemmConfig:
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 5
    # > 0: the output columns are shared evenly by this many programs (each at most block_n
    # of them, masked) instead of one program per block_n-wide tile, so that a grid can fill
    # the GPU's program slots evenly: at the Qwen2-1.5B gate/up, 280 tiles of 32 columns put
    # 3 programs on 16 SMs and 2 on the others, and the 3-program SMs finish ~5 us after the
    # rest (benchmarks/results/gemm_timeline_h200.json). Alone an even grid is no faster
    # (every program slows: the SMs share one total rate), in the PDL step it is (MEASURED).
    programs: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def parse(cls, spec: str) -> GemmConfig:
        """``"BNxBKxSPLITxWARPSxSTAGES[xPROGRAMS]"`` (the benchmarks' way to name a config)."""
        try:
            values = [int(v) for v in spec.split("x")]
        except ValueError:
            values = []
        if len(values) not in (5, 6) or min(values[:5], default=0) < 1 or min(values) < 0:
            raise ValueError(
                f"{spec!r}: a GEMM config is BNxBKxSPLITxWARPSxSTAGES[xPROGRAMS], ints >= 1"
            )
        return cls(*values)

    def name(self) -> str:
        values = dataclasses.astuple(self)
        return "x".join(str(v) for v in (values if self.programs else values[:5]))

    def column_programs(self, n: int) -> int:
        """Programs across ``n`` output columns: ``programs``, or one per block_n tile."""
        if not self.programs:
            return math.ceil(n / self.block_n)
        if math.ceil(n / self.programs) > self.block_n:
            raise ValueError(
                f"{self.programs} programs over {n} columns: more than block_n={self.block_n} each"
            )
        return self.programs


@dataclass(frozen=True)
class NormInput:
    """The GEMM's input is a residual stream x ``[M, K]`` that it reads as
    ``rms_norm(x, weight, eps)`` (the model's RMSNorm, same roundings), normalising each tile
    as it loads it: no norm kernel of its own. ``sumsq`` ``[parts, M]`` fp32 holds partial
    sums of squares of x's rows (their sum is the row's), as :func:`skinny_residual` writes
    them (or :func:`row_sumsq` for an x from elsewhere)."""

    sumsq: torch.Tensor
    weight: torch.Tensor
    eps: float
    # x * weight, rounded to x's dtype (skinny_residual(scale=weight) writes it): the GEMM
    # then reads this as it is and scales each row's product by rstd after its K loop, so
    # its K steps do no norm arithmetic (the rstd is applied after the product, not before:
    # other roundings than rms_norm's, same precision).
    prescaled: torch.Tensor | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The norm in plain torch (where the kernel does not apply)."""
        mean = self.sumsq.sum(0)[:, None] / x.shape[-1]
        rstd = torch.rsqrt(mean + self.eps)
        if self.prescaled is not None:
            return (self.prescaled.float() * rstd).to(x.dtype)
        return self.weight * (x.float() * rstd).to(x.dtype)


def pack_k_steps(w: torch.Tensor, block_k: int) -> torch.Tensor:
    """A weight ``[N, K]`` re-laid K step by K step: ``[ceil(K / block_k), N, block_k]``
    (K zero-padded), for the kernel with that ``block_k``. A program's K step, its rows'
    ``block_k``-wide slices, is then one contiguous read instead of one short read per
    row a whole row apart (128 bytes every 3 KB at the Qwen2-1.5B gate/up). A second copy of
    the weight: the prefill's cuBLAS GEMMs keep reading the plain one."""
    n, k = w.shape
    steps = math.ceil(k / block_k)
    padded = F.pad(w, (0, steps * block_k - k)) if steps * block_k != k else w
    return padded.reshape(n, steps, block_k).transpose(0, 1).contiguous()


def plain_weight(w: torch.Tensor, k: int) -> torch.Tensor:
    """The ``[N, K]`` weight of a packed one (:func:`pack_k_steps`), or ``w`` itself."""
    if w.dim() == 2:
        return w
    steps, n, block_k = w.shape
    return w.transpose(0, 1).reshape(n, steps * block_k)[:, :k]


def fit_config(cfg: GemmConfig, w: torch.Tensor) -> GemmConfig:
    """``cfg`` with the K step of a packed weight (its layout fixes it), else as it is."""
    if w.dim() == 3 and cfg.block_k != w.shape[2]:
        return dataclasses.replace(cfg, block_k=w.shape[2])
    return cfg


def weight_rows(w: torch.Tensor) -> int:
    """N of a plain ``[N, K]`` or packed ``[steps, N, block_k]`` weight."""
    return w.shape[1] if w.dim() == 3 else w.shape[0]


def row_sumsq(x: torch.Tensor) -> torch.Tensor:
    """x ``[M, K]`` -> its rows' sums of squares, one part ``[1, M]`` fp32 (:class:`NormInput`)."""
    return x.float().pow(2).sum(-1)[None]


# (N, K, silu) -> the fastest config of the sweep at M = 64 on the H200 (benchmarks/gemm_bench.py,
# benchmarks/results/gemm_h200.json); shapes not listed use the rule in pick_config.
MEASURED: dict[tuple[int, int, bool], GemmConfig] = {
    # Qwen2-1.5B: q/k/v (+ the LoRA A rows of 32 r=8 q/v slots), o, gate/up, down
    (2048, 1536, False): GemmConfig(32, 64, 4),
    (2560, 1536, False): GemmConfig(64, 128, 3),
    (1536, 1536, False): GemmConfig(64, 64, 4),
    # gate/up: one program an SM (132, 8 warps) shares the 8960 columns evenly (68 each in
    # 128-wide tiles). With a plain input (the prescaled norm, or a norm kernel before it)
    # its x tiles join the weights' pipeline in shared memory, and 2 programs an SM at 64
    # columns and 5 stages no longer fit; measured in the PDL step against the 264-program
    # grid that served the norm inside the K steps (results/decode_step_h200_prescaled2.json).
    (8960, 1536, True): GemmConfig(128, 64, 1, num_warps=8, num_stages=4, programs=132),
    (1536, 8960, False): GemmConfig(64, 128, 4),
    # Llama-3-8B
    (6144, 4096, False): GemmConfig(64, 128, 1),
    (6656, 4096, False): GemmConfig(64, 128, 1),
    (4096, 4096, False): GemmConfig(64, 128, 2),
    (14336, 4096, True): GemmConfig(64, 128, 1, num_stages=3),
    (4096, 14336, False): GemmConfig(64, 128, 2),
}
# The rule for other shapes: split K until the grid has this many programs. In the sweep the
# best splits gave 96-128 programs at M = 64 (fewer programs leave SMs idle; more pieces
# cost a wider fp32 sum).
TARGET_PROGRAMS = 96


def block_m_for(m: int) -> int:
    """Rows per tile: the batch padded to a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, min(64, triton_next_pow2(m)))


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pick_config(
    m: int, n: int, k: int, silu: bool = False, sms: int = SM_COUNT_DEFAULT
) -> GemmConfig:
    """The config for one GEMM shape: measured if listed, else 64 x 128 tiles with K split
    until the grid has ~``TARGET_PROGRAMS`` programs (>= 4 K steps a piece). ``n`` is the
    output width (for ``silu``, the intermediate size: half the weight's rows)."""
    measured = MEASURED.get((n, k, silu))
    if measured is not None and m <= 64:
        return measured
    block_n, block_k = 64, 128
    tiles = math.ceil(n / block_n) * math.ceil(m / 64)
    k_steps = math.ceil(k / block_k)
    split = 1
    target = TARGET_PROGRAMS * sms // SM_COUNT_DEFAULT
    # silu * up needs whole sums in the epilogue: gate/up is wide enough not to split.
    while not silu and tiles * split < target and k_steps // (split * 2) >= 4:
        split *= 2
    return GemmConfig(block_n=block_n, block_k=block_k, split_k=split)


def supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """True when the kernel applies: triton, a CUDA (or interpreted) half-precision or fp32
    weight, few rows, contiguous K."""
    if triton is None or w.dim() not in (2, 3) or w.stride(-1) != 1:
        return False
    if not (w.is_cuda or INTERPRET):
        return False
    if x.dtype != w.dtype or w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return 0 < rows <= MAX_ROWS


def skinny_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemmConfig | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """``F.linear(x, w, bias)`` for x ``[..., K]`` with few rows; falls back to F.linear where
    the kernel does not apply. Accumulates in fp32, rounds once to x's dtype. ``pdl``: a
    programmatic dependent launch (:func:`launch_partials`), through the ``dlp::skinny_pdl``
    op under torch.compile."""
    if not supported(x, w):
        return F.linear(x, plain_weight(w, x.shape[-1]), bias)
    return _run(x, w, bias, weight_rows(w), False, config, pdl)


def skinny_silu_mul(
    x: torch.Tensor,
    w_gu: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemmConfig | None = None,
    pdl: bool = False,
    norm: NormInput | None = None,
) -> torch.Tensor:
    """``silu(gate) * up`` where ``[gate, up] = F.linear(x, w_gu, bias).chunk(2, -1)``: the
    MLP's merged gate/up weight ``[2 * inter, K]``. gate and up are rounded to x's dtype
    before the product, as the eager path does. ``norm``: x is read through it."""
    inter = weight_rows(w_gu) // 2
    if not supported(x, w_gu):
        w_gu = plain_weight(w_gu, x.shape[-1])
        gu = F.linear(norm.apply(x) if norm is not None else x, w_gu, bias)
        return F.silu(gu[..., :inter]) * gu[..., inter:]
    if norm is not None and norm.prescaled is not None:
        x = norm.prescaled  # the kernel reads x * weight and applies rstd after the product
    return _run(x, w_gu, bias, inter, True, config, pdl, norm)


def skinny_pieces(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemmConfig | None = None,
    pdl: bool = False,
    norm: NormInput | None = None,
) -> torch.Tensor:
    """``F.linear(x, w, bias)`` for x ``[..., K]`` as split-K pieces ``[pieces, rows, N]``
    whose sum is the product (fp32 pieces, or one piece in x's dtype), for a consumer that
    sums them itself (the rope attention kernel). One piece where the kernel does not apply.
    ``norm``: x is read through it."""
    x2 = x.reshape(-1, x.shape[-1])
    if not supported(x2, w):
        w = plain_weight(w, x2.shape[-1])
        return F.linear(norm.apply(x2) if norm is not None else x2, w, bias).unsqueeze(0)
    out = _partials(x2, w, bias, weight_rows(w), False, config, pdl, norm)
    return out if out.dim() == 3 else out.unsqueeze(0)


def _run(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    silu: bool,
    config: GemmConfig | None,
    pdl: bool = False,
    norm: NormInput | None = None,
) -> torch.Tensor:
    """x ``[..., K]`` as rows, the kernel, the split pieces summed: ``[..., n]``."""
    lead = x.shape[:-1]
    out = _partials(x.reshape(-1, x.shape[-1]), w, bias, n, silu, config, pdl, norm)
    return finish_partials(out, n, silu, x.dtype).reshape(*lead, n)


def _partials(
    x2: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    silu: bool,
    config: GemmConfig | None,
    pdl: bool,
    norm: NormInput | None = None,
) -> torch.Tensor:
    """Rows x2 ``[M, K]`` through the kernel (its config picked unless given): the output of
    :func:`launch_partials`, through the ``dlp::skinny_pdl`` op for a PDL launch."""
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    cfg = fit_config(config or pick_config(m, n, k, silu), w)
    if pdl:
        args = (cfg.block_n, cfg.block_k, cfg.split_k, cfg.num_warps, cfg.num_stages, cfg.programs)
        sumsq, gamma, eps = (norm.sumsq, norm.weight, norm.eps) if norm else (None, None, 0.0)
        after = norm is not None and norm.prescaled is not None
        return torch.ops.dlp.skinny_pdl(x2, w, bias, n, silu, *args, sumsq, gamma, eps, after)
    return launch_partials(x2, w, bias, m, n, k, cfg, silu, norm=norm)


def skinny_residual(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    counters: torch.Tensor,
    config: GemmConfig | None = None,
    pdl: bool = False,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``residual + F.linear(x, w, bias)`` (the product rounded to x's dtype first, as the
    eager ``x + linear(...)``) for rows x ``[M, K]`` and residual ``[M, N]``, with the new
    rows' partial sums of squares ``[parts, M]`` fp32 for the next GEMM's
    :class:`NormInput`: the residual add and the sums that the norm kernel after a split-K
    GEMM would compute happen in the GEMM's last piece per tile.

    ``counters``: int32 zeros, at least one per output tile (left at zero). ``scale`` [N]:
    also ``h * scale`` rounded to x's dtype (the next GEMM's :attr:`NormInput.prescaled`),
    else None third. Plain torch where the kernel does not apply."""
    if not supported(x, w):
        h = residual + F.linear(x, plain_weight(w, x.shape[-1]), bias)
        return h, row_sumsq(h), None if scale is None else (h.float() * scale.float()).to(h.dtype)
    x = x.contiguous()
    residual = residual.contiguous()
    m, k = x.shape
    cfg = fit_config(config or pick_config(m, weight_rows(w), k, False), w)
    if pdl:
        args = (cfg.block_n, cfg.block_k, cfg.split_k, cfg.num_warps, cfg.num_stages, cfg.programs)
        h, sumsq, scaled = torch.ops.dlp.skinny_residual_pdl(
            x, w, bias, residual, counters, *args, scale
        )
    else:
        h, sumsq, scaled = _launch_residual(x, w, bias, residual, counters, cfg, False, scale)
    return h, sumsq, scaled if scale is not None else None


def _launch_residual(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    counters: torch.Tensor,
    cfg: GemmConfig,
    pdl: bool,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The residual launch: (h, sumsq, h * scale), the last empty without ``scale``."""
    m, k = x.shape
    n = weight_rows(w)
    tiles = cfg.column_programs(n) * math.ceil(m / block_m_for(m))
    if counters.dtype != torch.int32 or counters.numel() < tiles:
        raise ValueError(f"counters must be int32 with >= {tiles} entries (one per tile)")
    split, _ = split_pieces(k, cfg)
    scratch = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    h = torch.empty((m, n), dtype=x.dtype, device=x.device)
    sumsq = torch.empty((cfg.column_programs(n), m), dtype=torch.float32, device=x.device)
    scaled = torch.empty((m, n) if scale is not None else (0,), dtype=x.dtype, device=x.device)
    residual_out = ResidualOut(residual, counters, h, sumsq, scale, scaled)
    launch_partials(x, w, bias, m, n, k, cfg, False, pdl, scratch, residual=residual_out)
    return h, sumsq, scaled


@dataclass(frozen=True)
class ResidualOut:
    """Buffers of a :func:`skinny_residual` launch: the residual read, the tile counters,
    and the outputs ``h`` ``[M, N]`` and ``sumsq`` ``[N tiles, M]`` (and ``scaled``)."""

    residual: torch.Tensor
    counters: torch.Tensor
    h: torch.Tensor
    sumsq: torch.Tensor
    scale: torch.Tensor | None = None  # with it, also h * scale into ``scaled``
    scaled: torch.Tensor | None = None


def launch_partials(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    m: int,
    n: int,
    k: int,
    cfg: GemmConfig,
    silu: bool,
    pdl: bool = False,
    out: torch.Tensor | None = None,
    norm: NormInput | None = None,
    residual: ResidualOut | None = None,
    trace: torch.Tensor | None = None,
) -> torch.Tensor:
    """The kernel alone: ``[m, n]`` in x's dtype when K is not split, else fp32 partials
    ``[split, m, n]`` (``[split, m, 2n]``, gate then up, for ``silu``).

    ``pdl`` launches it as a programmatic dependent launch (Hopper and later): it may start
    while the kernel before it finishes, waits for that kernel only where it first touches
    data (``griddepcontrol.wait``), and lets the next PDL kernel start once its K loop is done.
    (Letting the next kernel launch at once, and an L2 prefetch of weight tiles before the
    wait, were slower: ``benchmarks/results/pdl_h200_prefetch.json``, ``pdl_h200_overlap.json``.)
    ``out`` is written in place when given. ``norm``: x is read through it;
    ``residual``: the pieces (always ``[split, m, n]`` fp32, into ``out``) are summed by the
    kernel into ``residual.h`` and ``residual.sumsq`` (see :func:`skinny_residual`).
    ``trace``: int64 ``[programs, 4]``, where each program writes its SM and the GPU's
    global timer (ns) at its start, after its K loop and at its end
    (``benchmarks/gemm_timeline.py``: where a GEMM's time goes between its programs)."""
    # Triton's CPU interpreter has no griddepcontrol (inline asm): a plain launch there.
    pdl = pdl and not INTERPRET
    block_m = block_m_for(m)
    # A weight packed K step by K step (pack_k_steps) sets the K step; one K step apart in
    # its storage is a whole [N, block_k] slab (in a plain [N, K] weight, block_k elements).
    if w.dim() == 3:
        if w.shape[1] < n or w.shape[0] * w.shape[2] < k or w.numel() >= 2**31:
            raise ValueError(f"packed weight {tuple(w.shape)} does not hold N={n}, K={k}")
        cfg = fit_config(cfg, w)
        stride_wn, w_step = w.stride(1), w.stride(0)
    else:
        stride_wn, w_step = w.stride(0), cfg.block_k
    # Each pipeline stage holds an x tile and one (gate/up: two) weight tiles in shared
    # memory; fewer stages where they would not fit (fp32 tiles, gate/up at 64 x 128).
    stage_bytes = (block_m + (2 if silu else 1) * cfg.block_n) * cfg.block_k * x.element_size()
    stages = max(2, min(cfg.num_stages, SHARED_MEMORY_BYTES // stage_bytes))
    if stages != cfg.num_stages:
        cfg = dataclasses.replace(cfg, num_stages=stages)
    split, k_per_split = split_pieces(k, cfg)
    if residual is not None and silu:
        raise ValueError("a residual output is for plain GEMMs, not gate/up")
    if out is None and split == 1 and residual is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out is None:
        width = 2 * n if silu else n
        out = torch.empty((split, m, width), dtype=torch.float32, device=x.device)
    grid = (cfg.column_programs(n), split, math.ceil(m / block_m))
    # Arguments a mode does not use point at x (never read).
    sumsq_in, gamma, eps = (norm.sumsq, norm.weight, norm.eps) if norm else (x, x, 0.0)
    res = residual or ResidualOut(x, x, x, x)
    has_scale = res.scale is not None
    if trace is not None and (trace.dtype != torch.int64 or trace.numel() < 4 * math.prod(grid)):
        raise ValueError(f"trace must be int64 with [programs={math.prod(grid)}, 4] entries")
    _skinny_kernel[grid](
        x, w, bias if bias is not None else w, out,
        sumsq_in, gamma, res.residual, res.h, res.sumsq, res.counters,
        res.scale if has_scale else x, res.scaled if has_scale else x,
        trace if trace is not None else x,
        m, n, k, k_per_split,
        x.stride(0), stride_wn, w_step, out.stride(-2),
        out.stride(0) if out.dim() == 3 else 0,
        n, sumsq_in.shape[0] if norm else 0, eps,
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        HAS_BIAS=bias is not None,
        GATE_UP=silu,
        FUSE_SILU=silu and split == 1,
        EVEN_K=k % cfg.block_k == 0,
        EVEN_N=n % cfg.block_n == 0 and not cfg.programs,
        BALANCED=cfg.programs > 0,
        UPCAST=INTERPRET,
        # fp32 weights get exact fp32 dots (not tf32): the engine's fp32 path must match
        # F.linear token for token; bf16/fp16 ignore the setting.
        PRECISION="ieee" if w.dtype == torch.float32 else "tf32",
        USE_GDC=pdl,
        NORM_INPUT=norm is not None,
        NORM_AFTER=norm is not None and norm.prescaled is not None,
        HAS_SCALE=has_scale,
        RESIDUAL=residual is not None,
        PARTS_PAD=triton_next_pow2(sumsq_in.shape[0]) if norm else 1,
        SPLITS=split if residual is not None else 1,
        TRACE=trace is not None and not INTERPRET,  # inline asm: not in the interpreter
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip
    return out


def split_pieces(k: int, cfg: GemmConfig) -> tuple[int, int]:
    """(pieces, K per piece) of a split-K launch: every piece but the last covers the same
    whole number of BLOCK_K steps."""
    k_steps = math.ceil(k / cfg.block_k)
    split = max(1, min(cfg.split_k, k_steps))
    k_per_split = math.ceil(k_steps / split) * cfg.block_k
    return math.ceil(k / k_per_split), k_per_split


def partials_shape(m: int, n: int, k: int, cfg: GemmConfig, silu: bool) -> tuple[int, ...]:
    """Shape of :func:`launch_partials`' output (its dtype: x's unsplit, else fp32)."""
    split, _ = split_pieces(k, cfg)
    if split == 1:
        return (m, n)
    return (split, m, 2 * n if silu else n)


def finish_partials(out: torch.Tensor, n: int, silu: bool, dtype: torch.dtype) -> torch.Tensor:
    """Sum the split pieces of :func:`launch_partials` (and apply silu * up): plain torch, so
    under torch.compile it fuses into the kernel that consumes the result."""
    if out.dim() == 2:
        return out
    total = out.sum(0)
    if silu:
        gate = total[:, :n].to(dtype)
        up = total[:, n:].to(dtype)
        return F.silu(gate) * up
    return total.to(dtype)


# A PDL launch as an op Inductor does not look into. Traced as a user Triton kernel, the
# kernel's griddepcontrol instructions (inline asm) defeat Inductor's analysis of what it
# writes, and it then clones every input, the weights included (torch 2.11: 2.1x slower,
# benchmarks/results/pdl_h200.json). The op declares that it only returns a new tensor.
@torch.library.custom_op("dlp::skinny_pdl", mutates_args=())
def _skinny_pdl(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    silu: bool,
    block_n: int,
    block_k: int,
    split_k: int,
    num_warps: int,
    num_stages: int,
    programs: int,
    sumsq: torch.Tensor | None,
    gamma: torch.Tensor | None,
    eps: float,
    norm_after: bool = False,
) -> torch.Tensor:
    cfg = GemmConfig(block_n, block_k, split_k, num_warps, num_stages, programs)
    norm = None
    if sumsq is not None and gamma is not None:
        norm = NormInput(sumsq, gamma, eps, x if norm_after else None)
    m, k = x.shape
    return launch_partials(x, w, bias, m, n, k, cfg, silu, True, None, norm)


@_skinny_pdl.register_fake
def _skinny_pdl_fake(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    silu: bool,
    block_n: int,
    block_k: int,
    split_k: int,
    num_warps: int,
    num_stages: int,
    programs: int,
    sumsq: torch.Tensor | None,
    gamma: torch.Tensor | None,
    eps: float,
    norm_after: bool = False,
) -> torch.Tensor:
    cfg = GemmConfig(block_n, block_k, split_k, num_warps, num_stages, programs)
    shape = partials_shape(x.shape[0], n, x.shape[1], cfg, silu)
    return x.new_empty(shape, dtype=x.dtype if len(shape) == 2 else torch.float32)


# The residual GEMM's PDL launch (see dlp::skinny_pdl). It declares the counters it uses
# (each is back at zero when it returns).
@torch.library.custom_op("dlp::skinny_residual_pdl", mutates_args=("counters",))
def _skinny_residual_pdl(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    counters: torch.Tensor,
    block_n: int,
    block_k: int,
    split_k: int,
    num_warps: int,
    num_stages: int,
    programs: int,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = GemmConfig(block_n, block_k, split_k, num_warps, num_stages, programs)
    return _launch_residual(x, w, bias, residual, counters, cfg, True, scale)


@_skinny_residual_pdl.register_fake
def _skinny_residual_pdl_fake(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    counters: torch.Tensor,
    block_n: int,
    block_k: int,
    split_k: int,
    num_warps: int,
    num_stages: int,
    programs: int,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, n = x.shape[0], weight_rows(w)
    parts = GemmConfig(block_n, 1, 1, programs=programs).column_programs(n)
    scaled = x.new_empty((m, n) if scale is not None else (0,))
    return x.new_empty((m, n)), x.new_empty((parts, m), dtype=torch.float32), scaled


if triton is not None:

    @triton.jit
    def _skinny_kernel(
        X, W, Bias, Out,
        XSumsq, Gamma, Res, H, Sumsq, Counters, Scale, HScaled, Trace,
        M, N, K, K_PER_SPLIT,
        stride_xm, stride_wn, W_STEP, stride_om, stride_os,
        UP_OFFSET, SUMSQ_PARTS, eps,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        GATE_UP: tl.constexpr,
        FUSE_SILU: tl.constexpr,
        EVEN_K: tl.constexpr,
        EVEN_N: tl.constexpr,
        BALANCED: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        USE_GDC: tl.constexpr,
        NORM_INPUT: tl.constexpr,
        NORM_AFTER: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        RESIDUAL: tl.constexpr,
        PARTS_PAD: tl.constexpr,
        SPLITS: tl.constexpr,
        TRACE: tl.constexpr,
    ):  # fmt: skip
        # One loop, no nested jit function: Inductor reads a user kernel's stores to learn
        # which inputs it mutates, and clones every input (the weights!) where it cannot.
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        pid_m = tl.program_id(2)
        if TRACE:  # this program's SM and start time (ns)
            program = (pid_m * tl.num_programs(1) + pid_s) * tl.num_programs(0) + pid_n
            trace_at = Trace + program.to(tl.int64) * 4
            sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], tl.int32, False, 1)
            now = tl.inline_asm_elementwise(
                "mov.u64 $0, %globaltimer;", "=l", [], tl.int64, False, 1
            )
            tl.store(trace_at, sm.to(tl.int64))
            tl.store(trace_at + 1, now)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        kk = tl.arange(0, BLOCK_K)
        m_ok = rows < M
        if BALANCED:  # this program's even share of the N columns (<= BLOCK_N of them)
            col_lo = pid_n * N // tl.num_programs(0)
            cols = col_lo + tl.arange(0, BLOCK_N)
            n_ok = cols < (pid_n + 1) * N // tl.num_programs(0)
        else:
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = cols < N
        k_lo = pid_s * K_PER_SPLIT
        k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
        # int64 weight offsets: N * K passes 2^31 for big vocabularies.
        x_ptrs = X + rows[:, None].to(tl.int64) * stride_xm + kk[None, :]
        w_ptrs = W + cols[None, :].to(tl.int64) * stride_wn + kk[:, None]
        # gate/up: the up rows. (No .to() on the int argument: Inductor's mutation analysis
        # runs the kernel's Python with plain ints, fails on it and then clones every input.)
        up_rows = cols + UP_OFFSET
        up_ptrs = W + up_rows[None, :].to(tl.int64) * stride_wn + kk[:, None]
        if USE_GDC:
            # x (and, for the store, Out) belong to earlier kernels: wait for them from here.
            tl.extra.cuda.gdc_wait()
        if NORM_INPUT:
            # x is the residual stream and the GEMM reads RMSNorm(x) * Gamma, computed here
            # per tile: the row's sum of squares comes as SUMSQ_PARTS partial sums (written
            # by the kernel that produced x), added in a fixed order.
            # One load of every part (a loop of loads would wait out L2 latency per part).
            parts = tl.arange(0, PARTS_PAD)
            part_ptrs = XSumsq + parts[:, None] * M + rows[None, :]
            part_ok = (parts < SUMSQ_PARTS)[:, None] & m_ok[None, :]
            sumsq = tl.sum(tl.load(part_ptrs, mask=part_ok, other=0.0), 0)
            rstd = tl.math.rsqrt(sumsq / K + eps)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            # w is read as [BLOCK_K, BLOCK_N] (K contiguous), so x @ w is a plain dot. Its K
            # step starts W_STEP elements after the last one's (k0 // BLOCK_K steps in).
            w_at = (k0 // BLOCK_K) * W_STEP
            if EVEN_K:
                x_mask = m_ok[:, None]
                w_mask = n_ok[None, :]
            else:
                k_ok = (k0 + kk) < k_hi
                x_mask = m_ok[:, None] & k_ok[None, :]
                w_mask = n_ok[None, :] & k_ok[:, None]
            xt = tl.load(x_ptrs + k0, mask=x_mask, other=0.0)
            if NORM_INPUT and not NORM_AFTER:
                # rms_norm's roundings: x * rstd to x's dtype, then times the weight.
                if EVEN_K:
                    gamma = tl.load(Gamma + k0 + kk)
                else:
                    gamma = tl.load(Gamma + k0 + kk, mask=(k0 + kk) < k_hi, other=0.0)
                xt_n = (xt.to(tl.float32) * rstd[:, None]).to(xt.dtype)
                xt = (xt_n.to(tl.float32) * gamma.to(tl.float32)[None, :]).to(xt.dtype)
            if EVEN_K and EVEN_N:
                wt = tl.load(w_ptrs + w_at)
            else:
                wt = tl.load(w_ptrs + w_at, mask=w_mask, other=0.0)
            if UPCAST:  # Triton's CPU interpreter mis-multiplies bf16 dots: fp32 there
                xt = xt.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
            if GATE_UP:
                if EVEN_K and EVEN_N:
                    ut = tl.load(up_ptrs + w_at)
                else:
                    ut = tl.load(up_ptrs + w_at, mask=w_mask, other=0.0)
                if UPCAST:
                    ut = ut.to(tl.float32)
                acc_up = tl.dot(xt, ut, acc_up, input_precision=PRECISION)
        if TRACE:
            now = tl.inline_asm_elementwise(
                "mov.u64 $0, %globaltimer;", "=l", [], tl.int64, False, 1
            )
            tl.store(trace_at + 2, now)
        if USE_GDC:
            tl.extra.cuda.gdc_launch_dependents()
        if NORM_AFTER:  # x came as x * Gamma: the norm's rstd scales the product instead
            acc = acc * rstd[:, None]
            if GATE_UP:
                acc_up = acc_up * rstd[:, None]
        if HAS_BIAS:  # noqa: SIM102 - triton: `and` of a constexpr and a runtime value
            if pid_s == 0:  # the bias belongs to one piece of a split sum only
                acc += tl.load(Bias + cols, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                if GATE_UP:
                    up_b = tl.load(Bias + UP_OFFSET + cols, mask=n_ok, other=0.0)
                    acc_up += up_b.to(tl.float32)[None, :]
        out_ok = m_ok[:, None] & n_ok[None, :]
        o_ptrs = Out + pid_s.to(tl.int64) * stride_os + rows[:, None] * stride_om + cols[None, :]
        if FUSE_SILU:
            # Same roundings as the eager path: gate and up to the dtype, then silu(g) * u.
            # (The product of two rounded values is exact in fp32: one rounding at the store.)
            dt = Out.dtype.element_ty
            gate = acc.to(dt).to(tl.float32)
            up = acc_up.to(dt).to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
            tl.store(o_ptrs, (act * up).to(dt), mask=out_ok)
        elif GATE_UP:  # split pieces: gate and up partials side by side, [.., 2N]
            tl.store(o_ptrs, acc, mask=out_ok)
            tl.store(o_ptrs + UP_OFFSET, acc_up, mask=out_ok)
        elif RESIDUAL:
            # H = Res + (x @ w^T) and each row's sum of squares of H over this tile. Every
            # piece lands in Out (fp32 [split, M, N]); the tile's last piece to finish (a
            # counter per tile) sums them in piece order, so the result does not depend on
            # which finished last, and sets the counter back to 0 for the next kernel.
            tl.store(o_ptrs, acc, mask=out_ok)
            # The residual tile, loaded by every piece before the count: the last one then
            # waits for the count and the pieces only, not for this load too.
            res_ptrs = rows[:, None] * stride_om + cols[None, :]
            res = tl.load(Res + res_ptrs, mask=out_ok, other=0.0)
            tl.debug_barrier()  # every thread's piece is stored before the count
            tile = pid_m * tl.num_programs(0) + pid_n
            done = tl.atomic_add(Counters + tile, 1, sem="acq_rel")
            if done == SPLITS - 1:
                total = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
                t_ptrs = Out + rows[:, None] * stride_om + cols[None, :]
                for piece in tl.static_range(SPLITS):  # unrolled: the loads go out together
                    # .cg: from L2, where the other programs' pieces are (L1 is not coherent)
                    at = t_ptrs + piece * stride_os
                    total += tl.load(at, mask=out_ok, other=0.0, cache_modifier=".cg")
                tl.store(Counters + tile, 0)
                # The eager path's roundings: the product to x's dtype, then the sum.
                dt = X.dtype.element_ty
                h = (res.to(tl.float32) + total.to(dt).to(tl.float32)).to(dt)
                tl.store(H + res_ptrs, h, mask=out_ok)
                hf = h.to(tl.float32)
                if HAS_SCALE:  # h * Scale for the next GEMM's prescaled input
                    g = tl.load(Scale + cols, mask=n_ok, other=0.0).to(tl.float32)
                    tl.store(HScaled + res_ptrs, (hf * g[None, :]).to(dt), mask=out_ok)
                tl.store(Sumsq + pid_n * M + rows, tl.sum(hf * hf, 1), mask=m_ok)
        else:
            tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=out_ok)
        if TRACE:
            tl.debug_barrier()  # every thread's stores are issued
            now = tl.inline_asm_elementwise(
                "mov.u64 $0, %globaltimer;", "=l", [], tl.int64, False, 1
            )
            tl.store(trace_at + 3, now)
