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
    """Drop repeats of the same (input, choices, target); the first one is kept."""
    seen: set[tuple[str, tuple[str, ...], str]] = set()
    out = []
    for ex in examples:
        k = (_key(ex.input), ex.choices, ex.target)
        if k not in seen:
            seen.add(k)
            out.append(ex)
    return out


def group_by_input(examples: list[Example]) -> list[list[Example]]:
    """Examples sharing an input text (whitespace-normalized), in first-seen order.

    Some tasks ask several questions about one passage (logical_deduction puts the question
    in the choices); a whole group goes to one split, so no input text is in two splits.
    """
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(_key(ex.input), []).append(ex)
    return list(groups.values())


def split_task(examples: list[Example], cfg: SplitConfig) -> dict[str, list[Example]]:
    """Shuffle one task's input groups with a (seed, task) RNG and fill test first, then
    validation, then a capped train split, so test stays fixed when only the train cap
    changes. Test / validation take about 20% / 10% of a small task (by example count)."""
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    if not examples:
        return out
    unique = dedupe(examples)
    groups = group_by_input(unique)
    random.Random(f"{cfg.seed}/{unique[0].task}").shuffle(groups)
    n = len(unique)
    want = {
        "test": min(cfg.max_test, round(0.2 * n)),
        "validation": min(cfg.max_validation, round(0.1 * n)),
        "train": cfg.max_train,
    }
    it = iter(groups)
    for split in SPLITS[::-1]:  # test, validation, train
        bucket = out[split]
        while len(bucket) < want[split]:
            group = next(it, None)
            if group is None:
                break
            bucket.extend(group[: want[split] - len(bucket)])
    return out
