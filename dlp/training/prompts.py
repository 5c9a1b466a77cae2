"""The one prompt format shared by adapter training, evaluation and serving.

A task example becomes a single-turn chat in the base model's own chat template:
user = the task input (plus the answer options for multiple-choice tasks), assistant = the
target. Training, ``dlp eval`` and the serving demo all call these functions, so the adapters
see at serving time exactly the text layout they were trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dlp.errors import DlpError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

OPTIONS_HEADER = "Options:"
# Inputs are cut to this many tokens (keeping the end, where the question and the options
# are) so one long example cannot blow up a batch; answers are cut to MAX_ANSWER_TOKENS.
MAX_INPUT_TOKENS = 320
MAX_ANSWER_TOKENS = 64
IGNORE_INDEX = -100
_MARK = "\x00dlp-answer\x00"
_EOT_CACHE: dict[tuple[int, str], str] = {}


def user_text(task_input: str, choices: Sequence[str] | None = None) -> str:
    """The user turn: the input, then one ``- option`` line per choice for MCQ tasks."""
    text = task_input.strip()
    if choices:
        text += "\n\n" + OPTIONS_HEADER + "\n" + "\n".join(f"- {c.strip()}" for c in choices)
    return text


def chat_messages(task_input: str, choices: Sequence[str] | None = None) -> list[dict[str, str]]:
    """The OpenAI-style message list a client sends for one task example."""
    return [{"role": "user", "content": user_text(task_input, choices)}]


def _require_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DlpError("the tokenizer has no chat template; prompts need the base model's one")


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> str:
    """Messages -> prompt text ending with the assistant header (generation prompt)."""
    _require_template(tokenizer)
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def end_of_turn(tokenizer: PreTrainedTokenizerBase) -> str:
    """The text the template puts after an assistant answer (e.g. ``<|im_end|>``), without
    trailing whitespace. Training appends it to every target so the adapter learns to stop,
    and MCQ scoring includes it so ``"yes"`` is not a free prefix of ``"yes, because"``."""
    _require_template(tokenizer)
    key = (id(tokenizer), tokenizer.chat_template)
    if key not in _EOT_CACHE:
        _EOT_CACHE[key] = _end_of_turn_uncached(tokenizer)
    return _EOT_CACHE[key]


def _end_of_turn_uncached(tokenizer: PreTrainedTokenizerBase) -> str:
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": _MARK}],
        tokenize=False,
    )
    tail = full[full.index(_MARK) + len(_MARK) :].rstrip()
    if not tail and tokenizer.eos_token:
        tail = tokenizer.eos_token
    return tail


def truncate_input(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int) -> str:
    """Keep the last ``max_tokens`` tokens of ``text`` (the question and options sit last)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[-max_tokens:], skip_special_tokens=False)


def render_prompt(
    tokenizer: PreTrainedTokenizerBase,
    task_input: str,
    choices: Sequence[str] | None = None,
    max_input_tokens: int | None = MAX_INPUT_TOKENS,
) -> str:
    """One task example -> the prompt text the model continues with its answer."""
    text = user_text(task_input, choices)
    if max_input_tokens is not None:
        text = truncate_input(tokenizer, text, max_input_tokens)
    return render_chat(tokenizer, [{"role": "user", "content": text}])


@dataclass(frozen=True)
class Encoded:
    """Token ids of prompt + answer; ``labels`` is -100 on the prompt (loss on answer only)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def n_answer_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def encode_answer(
    tokenizer: PreTrainedTokenizerBase, answer: str, max_answer_tokens: int | None
) -> list[int]:
    """Answer ids followed by the end-of-turn ids (kept even when the answer is cut)."""
    ids = tokenizer(answer.strip(), add_special_tokens=False)["input_ids"]
    stop = tokenizer(end_of_turn(tokenizer), add_special_tokens=False)["input_ids"]
    if max_answer_tokens is not None:
        ids = ids[:max_answer_tokens]
    return list(ids) + list(stop)


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    task_input: str,
    target: str,
    choices: Sequence[str] | None = None,
    max_input_tokens: int | None = MAX_INPUT_TOKENS,
    max_answer_tokens: int | None = MAX_ANSWER_TOKENS,
) -> Encoded:
    """Prompt and answer tokenised separately and joined, so the boundary never merges."""
    prompt = render_prompt(tokenizer, task_input, choices, max_input_tokens)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = encode_answer(tokenizer, target, max_answer_tokens)
    return Encoded(
        input_ids=tuple(prompt_ids) + tuple(answer_ids),
        labels=(IGNORE_INDEX,) * len(prompt_ids) + tuple(answer_ids),
    )
