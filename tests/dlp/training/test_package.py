"""Provenance of an adapter set made in two runs (a resumed ``--skip-existing`` run)."""

from __future__ import annotations

import pytest

from dlp.data.tasks import POOL
from dlp.errors import DlpError
from dlp.training.package import _provenance

NAMES = [t.name for t in POOL]


def _training(skipped: set[str]) -> dict:
    return {
        "command": "dlp train-adapters --tasks all --skip-existing --device cpu",
        "plan": {"task": {"batch_size": 8}},
        "seconds": 12.5,
        "adapters": {
            n: {
                "steps": 0 if n in skipped else 24,
                "last_loss": None if n in skipped else 0.5,
                "skipped": n in skipped,
            }
            for n in NAMES
        },
    }


def test_skipped_adapters_keep_the_provenance_of_the_set_they_came_from() -> None:
    first = set(NAMES[:12])
    previous = {
        "command": "dlp train-adapters --device cuda --batch-size 32",
        "script": "benchmarks/quality_gpu.sh on one H200",
        "recipe": {"batch_size": 32},
        "steps": {n: 63 for n in first},
        "adapters": {n: {} for n in first},
    }
    info = _provenance(_training(first), NAMES, previous, machine="2-core CPU")
    assert info["complete"] is True and info["missing_tasks"] == []
    assert info["command"].startswith("dlp train-adapters")
    gpu_run, cpu_run = info["runs"]
    assert sorted(gpu_run["adapters"]) == sorted(first)
    assert gpu_run["recipe"] == {"batch_size": 32}
    assert sorted(cpu_run["adapters"]) == sorted(set(NAMES) - first)
    assert cpu_run["machine"] == "2-core CPU"
    assert {info["steps"][n] for n in first} == {63}
    assert {info["steps"][n] for n in set(NAMES) - first} == {24}


def test_skipped_adapters_without_their_manifest_are_refused() -> None:
    with pytest.raises(DlpError, match="--previous"):
        _provenance(_training({NAMES[0]}), NAMES, None, machine="cpu")


def test_a_partial_set_says_what_is_missing() -> None:
    info = _provenance(_training(set()), NAMES[:3], None, machine="cpu")
    assert info["complete"] is False
    assert len(info["missing_tasks"]) == len(NAMES) - 3
