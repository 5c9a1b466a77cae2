"""Fixtures for the routing tests (data and tokenizer builders live in routing_synth)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from routing_synth import build_tokenizer, make_split


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def task_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tasks.parquet with the columns `dlp data prepare` writes."""
    path = tmp_path_factory.mktemp("data")
    rows: dict[str, list] = {
        k: [] for k in ("task", "split", "id", "input", "choices", "target", "kind")
    }
    for split, n, seed in (("train", 100, 1), ("validation", 15, 2), ("test", 20, 3)):
        texts, labels = make_split(n, seed)
        for i, (text, label) in enumerate(zip(texts, labels, strict=True)):
            rows["task"].append(label)
            rows["split"].append(split)
            rows["id"].append(f"{label}-{split}-{i}")
            rows["input"].append(text)
            rows["choices"].append([])
            rows["target"].append("x")
            rows["kind"].append("generative")
    pq.write_table(pa.table(rows), path / "tasks.parquet")
    return path
