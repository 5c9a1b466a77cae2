"""The decode-step benchmark's pure parts (the benchmark itself needs a GPU): per-variant GEMM
configs parsed from the variant name and the timeline of one
step read from a profiler trace."""

from __future__ import annotations

import pytest
from bench_modules import load


def _bench():
    return load("decode_step_bench")


def test_variant_names_carry_gemm_configs() -> None:
    from dlp.engine.skinny_gemm import GemmConfig

    bench = _bench()
    base, overrides = bench.split_variant("step+rope+pdl+gu=64x64x1x4x5+down=32x128x4x4x3")
    assert base == "step+rope+pdl"
    assert overrides == {"gu": GemmConfig(64, 64, 1, 4, 5), "down": GemmConfig(32, 128, 4, 4, 3)}
    assert overrides["down"].name() == "32x128x4x4x3"
    assert bench.split_variant("step+rope+pdl") == ("step+rope+pdl", {})
    with pytest.raises(ValueError, match="ROLE"):
        bench.split_variant("step+rope+pdl+mlp=64x64x1x4x5")
    for bad in ("64x64", "64x64x1x4x0", "64xAx1x4x5"):
        with pytest.raises(ValueError, match="BNxBK"):
            bench.split_variant(f"step+rope+pdl+gu={bad}")
    # the greedy kernels' sizes: pieces a row x logits a load
    base, overrides = bench.split_variant("step+rope+pdl+unprescaled+argmax=32x8192")
    assert base == "step+rope+pdl+unprescaled" and base in bench.VARIANTS
    assert overrides == {"argmax": (32, 8192)}
    for bad in ("32", "32x0", "ax8"):
        with pytest.raises(ValueError, match="CHUNKSxBLOCK"):
            bench.split_variant(f"step+rope+pdl+argmax={bad}")
    # the attention kernel's launch: keys a block x warps x stages
    base, overrides = bench.split_variant("step+rope+pdl+attn=32x8x2+argmax=16x2048")
    assert base == "step+rope+pdl"
    assert overrides == {"attn": (32, 8, 2), "argmax": (16, 2048)}
    # the weights packed K step by K step
    assert bench.split_variant("step+rope+pdl+packed=gu.down")[1] == {"packed": ("gu", "down")}
    assert bench.split_variant("step+rope+pdl+packed=")[1] == {"packed": ()}
    for bad in ("mlp", "gu.gu", "qkvl"):
        with pytest.raises(ValueError, match="packed=ROLE"):
            bench.split_variant(f"step+rope+pdl+packed={bad}")
    for bad in ("64x4", "64x4x0", "64x4x3x1"):
        with pytest.raises(ValueError, match="BLOCKNxWARPSxSTAGES"):
            bench.split_variant(f"step+rope+pdl+attn={bad}")
    # the residual + norm kernel's programs a row, the lm_head's BLAS library
    base, overrides = bench.split_variant("step+rope+pdl+norm=2+blas=cublas")
    assert base == "step+rope+pdl"
    assert overrides == {"norm": 2, "blas": "cublas"}
    with pytest.raises(ValueError, match="PROGRAMS_A_ROW"):
        bench.split_variant("step+rope+pdl+norm=x")
    with pytest.raises(ValueError, match="blas=cublas"):
        bench.split_variant("step+rope+pdl+blas=rocblas")


def _kernel(name: str, ts: float, dur: float, grid: list[int]) -> dict:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"grid": grid}}


def test_timeline_adds_up_overlapping_kernels_per_layer_position() -> None:
    # Two replays of a two-layer step: norm, qkv, attention, o per layer; under PDL each
    # kernel starts 1 us before the one before it ends.
    def step(t0: float) -> list[dict]:
        out, t = [], t0
        for _ in range(2):
            for name, dur in (("norm", 3.0), ("gemm", 5.0), ("_decode_attn_kernel", 9.0)):
                out.append(_kernel(name, t, dur, [1, 1, 1]))
                t += dur - 1.0
            out.append(_kernel("gemm", t, 4.0, [24, 4, 1]))
            t += 4.0
        return out

    events = step(0.0) + step(100.0) + [{"ph": "X", "cat": "cpu_op", "name": "x", "ts": 1}]
    timeline = _bench().step_timeline(events, steps=2)
    kernels = timeline["kernels"]
    assert len(kernels) == 8 and kernels[0]["start_us"] == 0.0
    # Added times tile the step: they sum to its span, and a kernel adds its end minus the
    # previous end (4 us for a 5 us kernel that started 1 us early).
    assert sum(k["added_us"] for k in kernels) == pytest.approx(timeline["step_us"])
    assert kernels[1]["added_us"] == pytest.approx(4.0)
    by = timeline["by_position"]
    # Layer positions: before the first attention ("pre"), the attention (0), then after it.
    assert by["pre:norm:[1, 1, 1]"]["count"] == 1
    assert by["0:_decode_attn_kernel:[1, 1, 1]"]["count"] == 2
    assert by["1:gemm:[24, 4, 1]"]["count"] == 2
    assert by["3:gemm:[1, 1, 1]"] == {"count": 1, "added_us": 4.0, "dur_us": 5.0}
