"""The fusion benchmark's every code path (variants a-g, scale run, cold loads, report, PNG)
on tiny versions of its GPU architectures, on the CPU."""

from __future__ import annotations

import argparse
import json

import pytest

from dlp.engine.bench_args import add_arguments
from dlp.engine.bench_fusion import (
    BenchConfig,
    config_from_args,
    main,
    mean_decode_position,
    summary_lines,
)
from dlp.errors import DlpError


def tiny_bench(out, **overrides) -> BenchConfig:
    """Every variant and the scale run on two tiny shapes, sized for the CPU."""
    fields = dict(
        device="cpu",
        shapes=("tiny-qwen2", "tiny-llama3"),
        batch=6,
        prompt=8,
        new=6,
        adapters=5,
        pool_slots=6,
        repeats=1,
        f_new=4,
        g_new=4,
        g_time_s=5.0,
        scale=True,
        scale_shape="tiny-qwen2",
        scale_catalogue=40,
        scale_requests=12,
        scale_slots=24,
        out=str(out),
    )
    return BenchConfig(**{**fields, **overrides})


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap_steps"])
def test_fusion_bench_runs_all_variants(tmp_path, overlap):
    out = tmp_path / "fusion.json"
    cfg = tiny_bench(out, overlap_steps=overlap)
    report = main(cfg, command="test")
    saved = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    for key in (
        "ratio_dlp_to_base_time",
        "ratio_dlp_to_peft_mixed_throughput",
        "decode_step_to_floor",
        "ratio_1000_to_8_adapters_throughput",
        "cold_load_ms",
        "command",
        "machine",
        "date",
    ):
        assert key in saved
    for shape in cfg.shapes:
        r = report["shapes"][shape]
        assert set("abcdefg") <= set(r["variants"])
        assert r["variants"]["a"]["tokens"] == cfg.batch * cfg.new
        assert r["variants"]["c"]["tokens"] == cfg.batch * cfg.new
        assert r["variants"]["f"]["tokens"] == cfg.batch * cfg.f_new
        assert saved["ratio_dlp_to_base_time"][shape] > 0
        assert r["distinct_mixes"] >= 2
    scale = report["shapes"]["tiny-qwen2"]["scale"]
    assert scale["40"]["distinct_adapters"] > scale["pool_slots"] or scale["40"]["pool_loads"]
    assert saved["cold_load_ms"] > 0


def test_scale_only_runs_item_6_alone(tmp_path):
    """--scale-only: the scale engine and the cold loads, no variant engine or baselines."""
    out = tmp_path / "scale.json"
    cfg = tiny_bench(out, scale_only=True)
    report = main(cfg, command="test")
    saved = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert all("variants" not in r for r in report["shapes"].values())
    assert "scale" not in report["shapes"]["tiny-llama3"]
    scale = report["shapes"]["tiny-qwen2"]["scale"]
    assert scale["40"]["tokens"] == scale["8"]["tokens"] > 0
    assert (
        saved["ratio_1000_to_8_adapters_throughput"] == scale["ratio_1000_to_8_adapters_throughput"]
    )
    assert saved["cold_load_ms"] > 0
    assert any("scale 40/8" in line for line in summary_lines(report))


def test_scale_only_and_no_scale_exclude_each_other():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--scale-only", "--no-scale"])
    with pytest.raises(DlpError, match="--scale-only and --no-scale"):
        config_from_args(args)


def test_residual_norm_programs_come_from_the_command_line():
    """--residual-norm N: the PDL step's residual add + norm kernel (residual_norm.SPLIT_N)
    for the run (the engine's own by default); < 0 refused."""
    from dlp.engine import residual_norm

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    default = config_from_args(parser.parse_args(["--device", "cpu"])).residual_norm_programs
    assert default == residual_norm.SPLIT_N == 1
    cfg = config_from_args(parser.parse_args(["--device", "cpu", "--residual-norm", "0"]))
    assert cfg.residual_norm_programs == 0
    with pytest.raises(DlpError, match="--residual-norm"):
        config_from_args(parser.parse_args(["--device", "cpu", "--residual-norm", "-1"]))


def test_a_run_records_its_residual_norm_programs(tmp_path):
    """The setting is in the report's config (merges check it) and set back after the run."""
    from dlp.engine import residual_norm

    before = residual_norm.SPLIT_N
    out = tmp_path / "fusion.json"
    cfg = tiny_bench(out, shapes=("tiny-qwen2",), scale=False, residual_norm_programs=0)
    main(cfg, command="test")
    assert json.loads(out.read_text())["config"]["residual_norm_programs"] == 0
    assert before == residual_norm.SPLIT_N


@pytest.mark.parametrize(("prompt", "new"), [(128, 128), (32, 16), (5, 1), (100, 7)])
def test_the_timed_step_reads_the_keys_the_floor_counts(prompt, new):
    """The graph step is timed at the middle decode position: its keys a row (position + 1)
    are the mean over the run's decode steps (positions prompt .. prompt + new - 2, after
    the prefill's first token) to within one key, as the memory floor counts them."""
    keys = mean_decode_position(prompt, new) + 1
    steps = range(prompt, prompt + new - 1) or [prompt]
    mean_keys = sum(p + 1 for p in steps) / len(steps)
    assert abs(keys - mean_keys) <= 1.0
    assert abs(keys - (prompt + (new + 1) / 2)) <= 1.0  # memory_floor_ms's mean context


def test_a_scale_run_merges_into_a_variants_report(tmp_path):
    """--merge-scale: a --no-scale report and a --scale-only report of the same engine
    settings become one report with the headline of both (both commands kept, PNG redrawn);
    a scale run of other engine settings is refused."""
    from dlp.engine.bench_fusion import cli_main

    variants_out, scale_out = tmp_path / "fusion.json", tmp_path / "scale.json"
    main(tiny_bench(variants_out, shapes=("tiny-qwen2",), scale=False), command="variants")
    main(tiny_bench(scale_out, shapes=("tiny-qwen2",), scale_only=True), command="scale")
    before = json.loads(variants_out.read_text())
    assert before["cold_load_ms"] is None and before["ratio_1000_to_8_adapters_throughput"] is None
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--merge-scale", str(scale_out), "--out", str(variants_out)])
    assert cli_main(args) == 0
    merged = json.loads(variants_out.read_text())
    scale = json.loads(scale_out.read_text())
    assert merged["shapes"]["tiny-qwen2"]["variants"] == before["shapes"]["tiny-qwen2"]["variants"]
    assert merged["shapes"]["tiny-qwen2"]["scale"] == scale["shapes"]["tiny-qwen2"]["scale"]
    assert merged["cold_load_ms"] == scale["cold_load_ms"] > 0
    assert (
        merged["ratio_1000_to_8_adapters_throughput"]
        == scale["ratio_1000_to_8_adapters_throughput"]
    )
    assert merged["decode_step_to_floor"] == before["decode_step_to_floor"]
    assert (merged["command"], merged["scale_command"]) == ("variants", "scale")
    assert variants_out.with_suffix(".png").stat().st_size > 0
    other = json.loads(scale_out.read_text())
    other["config"]["decode_gemm"] = "cublas"
    scale_out.write_text(json.dumps(other))
    with pytest.raises(DlpError, match="decode_gemm"):
        cli_main(args)
