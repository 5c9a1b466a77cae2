"""The real bigbench==1.0.0 sdist: all 26 tasks, splits, and no boilerplate left.

Uses the default cache (``dlp setup`` / ``make test`` put the sdist and its extracted task
files there); the first run ever downloads the sdist with pip (~360 MB).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from dlp.data.dataset import load_tasks
from dlp.data.prepare import prepare
from dlp.data.splits import SplitConfig
from dlp.data.strip import common_prefix, common_suffix
from dlp.data.tasks import POOL
from dlp.paths import cache_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("real")
    return prepare(out, cache_root=cache_dir(), cfg=SplitConfig(seed=0, max_train=400))


def test_pool_is_26_tasks_17_mcq_9_generative(real: Path) -> None:
    table = load_tasks(real)
    kinds = dict(zip(table["task"].to_pylist(), table["kind"].to_pylist(), strict=True))
    assert len(kinds) == len(POOL) == 26
    assert Counter(kinds.values()) == {"mcq": 17, "generative": 9}


def test_every_task_has_enough_examples_and_balanced_train(real: Path) -> None:
    table = load_tasks(real)
    counts = Counter(zip(table["task"].to_pylist(), table["split"].to_pylist(), strict=True))
    for spec in POOL:
        assert 300 <= counts[(spec.name, "train")] <= 400, spec.name
        assert counts[(spec.name, "validation")] >= 90, spec.name
        assert counts[(spec.name, "test")] >= 190, spec.name


def test_no_input_in_two_splits_and_valid_targets(real: Path) -> None:
    rows = load_tasks(real).to_pylist()
    where: dict[tuple[str, str], set[str]] = {}
    for r in rows:
        where.setdefault((r["task"], " ".join(r["input"].split())), set()).add(r["split"])
        assert r["input"].strip() and r["target"].strip()
        if r["kind"] == "mcq":
            assert len(r["choices"]) >= 2 and r["target"] in r["choices"]
        else:
            assert r["choices"] == []
    assert all(len(splits) == 1 for splits in where.values())


def test_no_fixed_boilerplate_left(real: Path) -> None:
    table = load_tasks(real)
    by_task: dict[str, list[str]] = {}
    by_sub: dict[tuple[str, str], list[str]] = {}
    for task, sub, text in zip(
        table["task"].to_pylist(),
        table["subtask"].to_pylist(),
        table["input"].to_pylist(),
        strict=True,
    ):
        by_task.setdefault(task, []).append(text)
        by_sub.setdefault((task, sub), []).append(text)
    for key, texts in by_sub.items():
        assert common_prefix(texts) == "", key
        assert common_suffix(texts) == "", key
    # known template strings of the archive are gone
    banned = {
        "epistemic_reasoning": ["Premise:", "Hypothesis:"],
        "vitaminc_fact_verification": ["Claim:"],
        "question_selection": ["Short Answer:", "Context:"],
        "contextual_parametric_knowledge_conflicts": ["Question:", "Context:"],
        "formal_fallacies_syllogisms_negation": ["deductively valid or invalid?"],
        "topical_chat": ["agent_A:", "agent_B:"],
    }
    for task, needles in banned.items():
        for needle in needles:
            hits = sum(needle in t for t in by_task[task])
            assert hits <= 0.01 * len(by_task[task]), (task, needle, hits)
