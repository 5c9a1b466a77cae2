"""skinny_gemm's fused norm and residual modes against plain torch: a GEMM that reads its
input through RMSNorm (:class:`NormInput`) against ``rms_norm`` then ``F.linear``, and
:func:`skinny_residual` (split-K pieces summed by the last program per tile, the residual
added, the rows' sums of squares) against ``residual + F.linear``.

The kernels run under Triton's CPU interpreter in one child process (triton_interpreter.py);
the CUDA runs are in test_engine_cuda.py.
"""

from __future__ import annotations

import pytest
from triton_interpreter import interpreted_fixture

# name -> (dtype, rows, N, K, bias, config (block_n, block_k, split_k[, warps, stages,
# programs])): splits that do and do not divide K, one piece, rows past one tile, ragged N,
# columns shared evenly by a given number of programs (one sums-of-squares part each).
CASES = {
    "f32_split3_ragged": ("float32", 5, 100, 192, True, (32, 64, 3)),
    "f32_unsplit": ("float32", 3, 64, 128, False, (32, 64, 1)),
    "f32_two_m_tiles": ("float32", 70, 64, 96, False, (32, 32, 2)),
    "bf16_split4": ("bfloat16", 17, 128, 256, True, (64, 64, 4)),
    "f32_balanced_split2": ("float32", 6, 100, 128, True, (32, 32, 2, 4, 2, 5)),
}

_CHILD = """
    import torch
    import torch.nn.functional as F

    from dlp.engine.model import rms_norm
    from dlp.engine.skinny_gemm import (
        GemmConfig, NormInput, row_sumsq, skinny_pieces, skinny_residual, skinny_silu_mul,
    )

    def err(a, b):
        return (a.float() - b.float()).abs().max().item()

    results = {}
    for name, (dtype, m, n, k, bias, cfg) in json.loads(sys.argv[1]).items():
        torch.manual_seed(0)
        dt = getattr(torch, dtype)
        cfg = GemmConfig(*cfg)
        x = torch.randn(m, k).to(dt)
        gamma = (1 + 0.1 * torch.randn(k)).to(dt)
        w = (torch.randn(2 * n, k) * k**-0.5).to(dt)
        b = torch.randn(2 * n).to(dt) if bias else None
        # x's sums of squares as two parts (as a residual GEMM with two tiles leaves them)
        sumsq = torch.stack([half.float().pow(2).sum(-1) for half in x.chunk(2, -1)])
        norm = NormInput(sumsq, gamma, 1e-6)
        normed = rms_norm(x, gamma, 1e-6)
        ref = F.linear(normed.float(), w[:n].float(), None if b is None else b[:n].float())
        pieces = skinny_pieces(x, w[:n], None if b is None else b[:n], cfg, norm=norm)
        gu = F.linear(normed.float(), w.float(), None if b is None else b.float()).to(dt)
        ref_act = F.silu(gu[:, :n]) * gu[:, n:]
        act = skinny_silu_mul(x, w, b, cfg, norm=norm)

        # residual + x2 @ w^T with x2 [m, n] -> [m, n]
        x2 = torch.randn(m, n).to(dt)
        w2 = (torch.randn(n, n) * n**-0.5).to(dt)
        b2 = torch.randn(n).to(dt) if bias else None
        res = torch.randn(m, n).to(dt)
        counters = torch.zeros(64, dtype=torch.int32)
        h, parts, none = skinny_residual(x2, w2, b2, res, counters, cfg)
        gamma2 = gamma[:n] if k >= n else (1 + 0.1 * torch.randn(n)).to(dt)
        h_s, parts_s, scaled = skinny_residual(x2, w2, b2, res, counters, cfg, scale=gamma2)
        # gate/up reading h * gamma2 and applying rstd after the product, against rms_norm
        norm_after = NormInput(parts_s, gamma2, 1e-6, prescaled=scaled)
        w3 = (torch.randn(2 * n, n) * n**-0.5).to(dt)
        gu3 = F.linear(rms_norm(h, gamma2, 1e-6).float(), w3.float()).to(dt)
        act_after_ref = F.silu(gu3[:, :n]) * gu3[:, n:]
        act_after = skinny_silu_mul(h_s, w3, None, cfg, norm=norm_after)
        h_ref = res + F.linear(x2.float(), w2.float(), None if b2 is None else b2.float()).to(dt)
        results[name] = {
            "pieces_err": err(pieces.sum(0), ref),
            "act_shape": list(act.shape),
            "act_err": err(act, ref_act),
            "h_dtype": str(h.dtype),
            "h_err": err(h, h_ref),
            "parts_shape": list(parts.shape),
            # the parts of h's sums of squares add up to the row's (of h as returned)
            "sumsq_err": err(parts.sum(0), row_sumsq(h)[0]),
            "counters_zero": bool((counters == 0).all()),
            "third_none": none is None,
            # with scale: the same h and sums, and h * scale rounded once
            "scaled_same_h": bool(torch.equal(h_s, h) and torch.equal(parts_s, parts)),
            "scaled_err": err(scaled, (h.float() * gamma2.float()).to(dt)),
            "scaled_max": scaled.float().abs().max().item(),
            "act_after_err": err(act_after, act_after_ref),
            "act_after_ref_max": act_after_ref.float().abs().max().item(),
            # and they feed a normed GEMM like rms_norm of h does
            "chain_err": err(
                skinny_pieces(h, w2, None, cfg, norm=NormInput(parts, gamma[:n], 1e-6)).sum(0),
                F.linear(rms_norm(h, gamma[:n], 1e-6).float(), w2.float()),
            ),
        }
    print(json.dumps(results))
"""
TOL = {"float32": 1e-4, "bfloat16": 5e-2}


