"""A small fake BIG-bench sdist, built by the tests, in the real archive's layout."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks"
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "oval", "cross")
COLORS = ("red", "blue", "green", "black", "white", "pink", "gray", "gold", "teal", "brown")


def _object_counting() -> dict[str, Any]:
    # generative; the fixed closing question should be kept (not at a clause boundary)
    things = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "grape", "peach", "melon"]
    examples = []
    for i in range(60):
        items = [things[(i + j) % len(things)] for j in range(1 + i % 5)]
        examples.append(
            {
                "input": f"I have {', '.join('a ' + t for t in items)} (set {i}). "
                "How many fruits do I have?",
                "target": [str(len(items)), f"n{len(items)}"],
            }
        )
    return {"name": "object_counting", "task_prefix": "", "examples": examples}


def _epistemic() -> dict[str, Any]:
    # mcq with a fixed opening label and a field label inside every example
    examples = []
    for i in range(50):
        a, b = COLORS[i % len(COLORS)], SHAPES[i % len(SHAPES)]
        examples.append(
            {
                "input": f"Premise: Ann {i} thinks a {a} {b} exists. Hypothesis: A {a} {b} exists.",
                "target_scores": {"entailment": i % 2, "non-entailment": 1 - i % 2},
            }
        )
    return {
        "name": "epistemic_reasoning",
        "task_prefix": "Identify the relation between the following premises and hypotheses.\n",
        "example_input_prefix": "\n",
        "examples": examples,
    }


def _logical_deduction(n_objects: int, name: str) -> dict[str, Any]:
    # mcq subtasks; every paragraph is asked about several times (same input, other choices)
    examples = []
    for i in range(12):
        objs = [COLORS[(i + j) % len(COLORS)] for j in range(n_objects)]
        text = f"On a shelf there are {n_objects} books in order {i}: " + ", ".join(objs) + "."
        for pos in ("leftmost", "rightmost"):
            choices = {f"The {o} book is the {pos}.": 0 for o in objs}
            winner = objs[0] if pos == "leftmost" else objs[-1]
            choices[f"The {winner} book is the {pos}."] = 1
            examples.append({"input": text, "target_scores": choices})
    return {
        "name": name,
        "task_prefix": f"The following paragraphs each describe {n_objects} objects.\n\n",
        "examples": examples,
    }


def fixture_tasks() -> dict[str, dict[str, Any]]:
    """archive member path (under ROOT) -> task.json content."""
    return {
        "object_counting/task.json": _object_counting(),
        "epistemic_reasoning/task.json": _epistemic(),
        "logical_deduction/task.json": {
            "name": "logical_deduction",
            "subtasks": [],
            "examples": [],
        },
        "logical_deduction/three_objects/task.json": _logical_deduction(3, "three"),
        "logical_deduction/five_objects/task.json": _logical_deduction(5, "five"),
        "logical_deduction/seven_objects/task.json": _logical_deduction(7, "seven"),
        # not in the pool: must never be extracted
        "anachronisms/task.json": {
            "name": "anachronisms",
            "examples": [{"input": "x", "target_scores": {"Yes": 1, "No": 0}}],
        },
    }


FIXTURE_TASKS = ["object_counting", "epistemic_reasoning", "logical_deduction"]


def build_archive(path: Path, tasks: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write a gzip tar like the sdist: README + the task files under ROOT."""
    with tarfile.open(path, "w:gz") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("bigbench-1.0.0/README.md", b"fake bigbench for tests\n")
        for rel, content in (tasks or fixture_tasks()).items():
            add(f"{ROOT}/{rel}", json.dumps(content).encode())
    return path


@pytest.fixture(scope="session")
def fake_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_archive(tmp_path_factory.mktemp("sdist") / "bigbench-1.0.0.tar.gz")


@pytest.fixture(scope="session")
def fixture_task_names() -> list[str]:
    return list(FIXTURE_TASKS)


@pytest.fixture(scope="session")
def make_archive():
    """build_archive, for tests that need an archive with other contents."""
    return build_archive
