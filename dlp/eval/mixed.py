"""Mixed-task prompts (the paper's composite test): 2-3 test examples of different tasks in one
conversation, each part answered and scored with its own task's metric.

A mixed prompt is a multi-turn chat: user part 1, assistant answer 1, user part 2, ... The
part being scored sees the earlier parts with their reference answers (teacher forcing), so
each part's score does not depend on earlier mistakes. Routing is either per sentence (each
part routed on its own text: DLP) or once for the whole prompt (the released code).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from dlp.errors import DlpError
from dlp.training.examples import TaskExample, by_task
from dlp.training.prompts import user_text


@dataclass(frozen=True)
class MixedPrompt:
    id: str
    parts: tuple[str, ...]  # example keys (see example_key), in conversation order


def example_key(ex: TaskExample) -> str:
    """Ids are unique within a task only; this key is unique over the table."""
    return f"{ex.task}/{ex.id}"


def build_mixed(
    examples: Sequence[TaskExample],
    n: int,
    seed: int = 0,
    min_parts: int = 2,
    max_parts: int = 3,
) -> list[MixedPrompt]:
    """``n`` prompts, each of 2-3 examples from distinct tasks, drawn deterministically."""
    if not 2 <= min_parts <= max_parts:
        raise DlpError("mixed prompts need 2 <= min_parts <= max_parts")
    grouped = by_task(examples)
    tasks = sorted(grouped)
    if len(tasks) < max_parts:
        raise DlpError(f"mixed prompts of {max_parts} parts need that many tasks")
    rng = random.Random(seed)
    out = []
    for j in range(n):
        k = rng.randint(min_parts, max_parts)
        chosen = rng.sample(tasks, k)
        parts = tuple(example_key(rng.choice(grouped[t])) for t in chosen)
        out.append(MixedPrompt(id=f"mixed-{j}", parts=parts))
    return out


def part_messages(
    parts: Sequence[TaskExample], upto: int, user_texts: Sequence[str] | None = None
) -> list[dict[str, str]]:
    """Chat for scoring part ``upto``: earlier parts with their reference answers, then the
    part's own question (its answer is what gets scored)."""
    texts = list(user_texts) if user_texts is not None else [_user(p) for p in parts]
    messages: list[dict[str, str]] = []
    for i in range(upto):
        messages.append({"role": "user", "content": texts[i]})
        messages.append({"role": "assistant", "content": parts[i].target.strip()})
    messages.append({"role": "user", "content": texts[upto]})
    return messages


def _user(ex: TaskExample) -> str:
    return user_text(ex.input, ex.prompt_choices)


def prompt_level_text(parts: Sequence[TaskExample]) -> str:
    """What a once-per-prompt router reads: all parts' inputs together."""
    return "\n".join(p.input for p in parts)