interpreted = interpreted_fixture(_CHILD, CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_normed_input_matches_rms_norm_then_linear(interpreted, name):
    dtype, m, n, *_ = CASES[name]
    got = interpreted[name]
    assert got["pieces_err"] < TOL[dtype]
    assert got["act_shape"] == [m, n]
    # silu(gate) * up of bf16-rounded gate/up: one rounding step of each, times the other
    assert got["act_err"] < 4 * TOL[dtype]
    assert got["chain_err"] < TOL[dtype] * 4


@pytest.mark.parametrize("name", list(CASES))
def test_residual_gemm_matches_residual_plus_linear(interpreted, name):
    dtype, m, n, _, _, (block_n, *rest) = CASES[name]
    programs = rest[4] if len(rest) > 4 else 0
    got = interpreted[name]
    assert got["h_dtype"] == f"torch.{dtype}"
    # bf16: the product and the sum are each rounded once, as in the eager path
    assert got["h_err"] < (TOL[dtype] if dtype == "float32" else 0.07)
    assert got["parts_shape"] == [programs or -(-n // block_n), m]
    assert got["sumsq_err"] < 1e-3 * max(1.0, n)
    assert got["counters_zero"]  # every tile's counter is back at zero for the next kernel
    assert got["third_none"]


@pytest.mark.parametrize("name", list(CASES))
def test_prescaled_rows_and_the_rstd_after_the_product(interpreted, name):
    """skinny_residual(scale=g) also writes h * g (one rounding); gate/up reading it with the
    rstd applied after its product (NormInput.prescaled) matches rms_norm then the GEMM up to
    where the roundings fall (bf16: a rounding step of gate/up, as the fused modes above)."""
    dtype = CASES[name][0]
    got = interpreted[name]
    assert got["scaled_same_h"]
    # fp32: exact; bf16: within two rounding steps (the interpreter emulates bf16 casts)
    assert got["scaled_err"] <= (0.0 if dtype == "float32" else got["scaled_max"] * 2**-6)
    tol = 4 * TOL[dtype] if dtype == "float32" else got["act_after_ref_max"] * 2**-6
    assert got["act_after_err"] < tol, got
