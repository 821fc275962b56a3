"""Structured output and tool calls: grammars that constrain decoding, per row.

Uses xgrammar (CPU and CUDA, about 2 us to fill a row's token mask here): a request
with ``response_format`` (``json_object`` or ``json_schema``) or with ``tools`` gets a
compiled grammar; each of its sequences gets a matcher that masks, at every step, the
tokens that would break the grammar. Other rows of the batch are untouched.

Tool calls are constrained by the schema :func:`openllm_clone.tools.plan_tools` makes
(the tools' protocol, the prompt and the parsing of the output live there, with no
torch or xgrammar: the routes import them).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

from openllm_clone.errors import InvalidRequestError, MissingDependencyError

__all__ = ["TAIL_TOKENS", "Constraint", "GrammarFactory"]


# In its last TAIL_TOKENS tokens a constrained sequence prefers, among the tokens its
# grammar allows, those that close structures, so that output cut by max_tokens still
# parses: at temperature 1 a small model can otherwise write digits or a string forever.
TAIL_TOKENS = 24
_CLOSER_TIERS = ('}]"', '}]",')
# Inside a string, '}' and ']' are text, and a model can write them forever: where the
# grammar allows letters (free text), tokens that end the string come first.
_QUOTE_CLOSERS = '"}],'


class Constraint:
    """A compiled grammar; ``matcher()`` makes the per-sequence state."""

    def __init__(
        self,
        compiled: Any,
        vocab_size: int,
        closers: list[Any] | None = None,
        text_probe: Any = None,
        quote_closers: Any = None,
    ) -> None:
        self.compiled = compiled
        self.vocab_size = vocab_size
        self.closers = closers or []  # bool masks over the vocabulary, most closing first
        self.text_probe = text_probe  # tokens of letters only: allowed inside strings alone
        self.quote_closers = quote_closers  # tokens that end a string ('"', '"}', '",' ...)

    def tail_tiers(self, allowed: Any) -> list[Any]:
        """Closing tokens to prefer, most closing first, given the tokens ``allowed`` now."""
        if self.text_probe is not None and bool((allowed & self.text_probe).any()):
            return [self.quote_closers, *self.closers]
        return self.closers

    def matcher(self) -> Any:
        import xgrammar as xgr

        return xgr.GrammarMatcher(self.compiled)


class GrammarFactory:
    """Compiles grammars for one tokenizer, caching them by schema."""

    def __init__(self, tokenizer: Any, vocab_size: int, cache_size: int = 128) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._compiler: Any = None
        self._cache: OrderedDict[str, Constraint] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._closers: list[Any] | None = None

    def _closer_masks(self) -> list[Any]:
        """Tokens made only of closing characters (one mask per tier), then the letters-only
        probe and the string-ending tokens (see :meth:`Constraint.tail_tiers`)."""
        if self._closers is None:
            import torch

            texts = [
                self.tokenizer.decode([i]) for i in range(min(len(self.tokenizer), self.vocab_size))
            ]

            def mask_of(test: Any) -> Any:
                mask = torch.zeros(self.vocab_size, dtype=torch.bool)
                for i, text in enumerate(texts):
                    stripped = text.strip()
                    if stripped and test(stripped):
                        mask[i] = True
                return mask

            tiers = [mask_of(lambda t, c=chars: set(t) <= set(c)) for chars in _CLOSER_TIERS]
            tiers.append(mask_of(str.isalpha))
            tiers.append(mask_of(lambda t: t[0] == '"' and set(t) <= set(_QUOTE_CLOSERS)))
            self._closers = tiers
        return self._closers

    def _get_compiler(self) -> Any:
        if self._compiler is None:
            try:
                import xgrammar as xgr
            except ImportError as exc:
                raise MissingDependencyError.for_extra("xgrammar", "structured") from exc
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
            self._compiler = xgr.GrammarCompiler(info)
        return self._compiler

    def json_schema(self, schema: dict[str, Any]) -> Constraint:
        """A grammar for JSON matching ``schema``."""
        key = json.dumps(schema, sort_keys=True)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            compiler = self._get_compiler()
            try:
                compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
            except Exception as exc:  # xgrammar raises RuntimeError/ValueError on bad schemas
                raise InvalidRequestError(
                    f"unsupported JSON schema: {exc}", param="response_format"
                ) from exc
            *closers, probe, quotes = self._closer_masks()
            constraint = Constraint(compiled, self.vocab_size, closers, probe, quotes)
            self._cache[key] = constraint
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return constraint
