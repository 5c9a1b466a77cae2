"""End-to-end ``evaluate`` on the tiny model: all systems, the sweep and mixed prompts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_lora_mix import _random_adapter

from dlp.eval.cli import main as eval_main
from dlp.eval.lora_mix import MultiLoraModel
from dlp.eval.mixed import build_mixed, example_key, part_messages
from dlp.eval.report import plot_all, target_checks
from dlp.eval.routing_probs import RouterOutputs
from dlp.eval.run import EvalSettings, evaluate
from dlp.eval.systems import mix_key, system_mix, weight_row
from dlp.training.adapters import COMPOSITE_NAME
from dlp.training.examples import examples_from_table, load_table, task_names

SETTINGS = EvalSettings(sweep=(0.3, 0.9), max_new_tokens=4, max_part_tokens=40)


def test_system_rules():
    labels = ["a", "b", "c"]
    probs = np.array([0.5, 0.3, 0.2])
    assert system_mix("base", "a", probs, labels) == {}
    assert system_mix("oracle", "c", probs, labels) == {"c": 1.0}
    assert system_mix("top1", "c", probs, labels) == {"a": 1.0}
    assert system_mix("composite", "c", probs, labels) == {COMPOSITE_NAME: 1.0}
    # p=0.6: keeps a (0.5 < 0.6) and b (crosses p).
    soft = system_mix("dlp", "a", probs, labels, 0.6)
    renorm = system_mix("dlp_renorm", "a", probs, labels, 0.6)
    e = np.exp([0.5, 0.3])
    assert soft == pytest.approx({"a": e[0] / e.sum(), "b": e[1] / e.sum()}, abs=1e-3)
    assert renorm == pytest.approx({"a": 0.625, "b": 0.375}, abs=1e-3)
    assert mix_key({}) == "base" and mix_key({"b": 0.5, "a": 0.5}) == "a=0.500,b=0.500"
    assert weight_row({"b": 1.0}, ["a", "b"]) == (0.0, 1.0)


def _setup(tiny_model, data_dir: Path, tmp_path: Path, confident: bool):
    table = load_table(data_dir)
    tasks = task_names(table)
    test = examples_from_table(table, "test")
    dirs = [_random_adapter(tiny_model, tmp_path / t, 8, 16, i) for i, t in enumerate(tasks)]
    dirs.append(_random_adapter(tiny_model, tmp_path / COMPOSITE_NAME, 16, 32, 99))
    mlm = MultiLoraModel.from_dirs(tiny_model, dirs, [*tasks, COMPOSITE_NAME])
    rng = np.random.default_rng(0)
    probs = {}
    for ex in test:
        p = rng.dirichlet(np.ones(len(tasks)))
        if confident:
            p = np.eye(len(tasks))[tasks.index(ex.task)]
        probs[example_key(ex)] = p
    mixed = build_mixed(test, 5, seed=1)
    for m in mixed:
        probs[m.id] = rng.dirichlet(np.ones(len(tasks)))
    routing = RouterOutputs(labels=tasks, probs=probs, mixed=mixed, meta={})
    return mlm, test, routing


def test_with_a_perfect_router_dlp_top1_and_oracle_coincide(
    tiny_model, tokenizer, data_dir: Path, tmp_path: Path
):
    mlm, test, routing = _setup(tiny_model, data_dir, tmp_path, confident=True)
    result = evaluate(mlm, tokenizer, test, routing, SETTINGS)
    for table in ("mcq_accuracy", "generative_rougeL", "generative_bleu"):
        assert result[table]["dlp"] == result[table]["oracle"] == result[table]["top1"]
        assert set(result[table]) == {"base", "oracle", "dlp", "dlp_renorm", "top1", "composite"}
    assert result["router_accuracy"]["dlp"] == 100.0
    assert result["router_accuracy"]["base"] is None
    assert result["mean_adapters"] == {
        "base": 0.0,
        "oracle": 1.0,
        "dlp": 1.0,
        "dlp_renorm": 1.0,
        "top1": 1.0,
        "composite": 1.0,
    }
    # Equal (prompt, mix) pairs are computed once.
    assert result["evaluator"]["computed"] < result["evaluator"]["requested"]
    assert set(result["mixed_task"]) == {"base", "oracle", "dlp", "dlp_prompt", "composite"}
    assert result["mixed_task"]["dlp"] == result["mixed_task"]["oracle"]
    for task, info in result["per_task"].items():
        assert info["router_top1"] == 100.0
        for scores in info["systems"].values():
            assert all(0.0 <= v <= 100.0 for v in scores.values()), task
    checks = target_checks(result, 100.0)
    assert checks["router_top1_ge_98.5"]["holds"]
    assert checks["dlp_mcq_minus_oracle_ge_-0.5"]["value"] == 0.0
    assert checks["dlp_mcq_minus_oracle_ge_-0.5"]["holds"]
    assert {p.name for p in plot_all(result, tmp_path / "plots")} == {
        "quality_per_task.png",
        "quality_p_sweep.png",
        "quality_mixed.png",
    }


def test_an_unsure_router_fuses_several_adapters(
    tiny_model, tokenizer, data_dir: Path, tmp_path: Path
):
    mlm, test, routing = _setup(tiny_model, data_dir, tmp_path, confident=False)
    result = evaluate(mlm, tokenizer, test, routing, SETTINGS)
    sweep = result["p_sweep"]
    assert set(sweep) == {"dlp@0.3", "dlp@0.9", "dlp_renorm@0.3", "dlp_renorm@0.9"}
    assert sweep["dlp@0.9"]["mean_adapters"] > sweep["dlp@0.3"]["mean_adapters"] >= 1.0
    assert result["mean_adapters"]["dlp"] > 1.0


def test_mixed_prompts_are_deterministic_multi_task_chats(data_dir: Path):
    test = examples_from_table(load_table(data_dir), "test")
    a, b = build_mixed(test, 20, seed=3), build_mixed(test, 20, seed=3)
    assert a == b
    index = {example_key(e): e for e in test}
    for m in a:
        tasks = [index[k].task for k in m.parts]
        assert 2 <= len(tasks) <= 3 and len(set(tasks)) == len(tasks)
    parts = [index[k] for k in a[0].parts]
    msgs = part_messages(parts, 1)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[1]["content"] == parts[0].target


def test_router_outputs_round_trip(tmp_path: Path):
    out = RouterOutputs(
        labels=["a", "b"], probs={"x/1": np.array([0.25, 0.75])}, mixed=[], meta={"k": 1}
    )
    out.save(tmp_path / "r.json")
    back = RouterOutputs.load(tmp_path / "r.json")
    assert back.labels == ["a", "b"] and np.array_equal(back.get("x/1"), [0.25, 0.75])
    (tmp_path / "bad.json").write_text(
        json.dumps({"format": 1, "labels": ["a"], "probs": {"x": [1, 2]}})
    )
    from dlp.errors import DlpError

    with pytest.raises(DlpError, match="router-probs"):
        RouterOutputs.load(tmp_path / "bad.json")


def test_cli_route_only_needs_a_file(data_dir: Path, capsys):
    assert eval_main(["eval", "--route-only", "--data", str(data_dir)]) == 2
    assert "router-probs" in capsys.readouterr().err


def test_cli_reports_missing_adapters(data_dir: Path, tmp_path: Path, capsys):
    probs = tmp_path / "probs.json"
    test = examples_from_table(load_table(data_dir), "test")
    tasks = task_names(load_table(data_dir))
    RouterOutputs(
        labels=tasks,
        probs={example_key(e): np.full(len(tasks), 1 / len(tasks)) for e in test},
        mixed=[],
        meta={},
    ).save(probs)
    code = eval_main(
        [
            "eval",
            "--data",
            str(data_dir),
            "--router-probs",
            str(probs),
            "--adapters",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "q.json"),
        ]
    )
    assert code == 2
    assert "adapters: missing adapter dir" in capsys.readouterr().err


def test_paired_deltas_equal_the_full_evaluation_difference(
    tiny_model, tokenizer, data_dir: Path, tmp_path: Path
):
    from dlp.eval.run import paired_deltas

    mlm, test, routing = _setup(tiny_model, data_dir, tmp_path, confident=False)
    routing.mixed = []
    full = evaluate(mlm, tokenizer, test, routing, SETTINGS)
    deltas = paired_deltas(mlm, tokenizer, test, routing, SETTINGS)
    for system in ("dlp", "dlp_renorm", "top1"):
        d = deltas["deltas"][system]
        for table, key in (
            ("mcq_accuracy", "mcq_accuracy"),
            ("generative_rougeL", "generative_rougeL"),
            ("generative_rouge1", "generative_rouge1"),
        ):
            expected = full[table][system] - full[table]["oracle"]
            assert d[key] == pytest.approx(expected, abs=2e-3), (system, table)
    assert 0 < deltas["examples_scored"] <= len(test)


def test_cli_routes_the_whole_test_split_when_the_sample_is_capped(tmp_path: Path):
    """--max-per-task caps what the LLM scores, but --deltas-full and the router's top-1
    read every test example's router outputs: routing must cover the whole split."""
    from dlp.paths import cache_dir, data_dir, router_dir

    if (
        not (router_dir(cache_dir()) / "router.json").is_file()
        or not (data_dir(cache_dir()) / "tasks.parquet").is_file()
    ):
        pytest.skip("default router or task data not built (run `dlp setup`)")
    probs = tmp_path / "probs.json"
    code = eval_main(
        [
            "eval",
            "--route-only",
            "--router-probs",
            str(probs),
            "--max-per-task",
            "1",
            "--mixed",
            "3",
        ]
    )
    assert code == 0
    routing = RouterOutputs.load(probs)
    test = examples_from_table(load_table(data_dir(cache_dir())), "test")
    assert len(test) > 26  # more than the capped sample of one per task
    for ex in test:
        assert routing.get(example_key(ex)).shape == (len(routing.labels),)
    assert len(routing.mixed) == 3
