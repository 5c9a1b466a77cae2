"""Deterministic per-task train / validation / test splits with no input shared across them."""

from __future__ import annotations

import random
from dataclasses import dataclass

from dlp.data.examples import Example

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class SplitConfig:
    """Per-task caps. Validation and test take at most 10% / 20% of a small task, so a task
    with few examples still keeps most of them for training."""

    seed: int = 0
    max_train: int = 1000
    max_validation: int = 100
    max_test: int = 200

    def __post_init__(self) -> None:
        for name in ("max_train", "max_validation", "max_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


def _key(text: str) -> str:
    return " ".join(text.split())


def dedupe(examples: list[Example]) -> list[Example]:
    """Keep the first example of each input text (whitespace-normalized).

    Some tasks ask several questions about one passage (logical_deduction) or repeat a
    narrative under several subtasks; one row per input keeps the splits disjoint by text
    and stops a router from seeing test inputs in training.
    """
    seen: set[str] = set()
    out = []
    for ex in examples:
        k = _key(ex.input)
        if k not in seen:
            seen.add(k)
            out.append(ex)
    return out


def split_task(examples: list[Example], cfg: SplitConfig) -> dict[str, list[Example]]:
    """Shuffle one task's deduplicated examples with a (seed, task) RNG and cut test first,
    then validation, then a capped train split, so test stays fixed when only the train cap
    changes."""
    if not examples:
        return {s: [] for s in SPLITS}
    unique = dedupe(examples)
    rng = random.Random(f"{cfg.seed}/{unique[0].task}")
    order = list(range(len(unique)))
    rng.shuffle(order)
    n = len(unique)
    n_test = min(cfg.max_test, max(1, round(0.2 * n))) if n >= 3 else 0
    n_val = min(cfg.max_validation, max(1, round(0.1 * n))) if n >= 3 else 0
    test = [unique[i] for i in order[:n_test]]
    val = [unique[i] for i in order[n_test : n_test + n_val]]
    train = [unique[i] for i in order[n_test + n_val :][: cfg.max_train]]
    return {"train": train, "validation": val, "test": test}
