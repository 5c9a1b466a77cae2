"""The task pool: 26 BIG-bench tasks, how each is read, and which boilerplate it carries.

22 tasks come from the DLP-LoRA / MeteoRA pool; 4 more from the same archive bring it to 26
(2 multiple-choice + 2 generative, so the split is 17 MCQ / 9 generative as in the paper):
``social_iqa`` (social commonsense, 1.9k), ``sports_understanding`` (plausibility of sports
statements, 1k), ``qa_wikidata`` (factual completion, 20k) and ``word_sorting`` (an
algorithmic string task, 1.9k). Each is a domain none of the 22 covers, has enough distinct
inputs for a 1k-example train split (sports_understanding: ~700), and reads naturally without
a template once its boilerplate is stripped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dlp.errors import DlpError

Kind = Literal["mcq", "generative"]


@dataclass(frozen=True)
class TaskSpec:
    """How one pool task is turned into rows.

    ``subtasks``: which subtask dirs to read (None: the task's own task.json, or every subtask
    when it only has subtasks). Some subtasks are other views of the same examples (e.g.
    elementary_math_qa's hint variants repeat the question), so we pick one view to avoid
    near-duplicates that would leak across splits.
    ``labels``: fixed field labels that every example repeats inside the text
    (e.g. ``"Claim:"``); they are replaced by a line break.
    """

    name: str
    kind: Kind
    subtasks: tuple[str, ...] | None = None
    labels: tuple[str, ...] = ()


POOL: tuple[TaskSpec, ...] = (
    # Multiple choice (17)
    TaskSpec("abstract_narrative_understanding", "mcq", ("4_distractors",)),
    TaskSpec("cs_algorithms", "mcq", ("lcs", "valid_parentheses")),
    TaskSpec("elementary_math_qa", "mcq", ("question_only",)),
    TaskSpec("epistemic_reasoning", "mcq", labels=("Hypothesis:",)),
    TaskSpec("formal_fallacies_syllogisms_negation", "mcq"),
    TaskSpec("goal_step_wikihow", "mcq", ("goal_inference", "step_inference", "step_ordering")),
    TaskSpec("language_identification", "mcq"),
    TaskSpec("logical_deduction", "mcq", ("three_objects", "five_objects", "seven_objects")),
    TaskSpec("play_dialog_same_or_different", "mcq"),
    TaskSpec("question_selection", "mcq", labels=("Context:",)),
    TaskSpec("reasoning_about_colored_objects", "mcq"),
    TaskSpec(
        "tracking_shuffled_objects", "mcq", ("three_objects", "five_objects", "seven_objects")
    ),
    TaskSpec(
        "unit_conversion",
        "mcq",
        (
            "chained_conversion",
            "different_systems",
            "novel_systems",
            "si_conversion",
            "unit_identification",
        ),
    ),
    TaskSpec("vitaminc_fact_verification", "mcq", labels=("Claim:",)),
    TaskSpec("winowhy", "mcq"),
    TaskSpec("social_iqa", "mcq"),
    TaskSpec("sports_understanding", "mcq"),
    # Generative (9)
    TaskSpec("contextual_parametric_knowledge_conflicts", "generative", labels=("Context:",)),
    TaskSpec("disfl_qa", "generative", labels=("context:",)),
    TaskSpec("linguistics_puzzles", "generative"),
    TaskSpec("object_counting", "generative"),
    TaskSpec("paragraph_segmentation", "generative"),
    TaskSpec("strategyqa", "generative"),
    TaskSpec("topical_chat", "generative", labels=("agent_A:", "agent_B:")),
    TaskSpec("qa_wikidata", "generative"),
    TaskSpec("word_sorting", "generative"),
)

BY_NAME: dict[str, TaskSpec] = {spec.name: spec for spec in POOL}


def resolve_tasks(names: list[str] | None) -> tuple[TaskSpec, ...]:
    """The specs for ``names`` (all of the pool when None), or a DlpError naming the unknown."""
    if not names:
        return POOL
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise DlpError(
            f"unknown task name(s): {', '.join(unknown)} (see `dlp data prepare --help` "
            f"for the {len(POOL)} pool tasks)"
        )
    seen: dict[str, TaskSpec] = {}
    for n in names:
        seen.setdefault(n, BY_NAME[n])
    return tuple(seen.values())
