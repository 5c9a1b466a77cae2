"""Incremental detokenisation and stop strings.

Decoding the whole output after every token costs O(n^2); like TGI/vLLM we decode a short
window (from a prefix offset) and emit only text that can no longer change. A partial UTF-8
sequence decodes to U+FFFD, so such text is held back until the next token completes it.
Text that could be the start of a stop string is also held back, so a stop string is never
streamed and then taken back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # all text decoded so far (may hold a pending stop-string prefix)
        self.emitted = 0  # chars of ``text`` already handed out
        self._prefix_offset = 0
        self._read_offset = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly final text (maybe ''). After a stop string is
        found, ``stopped`` is True and ``text`` ends just before it."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
        return self._release()

    def _release(self) -> str:
        if self.stop:
            # Search only where a new match can start: just before the unreleased text.
            start = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self._take(len(self.text))
            return self._take(len(self.text) - _pending_stop_prefix(self.text, self.stop))
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out

    def flush(self) -> str:
        """At the end of generation: whatever is still held back (a partial stop prefix)."""
        return self._take(len(self.text))


def _pending_stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
