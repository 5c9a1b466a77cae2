"""residual_norm: the decode step's residual add + RMSNorm kernel against the eager
arithmetic (``x + sum(pieces)`` then ``rms_norm``), under Triton's CPU interpreter (one child
process for every case), and on the GPU where there is one."""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import interpreted_fixture

from dlp.engine.model import rms_norm
from dlp.engine.residual_norm import residual_rms_norm, residual_rms_norm_reference

# name -> (rows, width, pieces, dtype, programs a row)
CASES = {
    "qwen2_width_bf16": (3, 1536, 4, "bfloat16", 1),
    "one_piece_bf16": (2, 1536, 1, "bfloat16", 1),  # an unsplit GEMM's one piece
    "ragged_f32": (5, 96, 3, "float32", 1),  # width not a power of two
    "two_programs_a_row": (3, 1000, 2, "bfloat16", 2),
    "three_programs_a_row": (2, 96, 4, "float32", 3),
}

_CHILD = """
    import torch

    from dlp.engine import residual_norm
    from dlp.engine.residual_norm import residual_rms_norm, residual_rms_norm_reference

    out = {}
    for name, (rows, width, pieces, dtype, split) in json.loads(sys.argv[1]).items():
        torch.manual_seed(0)
        dt = getattr(torch, dtype)
        parts = torch.randn(pieces, rows, width) * 0.3
        if pieces == 1:
            parts = parts.to(dt)  # one piece comes in the model dtype
        res = torch.randn(rows, width).to(dt)
        w = (torch.rand(width) + 0.5).to(dt)
        residual_norm.SPLIT_N = split
        x, h = residual_rms_norm(parts, res, w, 1e-6)
        rx, rh = residual_rms_norm_reference(parts, res, w, 1e-6)
        out[name] = {
            "x_equal": torch.equal(x, rx),
            "x_max_diff": (x.float() - rx.float()).abs().max().item(),
            "x_ulp": (rx.float().abs().max() * (2**-7 if dt == torch.bfloat16 else 2**-22)).item(),
            "h_max_diff": (h.float() - rh.float()).abs().max().item(),
            "h_ulp": (rh.float().abs().max() * (2**-7 if dt == torch.bfloat16 else 2**-22)).item(),
            "dtypes": [str(x.dtype), str(h.dtype)],
        }
    print(json.dumps(out))
"""


interpreted = interpreted_fixture(_CHILD, CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_the_eager_arithmetic(interpreted, name):
    """fp32: x bit for bit (same sum order), the norm within one rounding (the kernel's sum
    of squares is a tree sum, torch's mean another order). bf16: the interpreter emulates
    bf16 casts (not round-to-nearest-even), so within two roundings of the output dtype
    (bit for bit on the GPU: test_cuda_matches_the_eager_arithmetic)."""
    res = interpreted[name]
    dtype = "torch." + CASES[name][3]
    assert res["dtypes"] == [dtype, dtype]
    if dtype == "torch.float32":
        assert res["x_equal"], res
    assert res["x_max_diff"] <= 2 * res["x_ulp"], res
    assert res["h_max_diff"] <= 2 * res["h_ulp"], res


def test_reference_is_the_models_residual_add_and_rms_norm():
    torch.manual_seed(1)
    pieces = torch.randn(3, 4, 64)
    res = torch.randn(4, 64).bfloat16()
    w = torch.randn(64).bfloat16()
    x, h = residual_rms_norm_reference(pieces, res, w, 1e-5)
    want_x = res + pieces.sum(0).to(torch.bfloat16)
    assert torch.equal(x, want_x)
    assert torch.equal(h, rms_norm(want_x, w, 1e-5))


def test_falls_back_to_the_reference_off_the_gpu():
    pieces, res, w = torch.randn(2, 3, 32), torch.randn(3, 32), torch.randn(32)
    x, h = residual_rms_norm(pieces, res, w, 1e-6)
    rx, rh = residual_rms_norm_reference(pieces, res, w, 1e-6)
    assert torch.equal(x, rx) and torch.equal(h, rh)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("pdl", [False, True])
def test_cuda_matches_the_eager_arithmetic(pdl, monkeypatch):
    from dlp.engine import residual_norm

    monkeypatch.setattr(residual_norm, "SPLIT_N", 1)
    gen = torch.Generator(device="cuda").manual_seed(0)
    pieces = torch.randn(4, 64, 1536, generator=gen, device="cuda") * 0.3
    res = torch.randn(64, 1536, generator=gen, device="cuda").bfloat16()
    w = (torch.rand(1536, generator=gen, device="cuda") + 0.5).bfloat16()
    x, h = residual_rms_norm(pieces, res, w, 1e-6, pdl=pdl)
    rx, rh = residual_rms_norm_reference(pieces, res, w, 1e-6)
    assert torch.equal(x, rx)
    assert (h.float() - rh.float()).abs().max().item() <= rh.float().abs().max().item() * 2**-7
