"""Turn parsed BIG-bench task files into flat example records (input stripped of boilerplate)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dlp.data.strip import strip_boilerplate
from dlp.data.tasks import TaskSpec


@dataclass(frozen=True)
class Example:
    task: str
    subtask: str
    index: int  # position in its task.json, so ids stay stable across runs
    input: str
    raw_input: str
    choices: tuple[str, ...]
    target: str
    kind: str

    @property
    def id(self) -> str:
        return f"{self.task}/{self.subtask or '-'}/{self.index}"


def _mcq_fields(ex: dict[str, Any]) -> tuple[tuple[str, ...], str] | None:
    scores = ex.get("target_scores")
    if not isinstance(scores, dict) or len(scores) < 2:
        return None
    choices = tuple(str(c) for c in scores)
    # the highest-scoring choice; ties go to the first listed, as BIG-bench scores them equal
    best = max(range(len(choices)), key=lambda i: (float(scores[choices[i]]), -i))
    return choices, choices[best]


def _generative_target(ex: dict[str, Any]) -> str | None:
    target = ex.get("target")
    if isinstance(target, list):
        target = next((t for t in target if isinstance(t, str) and t.strip()), None)
    if isinstance(target, str) and target.strip():
        return target.strip()
    return None


def task_examples(spec: TaskSpec, files: list[tuple[str, dict[str, Any]]]) -> list[Example]:
    """All usable examples of one task, its subtasks merged in ``files`` order.

    Boilerplate is found per file (subtasks use different templates). Examples that do not
    fit the task's kind (e.g. an MCQ example without target_scores) or end up empty are
    dropped.
    """
    out: list[Example] = []
    for sub, data in files:
        examples = [e for e in data.get("examples", []) if isinstance(e, dict)]
        raw = [str(e.get("input", "")) for e in examples]
        harness = [str(data.get("task_prefix", "")), str(data.get("example_input_prefix", ""))]
        stripped, _, _ = strip_boilerplate(raw, harness_prefixes=harness, labels=spec.labels)
        for i, (ex, text, raw_text) in enumerate(zip(examples, stripped, raw, strict=True)):
            if not text:
                continue
            if spec.kind == "mcq":
                fields = _mcq_fields(ex)
                if fields is None:
                    continue
                choices, target = fields
            else:
                gen = _generative_target(ex)
                if gen is None:
                    continue
                choices, target = (), gen
            out.append(Example(spec.name, sub, i, text, raw_text, choices, target, spec.kind))
    return out
