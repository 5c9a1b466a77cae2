"""Remove task boilerplate from example inputs so a router must read the content.

BIG-bench examples carry fixed wording that identifies the task without reading the example:
the harness strings in task.json (``task_prefix``, ``example_input_prefix``), a fixed opening
("Premise:", "Short Answer:", "This AI is identifying whether statements contain fallacies...")
or closing question ("Is the argument ... deductively valid or invalid?"), and field labels
repeated inside each example ("Claim:"). Rules, applied per task file (subtask):

1. drop the file's ``task_prefix`` / ``example_input_prefix`` when an input starts with one;
2. replace the task's declared field labels (tasks.TaskSpec.labels) by a line break;
3. drop the longest word-aligned prefix, and then suffix, that at least ``min_share`` (90%)
   of the file's inputs share, cut at a clause boundary (see ``_affix``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_WORD = re.compile(r"\s*\S+")
_MAX_WORDS = 40  # boilerplate is a sentence or two; don't scan whole documents
_BOUNDARY = ":?.!;"


def _ends_clause(token: str) -> bool:
    # A quote that ends in punctuation ('... awhile."') is content, not a clause boundary.
    core = token.rstrip()
    return bool(core) and core[-1] in _BOUNDARY


def _starts_line(token: str) -> bool:
    return "\n" in token[: len(token) - len(token.lstrip())]


def _edge_tokens(text: str, from_end: bool) -> list[str]:
    """The first (or last) _MAX_WORDS + 2 word tokens, without tokenizing a whole document.

    Only the count matters for the "input keeps some content" rule, so a long text is marked
    by one extra placeholder token on the far side.
    """
    window = 16 * (_MAX_WORDS + 2)
    if len(text) <= window:
        return _WORD.findall(text)
    if from_end:
        tail = _WORD.findall(text[-window:])[1:]  # the first token may be a cut word
        return ["\0", *tail[-(_MAX_WORDS + 2) :]]
    head = [m.group() for m, _ in zip(_WORD.finditer(text), range(_MAX_WORDS + 2), strict=False)]
    return [*head, "\0"]


def _edge_word(text: str, from_end: bool) -> str:
    words = text.rsplit(None, 1) if from_end else text.split(None, 1)
    return (words[-1] if from_end else words[0]) if words else ""


def _affix(texts: Sequence[str], min_share: float, from_end: bool) -> str:
    """Longest word-aligned prefix (or suffix) shared by ``min_share`` of ``texts`` that ends
    (or starts) at a clause boundary: punctuation like ``:`` ``?`` ``.`` or a line break.

    The boundary rule removes whole fixed sentences and field labels but never cuts a sentence
    in half ("On the| nightstand ..." stays). An affix must leave content in an input, and
    carry at least two letters (a shared final "." is not boilerplate).
    """
    if not texts:
        return ""
    need = max(1, math.ceil(min_share * len(texts) - 1e-9))
    # Fast exit for most tasks: no shared first (last) word means no shared affix.
    edge = Counter(_edge_word(t, from_end) for t in texts)
    if edge.most_common(1)[0][1] < need:
        return ""
    tokens = [_edge_tokens(t, from_end) for t in texts]
    best = ""
    for k in range(1, _MAX_WORDS + 1):
        keys: list[str | None] = []
        for tok in tokens:
            if len(tok) <= k:
                keys.append(None)
            else:
                keys.append("".join(tok[-k:] if from_end else tok[:k]).strip())
        counts = Counter(key for key in keys if key is not None)
        if not counts:
            break
        cand, n = counts.most_common(1)[0]
        if n < need:
            break
        at_boundary = 0
        for tok, key in zip(tokens, keys, strict=True):
            if key != cand:
                continue
            if from_end:
                at_boundary += _ends_clause(tok[-k - 1]) or _starts_line(tok[-k])
            else:
                at_boundary += _ends_clause(tok[k - 1]) or _starts_line(tok[k])
        if at_boundary >= need and sum(ch.isalpha() for ch in cand) >= 2:
            best = cand
    return best


def common_prefix(texts: Sequence[str], min_share: float = 0.9) -> str:
    """Fixed opening shared by at least ``min_share`` of ``texts`` ('' if none)."""
    return _affix(texts, min_share, from_end=False)


def common_suffix(texts: Sequence[str], min_share: float = 0.9) -> str:
    """Fixed closing shared by at least ``min_share`` of ``texts`` ('' if none)."""
    return _affix(texts, min_share, from_end=True)


def replace_labels(text: str, labels: Sequence[str]) -> str:
    for label in labels:
        if label in text:
            parts = re.split(r"(?<!\w)" + re.escape(label) + r"\s*", text)
            text = "\n".join(p.rstrip() for p in parts)
    return text


def drop_harness_prefixes(text: str, fixed: Sequence[str]) -> str:
    stripped = text.lstrip()
    for prefix in fixed:
        p = prefix.strip()
        if p and stripped.startswith(p):
            stripped = stripped[len(p) :].lstrip()
    return stripped


def strip_boilerplate(
    texts: Sequence[str],
    *,
    harness_prefixes: Sequence[str] = (),
    labels: Sequence[str] = (),
    min_share: float = 0.9,
) -> tuple[list[str], str, str]:
    """Strip one task file's inputs; returns (stripped inputs, removed prefix, removed suffix)."""
    cleaned = [
        replace_labels(drop_harness_prefixes(t, harness_prefixes), labels).strip() for t in texts
    ]
    prefix = common_prefix(cleaned, min_share)
    if prefix:
        cleaned = [
            t[len(prefix) :].strip() if t.startswith(prefix) and len(t) > len(prefix) else t
            for t in cleaned
        ]
    suffix = common_suffix(cleaned, min_share)
    if suffix:
        cleaned = [
            t[: -len(suffix)].strip() if t.endswith(suffix) and len(t) > len(suffix) else t
            for t in cleaned
        ]
    return cleaned, prefix.strip(), suffix.strip()
