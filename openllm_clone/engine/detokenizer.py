"""Incremental detokenization and stop strings.

Decoding one token at a time breaks multi-byte characters and, for SentencePiece
tokenizers, the spaces between words. Like TGI and vLLM we decode a short window of
tokens twice (with and without the new ones) and emit the difference, and hold text
back while it ends in an incomplete character (U+FFFD) or could still become a stop
string.
"""

from __future__ import annotations

from typing import Any

__all__ = ["IncrementalDetokenizer", "StopStringMatcher"]

_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        context = prompt_ids[-_CONTEXT_TOKENS:]
        self.ids: list[int] = list(context)
        self.prefix_offset = 0
        self.read_offset = len(context)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def add(self, token_id: int) -> str:
        """Append a token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Text still held back at the end of generation (a dangling partial byte)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :].rstrip("\ufffd") if len(full) > len(prefix) else ""


class StopStringMatcher:
    """Finds stop strings in streamed text without emitting a partial match."""

    def __init__(self, stop: list[str]) -> None:
        self.stop = [s for s in stop if s]
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Add text; return what can be sent now. Sets ``stopped`` on a match."""
        if self.stopped:
            return ""
        self.text += delta
        if not self.stop:
            out = self.text[self.emitted :]
            self.emitted = len(self.text)
            return out
        longest = max(len(s) for s in self.stop)
        search_from = max(0, self.emitted - longest + 1)
        hits = [p for p in (self.text.find(s, search_from) for s in self.stop) if p != -1]
        if hits:
            cut = min(hits)
            self.text = self.text[:cut]
            self.stopped = True
            out = self.text[self.emitted :]
            self.emitted = len(self.text)
            return out
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        end = len(self.text) - hold
        out = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out

    def flush(self) -> str:
        """At the end of generation, release held-back text."""
        if self.stopped:
            return ""
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out
