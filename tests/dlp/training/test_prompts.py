"""The shared prompt format: chat template, answer-only labels, truncation."""

from __future__ import annotations

import pytest

from dlp.errors import DlpError
from dlp.training.prompts import (
    IGNORE_INDEX,
    chat_messages,
    encode_example,
    end_of_turn,
    render_prompt,
    truncate_input,
    user_text,
)


def test_user_text_lists_the_options_for_mcq_only():
    assert user_text(" what? ", ["a", " b "]) == "what?\n\nOptions:\n- a\n- b"
    assert user_text("say hi", None) == "say hi"
    assert chat_messages("say hi") == [{"role": "user", "content": "say hi"}]


def test_prompt_uses_the_chat_template_and_ends_at_the_assistant_header(tokenizer):
    prompt = render_prompt(tokenizer, "is 3 even or odd?", ["even", "odd"])
    assert prompt == (
        "<|im_start|>user\nis 3 even or odd?\n\nOptions:\n- even\n- odd<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert end_of_turn(tokenizer) == "<|im_end|>"


def test_labels_cover_exactly_the_answer_and_the_end_of_turn(tokenizer):
    enc = encode_example(tokenizer, "say cat twice", "cat cat")
    prompt_ids = tokenizer(render_prompt(tokenizer, "say cat twice"), add_special_tokens=False)[
        "input_ids"
    ]
    n = len(prompt_ids)
    assert list(enc.input_ids[:n]) == prompt_ids
    assert all(label == IGNORE_INDEX for label in enc.labels[:n])
    assert list(enc.labels[n:]) == list(enc.input_ids[n:])
    assert tokenizer.decode(enc.input_ids[n:]) == "cat cat<|im_end|>"
    assert enc.n_answer_tokens == len("cat cat") + 1  # byte tokens + <|im_end|>


def test_long_answers_are_cut_but_keep_the_stop_token(tokenizer):
    enc = encode_example(tokenizer, "q", "abcdefghij", max_answer_tokens=4)
    answer = [t for t in enc.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(answer) == "abcd<|im_end|>"


def test_truncation_keeps_the_end_of_the_input(tokenizer):
    assert truncate_input(tokenizer, "0123456789", 4) == "6789"
    assert truncate_input(tokenizer, "short", 40) == "short"
    prompt = render_prompt(tokenizer, "x" * 500 + " final question", max_input_tokens=20)
    assert "final question" in prompt and "x" * 30 not in prompt


def test_a_tokenizer_without_chat_template_is_refused(tokenizer):
    bare = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(DlpError, match="chat template"):
        render_prompt(bare, "q")
