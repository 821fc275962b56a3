"""Token selection for a batch of rows, each with its own sampling parameters."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from openllm_clone.protocol import SamplingParams

__all__ = ["apply_logit_bias", "apply_openai_penalties", "apply_repetition_penalty", "sample_rows"]

# Below this, dividing by the temperature overflows for ordinary logits: decode greedily,
# which is the limit of sampling as the temperature goes to zero.
_MIN_TEMPERATURE = 1e-4


def apply_repetition_penalty(logits: torch.Tensor, seen: list[int], penalty: float) -> None:
    """CTRL's penalty, in place: divide positive logits of seen tokens, multiply negative."""
    if penalty == 1.0 or not seen:
        return
    idx = torch.tensor(sorted(set(seen)), dtype=torch.long)
    score = logits.index_select(0, idx)
    score = torch.where(score < 0, score * penalty, score / penalty)
    logits.index_copy_(0, idx, score)


def apply_openai_penalties(
    logits: torch.Tensor, output_ids: list[int], frequency: float, presence: float
) -> None:
    """OpenAI's frequency and presence penalties, in place, over the generated tokens:
    ``logit[t] -= frequency * count[t] + presence * (count[t] > 0)``."""
    if (frequency == 0.0 and presence == 0.0) or not output_ids:
        return
    ids, counts = torch.unique(torch.tensor(output_ids, dtype=torch.long), return_counts=True)
    keep = ids < logits.shape[-1]
    ids, counts = ids[keep], counts[keep].to(logits.dtype)
    logits.index_add_(0, ids, -(frequency * counts + presence))


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float] | None) -> None:
    """OpenAI's ``logit_bias``, in place: each listed token's bias added to its logit."""
    if not bias:
        return
    ids = torch.tensor(list(bias), dtype=torch.long)
    logits.index_add_(0, ids, torch.tensor(list(bias.values()), dtype=logits.dtype))


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        cum = probs.cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (always the first token).
        drop = (cum - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    return logits


def sample_rows(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    seen_tokens: Sequence[list[int]],
    output_tokens: Sequence[list[int]] | None = None,
) -> list[int]:
    """Pick one token per row of ``logits`` (fp32, ``[rows, vocab]``).

    ``seen_tokens`` (prompt and output) feed the repetition penalty, ``output_tokens``
    OpenAI's frequency and presence penalties; ``logit_bias`` is added after them.
    """
    for i, p in enumerate(params):
        apply_repetition_penalty(logits[i], seen_tokens[i], p.repetition_penalty)
        if output_tokens is not None:
            apply_openai_penalties(
                logits[i], output_tokens[i], p.frequency_penalty, p.presence_penalty
            )
        apply_logit_bias(logits[i], p.logit_bias)
    # Extreme penalties can overflow: keep every logit finite or -inf.
    logits.nan_to_num_(nan=float("-inf"), posinf=torch.finfo(logits.dtype).max / 4)
    greedy = logits.argmax(dim=-1).tolist()
    out: list[int] = []
    for i, p in enumerate(params):
        if p.greedy or p.temperature < _MIN_TEMPERATURE:
            out.append(int(greedy[i]))
            continue
        row = _filter(logits[i].double() / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(row, dim=-1)
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
            out.append(int(greedy[i]))  # degenerate distribution: its mode is the answer
            continue
        out.append(int(torch.multinomial(probs, 1, generator=generators[i]).item()))
    return out
