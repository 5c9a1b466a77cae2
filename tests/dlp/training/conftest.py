"""Fixtures for the adapter-training tests (builders live in quality_fixtures)."""

from __future__ import annotations

from pathlib import Path

import pytest
from quality_fixtures import build_tokenizer, make_tiny_llama, write_table


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    return make_tiny_llama(len(tokenizer))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_table(tmp_path_factory.mktemp("data"))
