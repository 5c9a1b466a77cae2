"""How the engine's "auto" decode settings resolve (dlp/engine/decode_path.py), per device."""

from __future__ import annotations

import pytest
from engine_helpers import tiny_model

from dlp.engine.config import EngineConfig
from dlp.engine.decode_path import DecodePath, DeviceTraits, resolve_decode_path
from dlp.engine.model import CompactLM
from dlp.engine.runner import DecodeRunner

HOPPER = DeviceTraits(cuda=True, triton=True, capability_major=9)
AMPERE = DeviceTraits(cuda=True, triton=True, capability_major=8)
CPU = DeviceTraits(cuda=False, triton=True)
FAST = DecodePath("step", "triton_rope", "triton_pdl")


def _resolve(
    traits: DeviceTraits,
    scope: str = "auto",
    attention: str = "auto",
    gemm: str = "auto",
    *,
    compile: bool = True,
    cuda_graph: bool = True,
    compile_mode: str | None = None,
    max_seq: int = 256,
    splits: int = 1,
) -> DecodePath:
    return resolve_decode_path(
        scope,
        attention,
        gemm,
        traits=traits,
        compile=compile,
        cuda_graph=cuda_graph,
        compile_mode=compile_mode,
        max_seq=max_seq,
        attention_splits=splits,
    )


def test_auto_takes_the_fast_path_on_hopper_with_compile_and_graphs():
    path = _resolve(HOPPER)
    assert path == FAST and path.fast
    assert path.as_dict() == {
        "compile_scope": "step",
        "attention": "triton_rope",
        "gemm": "triton_pdl",
    }
    # Explicit settings that agree with it keep it; the other autos follow them.
    assert _resolve(HOPPER, gemm="triton_pdl") == FAST
    assert _resolve(HOPPER, scope="step", attention="triton_rope") == FAST


@pytest.mark.parametrize(
    "why",
    [
        dict(traits=AMPERE),  # no PDL before sm_90
        dict(traits=DeviceTraits(cuda=True, triton=False, capability_major=9)),
        dict(traits=HOPPER, compile=False),
        dict(traits=HOPPER, cuda_graph=False),
        dict(traits=HOPPER, compile_mode="max-autotune-no-cudagraphs"),
        dict(traits=HOPPER, splits=4),  # a split attention puts a plain merge kernel in the chain
    ],
)
def test_auto_keeps_the_earlier_choices_where_the_fast_path_was_not_built_to_run(why):
    traits = why.pop("traits")
    short = _resolve(traits, max_seq=256, **why)
    assert not short.fast
    assert short.compile_scope == "layer" and short.gemm == "cublas"
    # The Triton attention still takes long caches on CUDA, the GEMMs over the cache short ones.
    assert short.attention == "matmul"
    long = _resolve(traits, max_seq=2048, **why)
    assert long.attention == ("triton" if traits.triton else "matmul")


def test_explicit_settings_are_kept_and_the_autos_follow_them():
    # A plain attention or a per-layer scope asked for: no PDL chain around it.
    assert _resolve(HOPPER, attention="triton") == DecodePath("layer", "triton", "cublas")
    assert _resolve(HOPPER, attention="matmul") == DecodePath("layer", "matmul", "cublas")
    assert _resolve(HOPPER, scope="layer") == DecodePath("layer", "matmul", "cublas")
    assert _resolve(HOPPER, gemm="cublas") == DecodePath("layer", "matmul", "cublas")
    assert _resolve(HOPPER, gemm="triton", max_seq=4096) == DecodePath("layer", "triton", "triton")
    # Explicit PDL GEMMs with an explicit plain attention stay as asked (the runner warns).
    assert _resolve(HOPPER, attention="triton", gemm="triton_pdl") == DecodePath(
        "layer", "triton", "triton_pdl"
    )


def test_cpu_autos_resolve_to_the_plain_step():
    assert _resolve(CPU) == DecodePath("layer", "matmul", "cublas")
    assert _resolve(CPU, max_seq=4096, compile=False, cuda_graph=False) == DecodePath(
        "layer", "matmul", "cublas"
    )


def test_cpu_runner_and_engine_config_report_the_resolved_path():
    """The runner keeps what it resolved (the engine's stats and the benchmarks report it);
    the engine config takes "auto" for the scope, its default."""
    config = EngineConfig()
    config.validate()
    assert (config.compile_scope, config.decode_attention, config.decode_gemm) == ("auto",) * 3
    runner = DecodeRunner(CompactLM(tiny_model("qwen2"), max_batch=4, max_seq=64), n_slots=0)
    assert runner.decode_path == DecodePath("layer", "matmul", "cublas")
    assert runner.model.attn_splits == 0 and not runner.model.decode_gemm
    assert not runner.model.decode_pdl
