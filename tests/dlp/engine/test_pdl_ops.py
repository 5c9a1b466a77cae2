"""The PDL launches' torch ops (``dlp::skinny_pdl``, ``dlp::decode_attention_rope_pdl``,
``dlp::greedy_pdl``, ``dlp::skinny_residual_pdl``, ``dlp::residual_norm_pdl``): Inductor
sees only their declared contracts, so those must be right.
``torch.library.opcheck`` runs each op for real (under Triton's CPU interpreter, where the
kernels launch without PDL) and against its fake: schema, declared mutations (the caches and
nothing else), output shapes, dtypes and strides. The CUDA runs are in test_engine_cuda.py."""

from __future__ import annotations

import pytest
from triton_interpreter import interpreted_fixture

CASES = {
    "skinny_split": "skinny",  # fp32 split-K pieces
    "skinny_unsplit": "skinny_one",  # one piece in x's dtype
    "skinny_silu": "silu",
    "skinny_normed": "normed",  # the input read through RMSNorm
    "skinny_residual": "residual",  # residual add + sums of squares; declares its counters
    "skinny_residual_balanced": "residual_balanced",  # columns shared evenly by 3 programs
    "skinny_residual_scaled": "residual_scaled",  # also h * scale (the prescaled norm input)
    "skinny_normed_after": "normed_after",  # prescaled input, rstd after the product
    "skinny_silu_balanced": "silu_balanced",
    "rope": "rope",
    "rope_pieces": "rope_pieces",
    "greedy": "greedy",
    "residual_norm": "residual_norm",
    "residual_norm_split": "residual_norm_split",  # two programs a row
}

_CHILD = """
    import torch

    import dlp.engine.decode_attention  # noqa: F401 - registers the ops
    import dlp.engine.greedy_kernel  # noqa: F401
    import dlp.engine.residual_norm  # noqa: F401
    import dlp.engine.skinny_gemm  # noqa: F401

    def args_for(kind):
        torch.manual_seed(0)
        if kind in ("residual", "residual_balanced", "residual_scaled"):
            x, w = torch.randn(5, 64).bfloat16(), torch.randn(40, 64).bfloat16()
            res, counters = torch.randn(5, 40).bfloat16(), torch.zeros(8, dtype=torch.int32)
            cfg = (32, 16, 2, 4, 2, 3 if kind == "residual_balanced" else 0)
            scale = torch.randn(40).bfloat16() if kind == "residual_scaled" else None
            return torch.ops.dlp.skinny_residual_pdl, (x, w, None, res, counters, *cfg, scale)
        if kind in ("normed", "normed_after"):
            x, w = torch.randn(5, 64).bfloat16(), torch.randn(40, 64).bfloat16()
            norm = (torch.rand(2, 5) * 64, torch.randn(64).bfloat16(), 1e-6)
            cfg = (32, 16, 2, 4, 2, 0)
            after = kind == "normed_after"
            return torch.ops.dlp.skinny_pdl, (x, w, None, 40, False, *cfg, *norm, after)
        if kind in ("skinny", "skinny_one", "silu", "silu_balanced"):
            # bf16: the unsplit output keeps x's dtype, split pieces are fp32.
            x = torch.randn(5, 64).bfloat16()
            silu = kind.startswith("silu")
            w = torch.randn(96 if silu else 40, 64).bfloat16()
            bias = torch.randn(w.shape[0]).bfloat16()
            n = w.shape[0] // 2 if silu else w.shape[0]
            split = 1 if kind != "skinny" else 2
            cfg = (32, 16, split, 4, 2, 5 if kind == "silu_balanced" else 0)
            no_norm = (None, None, 0.0)
            return torch.ops.dlp.skinny_pdl, (x, w, bias, n, silu, *cfg, *no_norm)
        if kind == "greedy":
            return torch.ops.dlp.greedy_pdl, (torch.randn(3, 700),)
        if kind.startswith("residual_norm"):
            pieces, res, w = torch.randn(4, 3, 96), torch.randn(3, 96).bfloat16(), torch.randn(96)
            split = 2 if kind.endswith("split") else 1
            return torch.ops.dlp.residual_norm_pdl, (pieces, res, w.bfloat16(), 1e-6, split)
        b, h, kvh, d, s = 2, 4, 2, 16, 40
        pieces = 3 if kind == "rope_pieces" else 1
        parts = torch.randn(pieces, b, (h + 2 * kvh) * d)
        q = parts[..., : h * d].view(pieces, b, h, d)
        k = parts[..., h * d : (h + kvh) * d].view(pieces, b, kvh, d)
        v = parts[..., (h + kvh) * d :].view(pieces, b, kvh, d)
        if pieces == 1:
            q, k, v = q[0], k[0], v[0]
        angles = torch.rand(b, d // 2)
        cos = torch.cat([angles.cos()] * 2, -1)
        sin = torch.cat([angles.sin()] * 2, -1)
        caches = torch.randn(b, kvh, s, d), torch.randn(b, kvh, s, d)
        lengths = torch.tensor([40, 7])
        return torch.ops.dlp.decode_attention_rope_pdl, (
            q, k, v, cos, sin, *caches, lengths, d**-0.5, None
        )

    out = {}
    for name, kind in json.loads(sys.argv[1]).items():
        op, args = args_for(kind)
        try:
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
            out[name] = "ok"
        except Exception as exc:
            out[name] = f"{type(exc).__name__}: {str(exc)[:600]}"
    print(json.dumps(out))
"""


interpreted = interpreted_fixture(_CHILD, CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_op_contract_holds(interpreted, name):
    assert interpreted[name] == "ok"
