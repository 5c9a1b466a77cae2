"""Bad input gives one clear error line and exit code 2, never a traceback."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import pytest

from dlp.cli import main


def _run(argv: list[str], capsys) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


def _assert_one_error_line(err: str, *needles: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def _prepare(tmp_path: Path, archive: Path, *extra: str) -> list[str]:
    return [
        "data",
        "prepare",
        "--out",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--archive",
        str(archive),
        *extra,
    ]


def test_missing_archive(tmp_path: Path, capsys) -> None:
    rc, err = _run(_prepare(tmp_path, tmp_path / "nope.tar.gz"), capsys)
    assert rc == 2
    _assert_one_error_line(err, "nope.tar.gz", "does not exist")


@pytest.mark.parametrize("kind", ["garbage", "truncated", "plain-gzip"])
def test_corrupt_archive(kind: str, fake_archive: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / f"{kind}.tar.gz"
    if kind == "garbage":
        bad.write_bytes(b"this is not an archive" * 100)
    elif kind == "truncated":
        data = fake_archive.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        bad.write_bytes(gzip.compress(b"not a tar file at all" * 50))
    rc, err = _run(_prepare(tmp_path, bad, "--tasks", "object_counting"), capsys)
    assert rc == 2
    _assert_one_error_line(err, str(bad), "corrupt")
    # nothing half-extracted is left to be mistaken for a result
    assert not (tmp_path / "cache" / "bigbench" / "tasks").exists()


def test_archive_without_the_task(tmp_path: Path, make_archive, capsys) -> None:
    archive = make_archive(tmp_path / "small.tar.gz", {"winowhy/task.json": {"examples": []}})
    rc, err = _run(_prepare(tmp_path, archive, "--tasks", "object_counting"), capsys)
    assert rc == 2
    _assert_one_error_line(err, "no task.json for", "object_counting")


def test_unknown_task_name(tmp_path: Path, fake_archive: Path, capsys) -> None:
    rc, err = _run(
        _prepare(tmp_path, fake_archive, "--tasks", "object_counting", "no_such_task"), capsys
    )
    assert rc == 2
    _assert_one_error_line(err, "unknown task", "no_such_task")


def test_unwritable_cache_dir(tmp_path: Path, fake_archive: Path, capsys) -> None:
    # a regular file where a directory must go: unwritable even for root
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = [
        "data",
        "prepare",
        "--out",
        str(tmp_path / "out"),
        "--cache-dir",
        str(blocker / "cache"),
        "--archive",
        str(fake_archive),
    ]
    rc, err = _run(argv, capsys)
    assert rc == 2
    _assert_one_error_line(err, str(blocker / "cache"), "not writable")


def test_unwritable_out_dir(tmp_path: Path, fake_archive: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = [
        "data",
        "prepare",
        "--out",
        str(blocker / "out"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--archive",
        str(fake_archive),
    ]
    rc, err = _run(argv, capsys)
    assert rc == 2
    _assert_one_error_line(err, "not writable")


def test_bad_caps(tmp_path: Path, fake_archive: Path, capsys) -> None:
    rc, err = _run(_prepare(tmp_path, fake_archive, "--max-train-per-task", "0"), capsys)
    assert rc == 2
    _assert_one_error_line(err, "--max-train-per-task")


def test_stats_on_missing_dir(tmp_path: Path, capsys) -> None:
    rc, err = _run(["data", "stats", str(tmp_path / "none")], capsys)
    assert rc == 2
    _assert_one_error_line(err, "no task data")


def test_stats_on_corrupt_parquet(tmp_path: Path, capsys) -> None:
    (tmp_path / "tasks.parquet").write_bytes(b"PAR1 broken")
    rc, err = _run(["data", "stats", str(tmp_path)], capsys)
    assert rc == 2
    _assert_one_error_line(err, "cannot read")


def test_console_script_exit_code_and_stderr(tmp_path: Path) -> None:
    """The installed entry point, end to end: stderr is exactly one line."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dlp.cli",
            "data",
            "prepare",
            "--out",
            str(tmp_path / "o"),
            "--archive",
            str(tmp_path / "missing.tar.gz"),
            "--cache-dir",
            str(tmp_path / "c"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: archive {tmp_path / 'missing.tar.gz'} does not exist"
    ]
