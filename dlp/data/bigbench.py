"""The BIG-bench task files: the PyPI sdist ``bigbench==1.0.0`` and the few task.json files we
take out of it (never ``pip install``: its dependencies are heavy and it would run setup.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import zlib
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dlp.atomic import partial_path, swap_in
from dlp.data.tasks import TaskSpec
from dlp.errors import DlpError
from dlp.pypi_fetch import pip_download

log = logging.getLogger(__name__)

REQUIREMENT = "bigbench==1.0.0"
SDIST = "bigbench-1.0.0.tar.gz"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
# Recent pip (26.3 here) refuses any PyPI sdist whose metadata declares a direct URL
# dependency, even for `pip download --no-deps`; bigbench 1.0.0 declares `bleurt @ file://...`.
# So the sdist is fetched with a pip release from before that check, run from its wheel.
PIP_FOR_SDIST = "25.3"
ARCHIVE_ENV = "DLP_BIGBENCH_ARCHIVE"  # a local copy of the sdist (offline use, tests)
MARKER = "extracted.json"
# .../benchmark_tasks/<task>/task.json or .../benchmark_tasks/<task>/<subtask>/task.json
_MEMBER = re.compile(r"(?:^|/)benchmark_tasks/([^/]+)/(?:([^/]+)/)?task\.json$")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with (
        path.open("rb") as fh,
        tqdm(
            total=path.stat().st_size,
            unit="B",
            unit_scale=True,
            desc="verify archive",
            disable=None,
            leave=False,
        ) as bar,
    ):
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def explicit_archive(archive: Path | None = None) -> Path | None:
    """A local sdist copy given by flag or $DLP_BIGBENCH_ARCHIVE (must exist), else None."""
    raw = archive or os.environ.get(ARCHIVE_ENV)
    if not raw:
        return None
    path = Path(raw).expanduser()
    if not path.is_file():
        raise DlpError(f"archive {path} does not exist")
    return path


def download_archive(cache_root: Path) -> Path:
    """``<cache>/downloads/bigbench-1.0.0.tar.gz``, fetched by pip once, kept there and
    checked against its known sha256."""
    return pip_download(
        REQUIREMENT,
        SDIST,
        cache_root / "downloads",
        sdist=True,
        is_valid=lambda p: _sha256(p) == SDIST_SHA256,
        pip_version=PIP_FOR_SDIST,
    )


def _archive_id(archive: Path) -> dict[str, Any]:
    st = archive.stat()
    return {"archive": str(archive.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _marker_covers(dest: Path, archive_id: dict[str, Any] | None, names: set[str]) -> bool:
    """Does ``dest`` hold ``names`` from this archive (``archive_id``), or, when it is None,
    from the official sdist (checked by sha256 when it was extracted)?"""
    try:
        marker = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if archive_id is None:
        if marker.get("sha256") != SDIST_SHA256:
            return False
    elif marker.get("source") != archive_id:
        return False
    return names <= set(marker.get("tasks", []))


def extract_tasks(
    archive: Path, dest: Path, specs: tuple[TaskSpec, ...], *, official: bool = False
) -> Path:
    """Copy the task.json files (with subtask dirs) of ``specs`` from the sdist into ``dest``.

    Reads the tar as a stream (one pass over ~360 MB of gzip) and writes only matching
    members; a marker written last records the archive identity and the tasks it holds
    (``official``: the archive is the sha256-checked sdist, so a later offline run may reuse
    the files without the archive).
    """
    names = {s.name for s in specs}
    archive_id = _archive_id(archive)
    if _marker_covers(dest, archive_id, names):
        log.info("task files already extracted in %s", dest)
        return dest
    partial = partial_path(dest)
    found: dict[str, int] = {}
    try:
        with (
            archive.open("rb") as raw,
            tqdm.wrapattr(
                raw,
                "read",
                total=archive.stat().st_size,
                desc="extract bigbench tasks",
                disable=None,
                leave=False,
            ) as counted,
            tarfile.open(fileobj=counted, mode="r|gz") as tar,
        ):
            for member in tar:
                m = _MEMBER.search(member.name)
                if not m or not member.isfile() or m.group(1) not in names:
                    continue
                task, sub = m.group(1), m.group(2)
                if task in {".", ".."} or sub in {".", ".."}:
                    continue
                # The output path is built from the matched names, never from the member path,
                # so a hostile archive cannot write outside ``partial``.
                out = partial / task / (sub or "") / "task.json"
                out.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                if src is None:
                    continue
                out.write_bytes(src.read())
                found[task] = found.get(task, 0) + 1
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(exc, PermissionError):
            raise DlpError(f"cannot write task files under {dest.parent}: {exc}") from exc
        raise DlpError(f"archive {archive} is corrupt or not a gzip tar ({exc})") from exc
    missing = sorted(names - set(found))
    if missing:
        shutil.rmtree(partial, ignore_errors=True)
        raise DlpError(f"archive {archive} has no task.json for: {', '.join(missing)}")
    marker: dict[str, Any] = {"source": archive_id, "tasks": sorted(found)}
    if official:
        marker["sha256"] = SDIST_SHA256
    (partial / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    swap_in(partial, dest)
    return dest


def official_extraction_covers(dest: Path, specs: tuple[TaskSpec, ...]) -> bool:
    """True when ``dest`` already holds the task files of ``specs`` from the official sdist."""
    return _marker_covers(dest, None, {s.name for s in specs})


def read_task_files(dest: Path, spec: TaskSpec) -> list[tuple[str, dict[str, Any]]]:
    """(subtask name or "", parsed task.json) for the files ``spec`` uses, in a fixed order."""
    base = dest / spec.name
    if spec.subtasks is not None:
        paths = [(sub, base / sub / "task.json") for sub in spec.subtasks]
    else:
        own = base / "task.json"
        subs = sorted(p for p in base.glob("*/task.json"))
        paths = [("", own)] if _has_examples(own) else [(p.parent.name, p) for p in subs]
    out = []
    for sub, path in paths:
        if not path.is_file():
            raise DlpError(f"task {spec.name}: {path.relative_to(dest)} is not in the archive")
        out.append((sub, _load_json(path)))
    return out


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DlpError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise DlpError(f"{path} is not a BIG-bench task (expected a JSON object)")
    return data


def _has_examples(path: Path) -> bool:
    return path.is_file() and bool(_load_json(path).get("examples"))
