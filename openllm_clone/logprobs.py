"""Token log-probabilities in the shapes clients expect: OpenAI completions, OpenAI chat, TGI.

The engine gives :class:`~openllm_clone.engine.sequence.TokenLogprob` entries (token ids);
this turns ids into the token's text (what ``decode([id])`` gives, as vLLM returns) and its
bytes (the token's real bytes: a byte-level BPE token that is half of a UTF-8 character
has the bytes of that half, not of the replacement character its text shows).
"""

from __future__ import annotations

import json
import re
from typing import Any

from .protocol import TokenLogprob

__all__ = [
    "TokenStrings",
    "chat_logprobs",
    "completion_logprobs",
    "merge_completion_logprobs",
    "prompt_completion_logprobs",
]

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece byte fallback


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted (the alphabet of byte-level BPE)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes, strict=True)}


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    try:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
    except Exception:  # noqa: BLE001 - a tokenizer without a serialisable decoder
        return False
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders") or []]
    return "ByteLevel" in kinds


class TokenStrings:
    """Text, bytes and special-ness of token ids, memoised."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._bytes_of = _byte_decoder() if _is_byte_level(tokenizer) else None
        self._special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self._text: dict[int, str] = {}
        self._raw: dict[int, list[int]] = {}

    def text(self, token: int) -> str:
        """The token as text (``decode([id])``)."""
        found = self._text.get(token)
        if found is None:
            found = self._text[token] = self.tokenizer.decode([token])
        return found

    def bytes(self, token: int) -> list[int]:
        """The token's UTF-8 bytes (OpenAI's ``bytes``)."""
        found = self._raw.get(token)
        if found is None:
            found = self._raw[token] = self._token_bytes(token)
        return found

    def special(self, token: int) -> bool:
        """True for the tokenizer's special tokens (TGI's ``special``)."""
        return token in self._special

    def _token_bytes(self, token: int) -> list[int]:
        if token in self._special:
            return list(self.text(token).encode())
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if isinstance(piece, str):
            if self._bytes_of is not None and all(ch in self._bytes_of for ch in piece):
                return [self._bytes_of[ch] for ch in piece]
            match = _BYTE_TOKEN.match(piece)
            if match:
                return [int(match.group(1), 16)]
            if self._bytes_of is None:
                return list(piece.replace("\u2581", " ").encode())
        return list(self.text(token).encode())


def completion_logprobs(
    strings: TokenStrings, entries: list[TokenLogprob | None], offset: int
) -> tuple[dict[str, Any], int]:
    """OpenAI completions' ``logprobs`` object for ``entries`` (None: a prompt's first
    token, which has no logprob) whose text starts at character ``offset`` of the choice's
    text; also returns the offset after them. ``top_logprobs`` holds the alternatives and
    the chosen token, as OpenAI says ("up to logprobs + 1 elements")."""
    tokens, values, tops, offsets = [], [], [], []
    for entry in entries:
        if entry is None:
            continue
        text = strings.text(entry.token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        values.append(entry.logprob)
        top = {strings.text(t): v for t, v in entry.top}
        top.setdefault(text, entry.logprob)
        tops.append(top)
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }, offset


def prompt_completion_logprobs(
    strings: TokenStrings, prompt: list[TokenLogprob | None], prompt_ids: list[int]
) -> tuple[dict[str, Any], int]:
    """The echoed prompt's share of a completions ``logprobs`` object: its first token has
    ``null`` logprob and alternatives, as OpenAI returns it."""
    first = strings.text(prompt_ids[0])
    rest, offset = completion_logprobs(strings, prompt[1:], len(first))
    return {
        "tokens": [first, *rest["tokens"]],
        "token_logprobs": [None, *rest["token_logprobs"]],
        "top_logprobs": [None, *rest["top_logprobs"]],
        "text_offset": [0, *rest["text_offset"]],
    }, offset


def merge_completion_logprobs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two consecutive ``logprobs`` objects as one."""
    return {key: a[key] + b[key] for key in a}


def chat_logprobs(strings: TokenStrings, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    """OpenAI chat's ``logprobs.content`` list for ``entries``."""

    def item(token: int, value: float) -> dict[str, Any]:
        return {"token": strings.text(token), "logprob": value, "bytes": strings.bytes(token)}

    return [
        {**item(e.token_id, e.logprob), "top_logprobs": [item(t, v) for t, v in e.top]}
        for e in entries
    ]
