"""Task examples as plain dataclasses, read from the prepared Parquet table.

Training and evaluation both take their rows from here, so both agree on the split names,
the task list and the kinds (``mcq`` scored by choice log-likelihood, ``generative`` by
BLEU / ROUGE).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dlp.errors import DlpError

if TYPE_CHECKING:
    import pyarrow as pa

KINDS = ("mcq", "generative")
SPLITS = ("train", "validation", "test")
REQUIRED_COLUMNS = ("task", "split", "id", "input", "choices", "target", "kind")


@dataclass(frozen=True)
class TaskExample:
    task: str
    id: str
    input: str
    target: str
    kind: str
    choices: tuple[str, ...] = ()

    @property
    def prompt_choices(self) -> tuple[str, ...] | None:
        """The options shown in the prompt: MCQ only."""
        return self.choices if self.kind == "mcq" else None

    @property
    def gold_index(self) -> int:
        """Index of the target among the choices (MCQ only)."""
        try:
            return self.choices.index(self.target)
        except ValueError:
            raise DlpError(
                f"example {self.id} of task {self.task}: target is not one of its choices"
            ) from None


def load_table(data_dir: Path) -> pa.Table:
    """The prepared task table (``dlp data prepare``) from ``data_dir``."""
    from dlp.data.dataset import load_tasks

    return load_tasks(data_dir)


def examples_from_table(
    table: pa.Table, split: str, tasks: Sequence[str] | None = None
) -> list[TaskExample]:
    """Rows of one split (optionally only ``tasks``), in table order."""
    if split not in SPLITS:
        raise DlpError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise DlpError(f"task table lacks column(s): {', '.join(missing)}")
    known = set(table.column("task").to_pylist())
    if tasks is not None:
        unknown = sorted(set(tasks) - known)
        if unknown:
            raise DlpError(f"tasks: unknown task(s) {', '.join(unknown)}")
    wanted = None if tasks is None else set(tasks)
    out = []
    for row in table.select(list(REQUIRED_COLUMNS)).to_pylist():
        if row["split"] != split or (wanted is not None and row["task"] not in wanted):
            continue
        if row["kind"] not in KINDS:
            raise DlpError(f"example {row['id']}: kind must be mcq or generative")
        out.append(
            TaskExample(
                task=row["task"],
                id=str(row["id"]),
                input=row["input"],
                target=row["target"],
                kind=row["kind"],
                choices=tuple(row["choices"] or ()),
            )
        )
    return out


def task_names(table: pa.Table) -> list[str]:
    """All tasks of the table, sorted (the adapter and router label order)."""
    return sorted(set(table.column("task").to_pylist()))


def by_task(examples: Iterable[TaskExample]) -> dict[str, list[TaskExample]]:
    grouped: dict[str, list[TaskExample]] = {}
    for ex in examples:
        grouped.setdefault(ex.task, []).append(ex)
    return grouped


def task_kinds(examples: Iterable[TaskExample]) -> dict[str, str]:
    return {ex.task: ex.kind for ex in examples}
