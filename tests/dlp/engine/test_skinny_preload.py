"""skinny_gemm's weight preloading (``GemmConfig.preload``): a program that loads its whole
weight slice before it waits for x gives the same bits as the pipelined K loop of the same
config, for plain GEMMs (split pieces or one piece) and the residual GEMM; the decode step
with its o GEMM preloading (and the attention letting it launch early) gives the same logits.

The kernels run under Triton's CPU interpreter in one child process (triton_interpreter.py);
the CUDA runs are in test_engine_cuda.py.
"""

from __future__ import annotations

import pytest
from triton_interpreter import run_interpreted

from dlp.engine.skinny_gemm import MAX_PRELOAD_STEPS, GemmConfig, preload_steps

# name -> (dtype, rows, N, K, bias, config (block_n, block_k, split_k, warps, stages,
# programs)): 1 to MAX_PRELOAD_STEPS steps a piece, one piece and several, ragged N, rows past
# one tile, columns shared evenly by programs.
CASES = {
    "f32_one_step_split4": ("float32", 5, 96, 128, True, (32, 32, 4, 4, 2, 0)),
    "f32_four_steps_unsplit": ("float32", 3, 100, 128, False, (32, 32, 1, 4, 2, 0)),
    "bf16_three_steps_split2": ("bfloat16", 17, 128, 192, True, (64, 32, 2, 4, 2, 0)),
    "f32_two_m_tiles": ("float32", 70, 64, 64, False, (32, 32, 1, 4, 2, 0)),
    "f32_balanced": ("float32", 6, 100, 128, True, (32, 32, 2, 4, 2, 5)),
}

_CHILD = """
    import dataclasses

    import torch

    from dlp.engine import skinny_gemm as sg
    from dlp.engine.model import CompactLM
    from dlp.engine.skinny_gemm import GemmConfig, skinny_pieces, skinny_residual
    from engine_helpers import tiny_model

    def same(a, b):
        return bool(torch.equal(a, b))

    results = {}
    for name, (dtype, m, n, k, bias, cfg) in json.loads(sys.argv[1]).items():
        torch.manual_seed(0)
        dt = getattr(torch, dtype)
        looped = GemmConfig(*cfg)
        pre = dataclasses.replace(looped, preload=1)
        x = torch.randn(m, k).to(dt)
        w = (torch.randn(n, k) * k**-0.5).to(dt)
        b = torch.randn(n).to(dt) if bias else None
        res = torch.randn(m, n).to(dt)
        counters = torch.zeros(64, dtype=torch.int32)
        h_loop, parts_loop = skinny_residual(x, w, b, res, counters, looped)
        h_pre, parts_pre = skinny_residual(x, w, b, res, counters, pre)
        results[name] = {
            "steps": sg.preload_steps(k, pre),
            "pieces_same": same(skinny_pieces(x, w, b, pre), skinny_pieces(x, w, b, looped)),
            "residual_same": same(h_pre, h_loop) and same(parts_pre, parts_loop),
            "counters_zero": bool((counters == 0).all()),
        }

    # The decode step of a tiny Qwen2 (hidden 64) with the PDL step's ops launched plainly,
    # its o GEMM (64 x 64) preloading or looping over the same 32-wide K steps.
    o_key = (64, 64, False)
    model = CompactLM(tiny_model("qwen2"), max_batch=3, max_seq=32)
    model.decode_gemm = model.decode_pdl = model.decode_fuse_norms = model.attn_rope = True
    model.attn_splits = 1
    tokens = torch.tensor([5, 17, 200])
    positions = torch.tensor([0, 3, 9])
    logits = {}
    preloads = []  # the steps of every launch that preloaded: the o GEMM's, 2 a layer
    steps = sg.preload_steps
    sg.preload_steps = lambda *a, **kw: preloads.append(steps(*a, **kw)) or preloads[-1]
    for preload in (0, 1):
        sg.MEASURED[o_key] = GemmConfig(32, 32, 1, 4, 2, 0, preload)
        with torch.no_grad():
            logits[preload] = model.decode(tokens, positions, None)
    results["decode"] = {"same": same(logits[0], logits[1]), "preloads": [p for p in preloads if p]}
    print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    return run_interpreted(_CHILD, CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_preloaded_weights_give_the_k_loops_bits(interpreted, name):
    got = interpreted[name]
    _, _, _, k, _, (_, block_k, split, *_) = CASES[name]
    assert got["steps"] == k // block_k // split
    assert got["pieces_same"], got
    assert got["residual_same"] and got["counters_zero"], got


def test_decode_step_with_a_preloading_o_gemm_gives_the_same_logits(interpreted):
    got = interpreted["decode"]
    assert got["preloads"] == [2, 2]  # the o GEMM of each of the 2 layers: 2 K steps of 32
    assert got["same"]


def test_preload_steps_and_the_configs_it_refuses():
    pre = GemmConfig(64, 128, 4, preload=1)
    assert preload_steps(1536, pre) == 3  # the Qwen2-1.5B o GEMM: 3 steps of 128 a piece
    assert preload_steps(1536, GemmConfig(64, 128, 4)) == 0  # not asked for
    with pytest.raises(ValueError, match="gate/up or norm"):
        preload_steps(1536, pre, silu=True)
    with pytest.raises(ValueError, match="gate/up or norm"):
        preload_steps(1536, pre, norm=True)
    with pytest.raises(ValueError, match="at most"):  # 6 steps a piece
        preload_steps(1536, GemmConfig(64, 64, 4, preload=1))
    with pytest.raises(ValueError, match="whole BLOCK_K"):  # a ragged last step
        preload_steps(1500, pre)
    assert MAX_PRELOAD_STEPS == 4


def test_config_names_carry_preload():
    cfg = GemmConfig.parse("64x128x4x4x1x0x1")
    assert cfg == GemmConfig(64, 128, 4, 4, 1, programs=0, preload=1)
    assert cfg.name() == "64x128x4x4x1x0x1"
    assert GemmConfig.parse(cfg.name()) == cfg
    assert GemmConfig(64, 64, 1, programs=264).name() == "64x64x1x4x5x264"
    with pytest.raises(ValueError, match="PRELOAD 0 or 1"):
        GemmConfig.parse("64x128x4x4x1x0x2")
