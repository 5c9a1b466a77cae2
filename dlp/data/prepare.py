"""`dlp data prepare`: BIG-bench sdist -> one Parquet file of the pool's examples.

Output (``<out>/tasks.parquet``), one row per example:
``task, split, id, input, choices (list<str>, empty for generative), target, kind``
plus ``subtask`` and ``raw_input`` (the example before boilerplate stripping, for whoever
wants the original prompt). ``<out>/meta.json`` is written last and records the settings,
so an existing result is reused only when it was made the same way.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from dlp.atomic import partial_path
from dlp.data import bigbench
from dlp.data.examples import Example, task_examples
from dlp.data.splits import SPLITS, SplitConfig, split_task
from dlp.data.tasks import POOL, TaskSpec, resolve_tasks
from dlp.paths import cache_dir, data_dir, ensure_writable_dir

log = logging.getLogger(__name__)

PARQUET = "tasks.parquet"
META = "meta.json"
FORMAT = 1

SCHEMA = pa.schema(
    [
        ("task", pa.string()),
        ("split", pa.string()),
        ("id", pa.string()),
        ("input", pa.string()),
        ("choices", pa.list_(pa.string())),
        ("target", pa.string()),
        ("kind", pa.string()),
        ("subtask", pa.string()),
        ("raw_input", pa.string()),
    ]
)


def _task_files_dir(root: Path) -> Path:
    return root / "bigbench" / "tasks"


def _extract(root: Path, specs: tuple[TaskSpec, ...], archive: Path | None) -> Path:
    dest = _task_files_dir(root)
    local = bigbench.explicit_archive(archive)
    if local is not None:
        return bigbench.extract_tasks(local, dest, specs)
    if bigbench.official_extraction_covers(dest, specs):
        return dest  # no archive needed (works offline)
    sdist = bigbench.download_archive(root)
    # Extract the whole pool even for a subset, so a later full run needs no second pass.
    return bigbench.extract_tasks(sdist, dest, tuple({*POOL, *specs}), official=True)


def build_table(task_dir: Path, specs: tuple[TaskSpec, ...], cfg: SplitConfig) -> pa.Table:
    rows: dict[str, list[Any]] = {f.name: [] for f in SCHEMA}
    for spec in tqdm(specs, desc="convert tasks", unit="task", disable=None, leave=False):
        examples = task_examples(spec, bigbench.read_task_files(task_dir, spec))
        if not examples:
            log.warning("task %s has no usable examples", spec.name)
        parts = split_task(examples, cfg)
        for split in SPLITS:
            for ex in sorted(parts[split], key=lambda e: (e.subtask, e.index)):
                _append(rows, ex, split)
    return pa.table(rows, schema=SCHEMA)


def _append(rows: dict[str, list[Any]], ex: Example, split: str) -> None:
    rows["task"].append(ex.task)
    rows["split"].append(split)
    rows["id"].append(ex.id)
    rows["input"].append(ex.input)
    rows["choices"].append(list(ex.choices))
    rows["target"].append(ex.target)
    rows["kind"].append(ex.kind)
    rows["subtask"].append(ex.subtask)
    rows["raw_input"].append(ex.raw_input)


def _settings(specs: tuple[TaskSpec, ...], cfg: SplitConfig) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "source": bigbench.REQUIREMENT,
        "tasks": [s.name for s in specs],
        "split": asdict(cfg),
    }


def _read_meta(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / META).read_text())
    except (OSError, ValueError):
        return None


def prepare(
    out: Path,
    *,
    cache_root: Path | None = None,
    archive: Path | None = None,
    tasks: list[str] | None = None,
    cfg: SplitConfig | None = None,
    force: bool = False,
) -> Path:
    """Write ``out/tasks.parquet`` (+ ``meta.json``) unless the same settings already made it.

    ``archive``: a local sdist (or $DLP_BIGBENCH_ARCHIVE) instead of the pip download.
    """
    specs = resolve_tasks(tasks)
    cfg = cfg or SplitConfig()
    settings = _settings(specs, cfg)
    meta = _read_meta(out)
    local = bigbench.explicit_archive(archive)
    if local is not None:
        settings["archive"] = str(local.resolve())
    if (
        not force
        and meta is not None
        and meta.get("settings") == settings
        and (out / PARQUET).is_file()
    ):
        log.info("task data up to date in %s", out)
        return out
    root = ensure_writable_dir(cache_root or cache_dir())
    out = ensure_writable_dir(out)
    task_dir = _extract(root, specs, archive)
    table = build_table(task_dir, specs, cfg)
    tmp = partial_path(out / PARQUET)
    pq.write_table(table, tmp)
    tmp.replace(out / PARQUET)
    meta = {"settings": settings, "rows": table.num_rows, "counts": count_table(table)}
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    print(
        f"wrote {table.num_rows} examples of {len(specs)} tasks to {out / PARQUET}", file=sys.stderr
    )
    return out


def ensure_default_data(cache_root: Path | None = None) -> Path:
    """The default task data (all 26 tasks, default caps) under the cache dir."""
    root = cache_root or cache_dir()
    return prepare(data_dir(root), cache_root=root)


def count_table(table: pa.Table) -> dict[str, dict[str, int]]:
    """{task: {split: count}} in table order."""
    counts = Counter(
        zip(table.column("task").to_pylist(), table.column("split").to_pylist(), strict=True)
    )
    out: dict[str, dict[str, int]] = {}
    for (task, split), n in counts.items():
        out.setdefault(task, {s: 0 for s in SPLITS})[split] = n
    return out
