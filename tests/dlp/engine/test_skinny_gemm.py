"""skinny_gemm: the weight-streaming decode GEMMs against F.linear, and the engine's decode
step with them against the step with F.linear.

No GPU in CI: the kernels run under Triton's CPU interpreter in one child process
(triton_interpreter.py); the CUDA cases are in test_engine_cuda.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import interpreted_fixture

from dlp.engine import skinny_gemm as sg
from dlp.engine.skinny_gemm import GemmConfig, pick_config

# name -> (dtype, rows, N, K, bias, config (block_n, block_k, split_k[, warps, stages,
# programs])). Covers: one row, rows beyond one BLOCK_M tile, N and K that are not multiples of
# the blocks, splits that do not divide the K steps (and more splits than K steps), bias with
# and without a split, and the columns shared evenly by a given number of programs (each
# fewer than block_n: masked, unaligned column starts).
CASES = {
    "f32_one_row": ("float32", 1, 96, 64, True, (32, 32, 1)),
    "f32_ragged_split3": ("float32", 5, 100, 200, True, (32, 64, 3)),
    "f32_two_m_tiles": ("float32", 70, 64, 96, False, (32, 32, 2)),
    "f32_more_splits_than_steps": ("float32", 3, 48, 64, True, (16, 32, 8)),
    "bf16_rows17_split2": ("bfloat16", 17, 128, 256, False, (64, 64, 2)),
    "bf16_bias_unsplit": ("bfloat16", 8, 64, 128, True, (32, 64, 1)),
    "f32_balanced_split3": ("float32", 5, 100, 200, True, (32, 64, 3, 4, 2, 4)),
    "bf16_balanced_7_programs": ("bfloat16", 8, 96, 128, True, (32, 64, 1, 4, 2, 7)),
}
TOL = {"float32": 1e-4, "bfloat16": 3e-2}

_CHILD = """
    import torch
    import torch.nn.functional as F

    from dlp.engine.model import CompactLM
    from dlp.engine.skinny_gemm import (
        GemmConfig, pack_k_steps, plain_weight, skinny_linear, skinny_silu_mul,
    )
    from engine_helpers import tiny_model

    def err(a, b):
        return (a.float() - b.float()).abs().max().item()

    results = {}
    for name, (dtype, m, n, k, bias, cfg) in json.loads(sys.argv[1]).items():
        torch.manual_seed(0)
        dt = getattr(torch, dtype)
        cfg = GemmConfig(*cfg)
        x = torch.randn(m, k).to(dt)
        w = (torch.randn(2 * n, k) * k**-0.5).to(dt)
        b = torch.randn(2 * n).to(dt) if bias else None
        ref = F.linear(x.float(), w[:n].float(), None if b is None else b[:n].float())
        out = skinny_linear(x, w[:n], None if b is None else b[:n], cfg)
        gu = F.linear(x.float(), w.float(), None if b is None else b.float()).to(dt)
        ref_act = F.silu(gu[:, :n]) * gu[:, n:]
        act = skinny_silu_mul(x, w, b, cfg)
        # The same config on one program per tile: each column's sum runs in the same order.
        tiled = GemmConfig(cfg.block_n, cfg.block_k, cfg.split_k, cfg.num_warps, cfg.num_stages)
        results[name] = {
            "shape": list(out.shape),
            "dtype": str(out.dtype),
            "err": err(out, ref),
            "act_shape": list(act.shape),
            "act_err": err(act, ref_act),
            "act_ref_max": ref_act.float().abs().max().item(),
            "vs_tiled": err(out, skinny_linear(x, w[:n], None if b is None else b[:n], tiled)),
            "act_vs_tiled": err(act, skinny_silu_mul(x, w, b, tiled)),
            # The weights packed K step by K step: the same sums in the same order.
            "packed_same": torch.equal(
                skinny_linear(x, pack_k_steps(w[:n], cfg.block_k), b if b is None else b[:n], cfg),
                out,
            ),
            "act_packed_same": torch.equal(
                skinny_silu_mul(x, pack_k_steps(w, cfg.block_k), b, cfg), act
            ),
            "unpacked_same": torch.equal(plain_weight(pack_k_steps(w, cfg.block_k), k), w),
        }

    # The decode step of a tiny Qwen2 (q/k/v bias) and Llama with the kernels against F.linear.
    for kind in ("qwen2", "llama"):
        model = CompactLM(tiny_model(kind), max_batch=3, max_seq=32)
        tokens = torch.tensor([5, 17, 200])
        positions = torch.tensor([0, 3, 9])
        with torch.no_grad():
            plain = model.decode(tokens, positions, None)
            model.decode_gemm = True
            fast = model.decode(tokens, positions, None)
            # The PDL step's ops (launched plainly here) with the norms inside the GEMMs and
            # rope + cache write inside the attention kernel (which reads q/k/v pieces).
            model.decode_pdl = model.decode_fuse_norms = model.attn_rope = True
            model.attn_splits = 1
            fused = model.decode(tokens, positions, None)
            # ... with gate/up reading o's prescaled rows, the rstd after its product
            model.decode_prescale_norm = True
            prescaled = model.decode(tokens, positions, None)
            # ... with every GEMM's weight packed K step by K step: the same bits
            model.pack_decode_weights(("qkv", "o", "gu", "down"))
            packed = model.decode(tokens, positions, None)
        results[f"decode_{kind}"] = {
            "err": err(fast, plain),
            "argmax_same": bool((fast.argmax(-1) == plain.argmax(-1)).all()),
            "fused_err": err(fused, plain),
            "fused_argmax_same": bool((fused.argmax(-1) == plain.argmax(-1)).all()),
            "prescaled_err": err(prescaled, plain),
            "prescaled_argmax_same": bool((prescaled.argmax(-1) == plain.argmax(-1)).all()),
            "packed_same": torch.equal(packed, prescaled),
            "packed_roles": list(model.decode_packed),
        }
    print(json.dumps(results))
