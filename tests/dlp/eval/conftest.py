"""Fixtures for the eval tests; the tiny tokenizer / model / data builders are shared with the
training tests (tests/dlp/training/quality_fixtures.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))

from quality_fixtures import build_tokenizer, make_tiny_llama, write_table


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    return make_tiny_llama(len(tokenizer), hidden=64)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_table(tmp_path_factory.mktemp("data"))
