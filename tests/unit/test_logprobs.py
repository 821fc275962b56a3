"""Logprobs from the engine equal ``log_softmax`` of a transformers forward (fp32), for the
generated tokens and the prompt's, on both runners, with an adapter, across chunked
prefill, the prefix cache and ``n > 1``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from openllm_clone.engine.sequence import TokenLogprob
from openllm_clone.llm import LLM
from openllm_clone.protocol import SamplingParams
from openllm_clone.settings import Settings

PROMPT = "Logprobs are the log of each token's probability, " * 5


@pytest.fixture(scope="module", params=["fast", "generic"])
def llm(
    request: pytest.FixtureRequest, tiny_model_dir: Path, tiny_adapters: dict[str, Path]
) -> Any:
    # A small prefill budget: the prompt is computed in several chunks.
    settings = Settings(
        model=str(tiny_model_dir),
        dtype="float32",
        device="cpu",
        runner=request.param,
        max_prefill_tokens=16,
        kv_cache_mb=32,
    )
    instance = LLM.from_settings(settings)
    asyncio.run(instance.adapters.load("alpha", str(tiny_adapters["alpha"])))
    yield instance
    instance.shutdown()


@pytest.fixture(scope="module")
def references(tiny_model_dir: Path, tiny_adapters: dict[str, Path]) -> dict[str | None, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    merged = (
        PeftModel.from_pretrained(merged, str(tiny_adapters["alpha"])).merge_and_unload().eval()
    )
    return {None: base, "alpha": merged}


def reference_logprobs(model: Any, tokens: list[int]) -> torch.Tensor:
    """Row ``p``: log-probabilities of the token after position ``p``."""
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), dim=-1)


def assert_entry(entry: TokenLogprob, ref_row: torch.Tensor, token: int, k: int) -> None:
    assert entry.token_id == token
    assert abs(entry.logprob - float(ref_row[token])) < 1e-4
    values, ids = torch.topk(ref_row, k)
    assert [t for t, _ in entry.top] == ids.tolist()  # complete and most likely first
    assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-4)


async def run(
    llm: LLM, ids: list[int], params: SamplingParams, adapter: str | None = None
) -> tuple[
    dict[int, list[int]], dict[int, list[TokenLogprob]], list[Any] | None, dict[int, str | None]
]:
    tokens: dict[int, list[int]] = {}
    logprobs: dict[int, list[TokenLogprob]] = {}
    reasons: dict[int, str | None] = {}
    prompt_lp = None
    async for out in llm.stream(ids, params, adapter=adapter):
        if out.prompt_logprobs is not None:
            assert prompt_lp is None, "prompt logprobs come once"
            prompt_lp = out.prompt_logprobs
        for d in out.deltas:
            tokens.setdefault(d.index, []).extend(d.token_ids)
            if d.logprobs is not None:
                assert len(d.logprobs) == len(d.token_ids)
                logprobs.setdefault(d.index, []).extend(d.logprobs)
            reasons[d.index] = d.finish_reason or reasons.get(d.index)
    return tokens, logprobs, prompt_lp, reasons


@pytest.mark.parametrize("adapter", [None, "alpha"])
async def test_generated_and_prompt_logprobs_equal_a_forward(
    llm: LLM, references: Any, adapter: str | None
) -> None:
    ids = llm.tokenize(PROMPT)
    assert len(ids) > 3 * 16  # several prefill chunks
    # The same prompt first without logprobs, so its blocks sit in the prefix cache.
    await llm.complete(ids, SamplingParams(max_new_tokens=2), adapter=adapter)
    params = SamplingParams(max_new_tokens=6, logprobs=5, prompt_logprobs=3, ignore_eos=True)
    tokens, logprobs, prompt_lp, _ = await run(llm, ids, params, adapter)
    ref = reference_logprobs(references[adapter], ids + tokens[0])
    assert len(logprobs[0]) == 6
    for j, entry in enumerate(logprobs[0]):
        assert_entry(entry, ref[len(ids) - 1 + j], tokens[0][j], 5)
        assert entry.token_id == int(ref[len(ids) - 1 + j].argmax())  # greedy
    assert prompt_lp is not None and len(prompt_lp) == len(ids) and prompt_lp[0] is None
    for p in range(1, len(ids)):
        assert_entry(prompt_lp[p], ref[p - 1], ids[p], 3)


async def test_scoring_only_and_empty_requests(llm: LLM, references: Any) -> None:
    ids = llm.tokenize(PROMPT)
    tokens, logprobs, prompt_lp, reasons = await run(
        llm, ids, SamplingParams(max_new_tokens=0, prompt_logprobs=0, logprobs=0)
    )
    assert tokens == {0: []} and logprobs == {0: []} and reasons == {0: "length"}
    ref = reference_logprobs(references[None], ids)
    assert prompt_lp is not None and len(prompt_lp) == len(ids)
    assert all(
        abs(prompt_lp[p].logprob - float(ref[p - 1, ids[p]])) < 1e-4 and not prompt_lp[p].top
        for p in range(1, len(ids))
    )
    # Nothing asked of the prompt and nothing to generate: an empty answer, at once.
    tokens, _, prompt_lp, reasons = await run(llm, ids, SamplingParams(max_new_tokens=0, n=2))
    assert tokens == {0: [], 1: []} and prompt_lp is None and reasons == {0: "length", 1: "length"}
    assert llm.engine.stats()["kv_blocks_used"] == 0 and llm.engine.num_pending == 0


async def test_sampled_rows_report_the_models_own_distribution(llm: LLM, references: Any) -> None:
    """With n > 1, sampling and penalties, each token's logprob is still the raw model's; a
    request without logprobs in the same batch gets none."""
    ids = llm.tokenize("Sampling with logprobs")
    params = SamplingParams(
        max_new_tokens=5,
        n=3,
        temperature=1.0,
        seed=7,
        logprobs=2,
        frequency_penalty=1.5,
        ignore_eos=True,
    )
    (tokens, logprobs, _, _), (_, plain_lp, _, _) = await asyncio.gather(
        run(llm, ids, params), run(llm, ids, SamplingParams(max_new_tokens=5))
    )
    assert plain_lp == {}
    for i in range(3):
        ref = reference_logprobs(references[None], ids + tokens[i])
        for j, entry in enumerate(logprobs[i]):
            assert_entry(entry, ref[len(ids) - 1 + j], tokens[i][j], 2)