"""


interpreted = interpreted_fixture(_CHILD, CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_f_linear(interpreted, name):
    dtype, m, n, *_ = CASES[name]
    res = interpreted[name]
    assert res["shape"] == [m, n] and res["act_shape"] == [m, n]
    assert res["dtype"] == f"torch.{dtype}"
    assert res["err"] < TOL[dtype], res
    # silu(gate) * up: gate and up are rounded first, so bf16 may differ by a rounding step
    # (of values up to act_ref_max: 2^-7 relative).
    assert res["act_err"] < max(4 * TOL[dtype], res["act_ref_max"] * 2**-7 * 2), res
    # Columns shared evenly by programs: the same bits as one program per tile.
    assert res["vs_tiled"] == 0.0 and res["act_vs_tiled"] == 0.0, res
    # Weights packed K step by K step (pack_k_steps; K zero-padded where ragged): same bits.
    assert res["packed_same"] and res["act_packed_same"] and res["unpacked_same"], res


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_decode_step_with_the_kernels_matches_f_linear(interpreted, kind):
    res = interpreted[f"decode_{kind}"]
    assert res["err"] < 1e-4 and res["argmax_same"], res
    # the norms fused into the GEMMs: the same step up to fp32 summation order
    assert res["fused_err"] < 1e-4 and res["fused_argmax_same"], res
    # ... and with the rstd applied after gate/up's product (NormInput.prescaled)
    assert res["prescaled_err"] < 1e-4 and res["prescaled_argmax_same"], res
    # ... and with the four GEMMs' weights packed (CompactLM.pack_decode_weights): same bits
    assert res["packed_same"] and res["packed_roles"] == ["qkv", "o", "gu", "down"], res


def test_pick_config_uses_the_measured_table_and_the_rule():
    # Measured on the H200 (benchmarks/results/gemm_h200.json): Qwen2-1.5B down at M = 64.
    assert pick_config(64, 1536, 8960) == GemmConfig(64, 128, 4)
    # ... and its gate/up, measured inside the PDL step: columns shared by one program an SM.
    gate_up = GemmConfig(128, 64, 1, num_warps=8, num_stages=4, programs=132)
    assert pick_config(64, 8960, 1536, silu=True) == gate_up
    assert pick_config(64, 8960, 1536, silu=True).column_programs(8960) == 132
    assert GemmConfig(64, 64, 1, programs=264).column_programs(8960) == 264
    assert GemmConfig(32, 64, 1).column_programs(8960) == 280  # one a tile
    with pytest.raises(ValueError, match="block_n"):
        GemmConfig(32, 64, 1, programs=264).column_programs(8960)  # 34 columns > 32
    # Not measured: split K until ~96 programs, never the gate/up with silu.
    assert pick_config(64, 1024, 4096).split_k == 8  # 16 tiles -> 128 programs
    assert pick_config(64, 8192, 4096).split_k == 1  # 128 tiles already
    assert pick_config(64, 3000, 2048, silu=True).split_k == 1
    assert pick_config(64, 1024, 512).split_k == 1  # 4 K steps: too few to split
    # More rows than one tile: more tiles, so fewer pieces.
    assert pick_config(128, 1024, 4096).split_k == 4


def test_falls_back_to_f_linear_where_the_kernel_does_not_apply(monkeypatch):
    x = torch.randn(3, 16)
    w = torch.randn(8, 16)
    # CPU tensors outside the interpreter: F.linear.
    monkeypatch.setattr(sg, "INTERPRET", False)
    assert not sg.supported(x, w)
    torch.testing.assert_close(sg.skinny_linear(x, w), F.linear(x, w))
    gu = F.linear(x, w)
    torch.testing.assert_close(sg.skinny_silu_mul(x, w), F.silu(gu[:, :4]) * gu[:, 4:])
    # Too many rows, mixed dtypes, a transposed weight: never the kernel.
    monkeypatch.setattr(sg, "INTERPRET", True)
    if sg.triton is not None:
        assert sg.supported(x, w)
    assert not sg.supported(torch.randn(sg.MAX_ROWS + 1, 16), w)
    assert not sg.supported(x.double(), w)
    assert not sg.supported(x.double(), w.double())  # tl.dot has no fp64
    assert not sg.supported(x, torch.randn(16, 8).t())
