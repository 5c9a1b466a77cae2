"""`dlp setup`: idempotent, fast the second time, clear errors, optional later steps."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from dlp.cli import main
from dlp.paths import cache_dir, data_dir, model_dir
from dlp.setup_cli import _optional_step


def _dlp(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dlp.cli", *args],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
        env=env,
    )


def test_model_only_is_fast_when_cached(capsys) -> None:
    assert main(["setup", "--model-only"]) == 0  # builds it if this is the first run ever
    capsys.readouterr()
    start = time.monotonic()
    assert main(["setup", "--model-only"]) == 0
    elapsed = time.monotonic() - start
    out = capsys.readouterr().out
    assert out.startswith(f"model: {model_dir(cache_dir())}")
    assert elapsed < 5, elapsed  # only checks the marker; loads nothing


def test_cache_dir_from_env_and_flag(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DLP_CACHE_DIR", str(tmp_path / "env"))
    assert cache_dir() == (tmp_path / "env").resolve()
    assert cache_dir(tmp_path / "flag") == (tmp_path / "flag").resolve()


def test_unwritable_cache_dir_is_one_error_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for args in (
        ["setup", "--model-only", "--cache-dir", str(blocker / "c")],
        ["setup", "--cache-dir", str(blocker / "c")],
    ):
        proc = _dlp(*args)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: cache dir"), proc.stderr
        assert "not writable" in lines[0]


def test_optional_step_missing_module_is_skipped_other_errors_raise(
    tmp_path: Path, monkeypatch
) -> None:
    assert _optional_step("dlp.no_such_module_here", "ensure") is None
    # a module that exists but fails on a missing dependency must not be hidden
    pkg = tmp_path / "fakepkg_setup_test"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "broken.py").write_text("import a_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError):
        _optional_step("fakepkg_setup_test.broken", "ensure")
    assert _optional_step("dlp.paths", "model_dir") is model_dir


def test_help_everywhere(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["setup", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--model-only" in out and "--cache-dir" in out and "DLP_CACHE_DIR" in out


@pytest.mark.slow
def test_full_setup_is_idempotent_and_fast_the_second_time() -> None:
    """On the default cache (``make test`` ran ``dlp setup`` before the suite)."""
    first = _dlp("setup")
    assert first.returncode == 0, first.stderr[-3000:]
    start = time.monotonic()
    second = _dlp("setup")
    elapsed = time.monotonic() - start
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"model: {model_dir(cache_dir())}" in second.stdout
    assert f"data: {data_dir(cache_dir())}" in second.stdout
    for step in ("router", "adapters"):
        assert f"{step}: " in second.stdout + second.stderr
    assert "Traceback" not in second.stderr
    assert elapsed < 90, elapsed  # checks only; every step reuses its result
