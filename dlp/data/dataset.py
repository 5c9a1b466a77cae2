"""Read the prepared task data (see dlp.data.prepare for the columns)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dlp.errors import DlpError

PARQUET = "tasks.parquet"


def load_tasks(
    path: str | Path,
    *,
    split: str | None = None,
    tasks: list[str] | None = None,
    kind: str | None = None,
) -> pa.Table:
    """The examples in ``path`` (a prepared dir or its tasks.parquet), optionally filtered by
    split, task names and kind (mcq | generative)."""
    path = Path(path)
    file = path / PARQUET if path.is_dir() else path
    if not file.is_file():
        raise DlpError(f"no task data at {path}; run `dlp data prepare --out {path}`")
    try:
        table = pq.read_table(file)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DlpError(f"cannot read {file}: {exc}") from exc
    if tasks:
        unknown = set(tasks) - set(table["task"].unique().to_pylist())
        if unknown:
            raise DlpError(f"task(s) not in {file}: {', '.join(sorted(unknown))}")
        table = table.filter(pc.is_in(table["task"], value_set=pa.array(tasks)))
    if split is not None:
        table = table.filter(pc.equal(table["split"], split))
    if kind is not None:
        table = table.filter(pc.equal(table["kind"], kind))
    return table


def task_names(table: pa.Table) -> list[str]:
    """Task names in first-appearance order (the order of the prepared pool)."""
    return list(dict.fromkeys(table["task"].to_pylist()))
