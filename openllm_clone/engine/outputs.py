"""What the engine does with a row's logits and its sampled token, apart from scheduling:
log-probabilities (of the model's own distribution, before anything edits the logits),
grammar masks, and a token's text, stop strings and finish reason."""

from __future__ import annotations

import torch

from openllm_clone.runners.base import StepRow

from .sequence import SeqDelta, Sequence, TokenLogprob

__all__ = ["append_token", "grammar_mask", "prompt_logprobs", "token_logprobs", "wants_all_logits"]


def wants_all_logits(seq: Sequence) -> bool:
    """True while ``seq``'s prompt still has positions whose logprobs the request asked for."""
    return seq.group.wants_prompt_logits and seq.num_cached < len(seq.group.prompt_ids) - 1


def token_logprobs(logprobs: torch.Tensor, targets: list[int], ks: list[int]) -> list[TokenLogprob]:
    """Row ``j``'s ``targets[j]`` with its logprob and the row's ``ks[j]`` most likely tokens."""
    chosen = logprobs.gather(1, torch.tensor(targets).unsqueeze(1))[:, 0].tolist()
    tops = _top(logprobs, max(ks, default=0))
    return [TokenLogprob(t, chosen[j], tops[j][: ks[j]]) for j, t in enumerate(targets)]


def _top(logprobs: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """Each row's ``k`` most likely tokens, most likely first: ``(token id, logprob)``."""
    if k <= 0:
        return [[] for _ in range(logprobs.shape[0])]
    values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]), dim=-1)
    return [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]


def prompt_logprobs(seq: Sequence, row: StepRow, logits: torch.Tensor) -> None:
    """Record the prompt tokens' logprobs from a chunk's logits (row ``j`` is position
    ``row.start_pos + j`` and predicts the token after it); positions already recorded
    (before a preemption) are skipped."""
    group, start = seq.group, row.start_pos
    prompt = group.prompt_ids
    first = len(group.prompt_lp) - start
    last = min(logits.shape[0], len(prompt) - 1 - start)
    if first >= last:
        return
    lp = torch.log_softmax(logits[first:last].float(), dim=-1)
    targets = prompt[start + first + 1 : start + last + 1]
    group.prompt_lp.extend(
        token_logprobs(lp, targets, [group.params.prompt_logprobs or 0] * len(targets))
    )


def grammar_mask(logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
    """Forbid, row by row, the tokens each sequence's grammar does not allow (in place).
    Near the end of its token budget a row is narrowed to the tokens that close its
    structure soonest (the constraint's tail tiers)."""
    import xgrammar as xgr

    from openllm_clone.structured import TAIL_TOKENS

    vocab = seqs[0].group.constraint.vocab_size
    bitmask = xgr.allocate_token_bitmask(len(seqs), vocab)
    for k, seq in enumerate(seqs):
        assert seq.matcher is not None  # only constrained rows come here
        seq.matcher.fill_next_token_bitmask(bitmask, k)
    sub = logits[rows, :vocab].contiguous()
    xgr.apply_token_bitmask_inplace(sub, bitmask)
    for k, seq in enumerate(seqs):
        if seq.params.max_new_tokens - len(seq.output_ids) > TAIL_TOKENS:
            continue
        allowed = sub[k] > float("-inf")
        for closers in seq.group.constraint.tail_tiers(allowed):
            pick = allowed & closers[:vocab]
            if bool(pick.any()):
                sub[k].masked_fill_(~pick, float("-inf"))
                break
    logits[rows, :vocab] = sub
    if logits.shape[1] > vocab:  # padded vocabulary rows beyond the tokenizer's
        logits[rows, vocab:] = float("-inf")


def append_token(seq: Sequence, token: int, eos_ids: set[int], max_model_len: int) -> SeqDelta:
    """Add a sampled token to ``seq``: its grammar state, its text (held back while it may
    still become a stop string) and its finish reason, when this token ends it."""
    seq.output_ids.append(token)
    params = seq.params
    finish: str | None = None
    text = ""
    if seq.matcher is not None and token not in eos_ids:
        seq.matcher.accept_token(token)
    if token in eos_ids and not params.ignore_eos:
        finish = "stop"
    else:
        text = seq.stops.feed(seq.detok.add(token))
        if seq.stops.stopped:
            finish = "stop"
    if finish is None and seq.matcher is not None and seq.matcher.is_terminated():
        finish = "stop"
    if finish is None and (
        len(seq.output_ids) >= params.max_new_tokens or seq.num_tokens >= max_model_len
    ):
        finish = "length"
    if finish is not None and not seq.stops.stopped:
        text += seq.stops.feed(seq.detok.flush()) + seq.stops.flush()
    return SeqDelta(index=seq.index, text=text, token_ids=[token], finish_reason=finish)
