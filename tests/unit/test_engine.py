"""The runner and engine on a tiny random Llama: exactness, batching, cancellation, KV."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from openllm_clone.runners.base import StepRow

from openllm_clone.llm import LLM
from openllm_clone.protocol import SamplingParams
from openllm_clone.settings import Settings


def make_llm(model_dir: Path, **overrides: Any) -> LLM:
    settings = Settings(model=str(model_dir), dtype="float32", device="cpu", **overrides)
    return LLM.from_settings(settings)


@pytest.fixture(scope="module")
def llm(tiny_model_dir: Path) -> Any:
    instance = make_llm(tiny_model_dir, max_batch_size=16, kv_cache_mb=32)
    yield instance
    instance.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Any:
    """transformers' own model from the same folder (the runner's copy has packed weights)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


def prompts(n: int) -> list[str]:
    topics = [
        "the sea",
        "a red fox",
        "quantum dots",
        "bread",
        "Paris in spring",
        "old maps",
        "rain",
        "a violin",
        "chess openings",
        "volcanoes",
        "tea",
        "the moon",
        "glaciers",
        "jazz",
        "honeybees",
        "lighthouses",
    ]
    return [f"Tell me about {topics[i % len(topics)]}, part {i}." * (1 + i % 3) for i in range(n)]


def test_runner_logits_match_transformers(llm: LLM, reference: Any) -> None:
    runner = llm.runner
    model = reference
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (5, 1, 40, 17)]
    blocks = llm.engine.blocks
    tables = [[blocks.allocate() for _ in range(4)] for _ in seqs]
    try:
        first = runner.step([StepRow(s[:-1] or s, 0, t) for s, t in zip(seqs, tables)])
        second = runner.step(
            [StepRow([s[-1]], len(s) - 1, t) for s, t in zip(seqs, tables) if len(s) > 1]
        )
        k = 0
        for i, s in enumerate(seqs):
            ref = model(torch.tensor([s])).logits[0].float()
            if len(s) > 1:
                torch.testing.assert_close(first[i], ref[-2], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(second[k], ref[-1], atol=1e-4, rtol=1e-4)
                k += 1
    finally:
        for t in tables:
            blocks.free(t)


async def test_greedy_outputs_are_batch_invariant(llm: LLM) -> None:
    params = SamplingParams(max_new_tokens=24)
    ids = [llm.tokenize(p) for p in prompts(16)]
    alone = [(await llm.complete(i, params)).token_ids[0] for i in ids]
    together = await asyncio.gather(*(llm.complete(i, params) for i in ids))
    assert [c.token_ids[0] for c in together] == alone
    assert llm.engine.stats()["kv_blocks_used"] == 0


async def test_matches_transformers_generate(llm: LLM, reference: Any) -> None:
    ids = llm.tokenize("The quick brown fox")
    ours = (await llm.complete(ids, SamplingParams(max_new_tokens=12))).token_ids[0]
    ref = reference.generate(
        torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert ours == ref[0, len(ids) :].tolist()


async def test_cancel_frees_the_slot_within_a_step(llm: LLM) -> None:
    ids = llm.tokenize("count forever")
    stream = llm.stream(ids, SamplingParams(max_new_tokens=500))
    got = 0
    async for _ in stream:
        got += 1
        if got == 3:
            break
    await stream.aclose()
    for _ in range(100):
        stats = llm.engine.stats()
        if stats["running"] == 0 and stats["pending"] == 0:
            break
        await asyncio.sleep(0.01)
    assert stats["running"] == 0 and stats["pending"] == 0 and stats["kv_blocks_used"] == 0


async def test_seeded_sampling_is_reproducible(llm: LLM) -> None:
    ids = llm.tokenize("Once upon a time")
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    runs = await asyncio.gather(*(llm.complete(ids, params) for _ in range(3)))
    assert runs[0].token_ids == runs[1].token_ids == runs[2].token_ids
    other = await llm.complete(ids, params.model_copy(update={"seed": 99}))
    assert other.token_ids != runs[0].token_ids


async def test_parallel_samples_share_the_prompt_kv(llm: LLM) -> None:
    ids = llm.tokenize("word " * 200)[:190]  # 12 blocks of 16
    engine = llm.engine
    engine.blocks.peak_used = 0
    params = SamplingParams(max_new_tokens=4, temperature=1.0, seed=5, n=4)
    result = await llm.complete(ids, params)
    assert len(result.token_ids) == 4 and all(len(t) == 4 for t in result.token_ids)
    assert len({tuple(t) for t in result.token_ids}) > 1  # different samples
    # 190 tokens = 11 full blocks + a partial one. Without sharing 4 samples hold
    # 4 x 13 = 52 blocks; shared: 12 + one copied tail per extra sample + one new block
    # each when the tail fills up = 19.
    assert engine.blocks.peak_used <= 12 + 3 + 4
    assert engine.stats()["kv_blocks_used"] == 0


def test_block_allocator_prefix_cache() -> None:
    from openllm_clone.engine.kv_cache import BlockAllocator, block_hash

    blocks = BlockAllocator(5, 16)  # blocks 1..4 usable
    a, b = blocks.allocate(), blocks.allocate()
    k1 = block_hash(None, list(range(16)))
    k2 = block_hash(k1, list(range(16, 32)))
    blocks.register(a, k1)
    blocks.register(b, k2)
    assert blocks.lookup([k1, block_hash(k1, [0] * 16)]) == [a]  # longest known prefix
    assert blocks.refcount(a) == 2
    blocks.free([a, a, b])
    # Unheld but cached: free for capacity, still found.
    assert blocks.num_free == 4 and blocks.num_used == 0 and blocks.num_cached == 2
    assert blocks.lookup([k1, k2]) == [a, b] and blocks.num_used == 2
    blocks.free([a, b])
    # Plain free blocks go first; then the least recently freed cached one (a).
    taken = [blocks.allocate() for _ in range(3)]
    assert a in taken and b not in taken and blocks.num_cached == 1
    assert blocks.lookup([k1]) == []
    assert blocks.prefix_hits == 3
    off = BlockAllocator(5, 16, prefix_caching=False)
    c = off.allocate()
    off.register(c, k1)
    assert off.lookup([k1]) == [] and off.num_cached == 0


async def test_prefix_cache_skips_computing_a_shared_prefix(
    llm: LLM, tiny_adapters: dict[str, Path], reference: Any
) -> None:
    engine, model = llm.engine, reference
    system = llm.tokenize("You are a helpful assistant who answers briefly. " * 12)[:64]
    assert len(system) == 64  # 4 blocks
    first = system + llm.tokenize(" Tell me about the sea.")
    second = system + llm.tokenize(" What is a violin?")
    params = SamplingParams(max_new_tokens=10)

    def expected(ids: list[int]) -> list[int]:
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        return out[0, len(ids) :].tolist()

    hits = engine.stats()["prefix_cache_hits"]
    computed_before = engine.steps
    got = (await llm.complete(first, params)).token_ids[0]
    assert got == expected(first)
    # Another question after the same system prompt: its 4 blocks come from the cache.
    got = (await llm.complete(second, params)).token_ids[0]
    assert got == expected(second)
    assert engine.stats()["prefix_cache_hits"] - hits >= 4
    # The same prompt again: everything but the block holding its last token is reused.
    again = (await llm.complete(second, params)).token_ids[0]
    assert again == got
    assert engine.steps > computed_before
    # An adapter changes every key and value: no block computed without it matches.
    await llm.adapters.load("alpha", str(tiny_adapters["alpha"]))
    hits = engine.stats()["prefix_cache_hits"]
    with_adapter = (await llm.complete(second, params, adapter="alpha")).token_ids[0]
    assert engine.stats()["prefix_cache_hits"] == hits
    assert with_adapter != got
    assert (await llm.complete(second, params, adapter="alpha")).token_ids[0] == with_adapter
    assert engine.stats()["prefix_cache_hits"] > hits
    # Reloading the adapter (new weights in its slot) makes its cached blocks stale.
    await llm.adapters.unload("alpha")
    await llm.adapters.load("alpha", str(tiny_adapters["beta"]))
    hits = engine.stats()["prefix_cache_hits"]
    await llm.complete(second, params, adapter="alpha")
    assert engine.stats()["prefix_cache_hits"] == hits
    await llm.adapters.unload("alpha")
    assert engine.stats()["kv_blocks_used"] == 0


async def test_stop_strings_end_generation(llm: LLM) -> None:
    ids = llm.tokenize("Tell me about the sea.")
    free = await llm.complete(ids, SamplingParams(max_new_tokens=30))
    text = free.texts[0]
    assert len(text) > 6
    stop = text[3:6]
    cut = await llm.complete(ids, SamplingParams(max_new_tokens=30, stop=[stop]))
    assert cut.finish_reasons == ["stop"]
    assert cut.texts[0] == text[: text.find(stop)]


async def test_kv_pressure_preempts_and_recomputes(tiny_model_dir: Path) -> None:
    # 1 MiB of KV for the tiny model is 128 blocks of 16 tokens: too few for 8 x ~270 tokens.
    from openllm_clone.engine.kv_cache import blocks_for

    small = make_llm(tiny_model_dir, kv_cache_mb=1, max_batch_size=8)
    try:
        params = SamplingParams(max_new_tokens=250)
        ids = [small.tokenize(p) for p in prompts(8)]
        needed = sum(blocks_for(len(i) + 250, 16) for i in ids)
        assert needed > small.engine.blocks.num_blocks - 1
        alone = [(await small.complete(i, params)).token_ids[0] for i in ids]
        together = await asyncio.gather(*(small.complete(i, params) for i in ids))
        assert [c.token_ids[0] for c in together] == alone
        assert small.engine.stats()["kv_blocks_used"] == 0
    finally:
        small.shutdown()


async def test_too_long_request_is_rejected_with_both_numbers(llm: LLM) -> None:
    from openllm_clone.errors import InvalidRequestError

    ids = llm.tokenize("hi there")
    with pytest.raises(
        InvalidRequestError, match=rf"\({len(ids)} tokens\).*\(1024\).*context of 1024"
    ):
        await llm.complete(ids, SamplingParams(max_new_tokens=1024))


async def test_repetition_penalty_runs_in_the_engine(llm: LLM) -> None:
    ids = llm.tokenize("the the the the")
    plain = await llm.complete(ids, SamplingParams(max_new_tokens=12))
    penalised = await llm.complete(ids, SamplingParams(max_new_tokens=12, repetition_penalty=5.0))
    assert len(penalised.token_ids[0]) == 12
    assert penalised.token_ids[0] != plain.token_ids[0]


async def test_constraints_apply_per_row_in_a_mixed_batch(llm: LLM) -> None:
    import json

    pytest.importorskip("xgrammar")
    schema = {
        "type": "object",
        "properties": {"word": {"type": "string", "maxLength": 12}, "n": {"type": "integer"}},
        "required": ["word", "n"],
    }
    constraint = llm.constraint_for({"type": "json_schema", "json_schema": {"schema": schema}})
    free_ids = [llm.tokenize(p) for p in prompts(4)]
    params = SamplingParams(max_new_tokens=40)
    alone = [(await llm.complete(i, params)).token_ids[0] for i in free_ids]
    mixed = await asyncio.gather(
        *(llm.complete(i, params) for i in free_ids),
        *(
            llm.complete(
                i, SamplingParams(max_new_tokens=40, temperature=1.0, seed=s), constraint=constraint
            )
            for s, i in enumerate(free_ids)
        ),
    )
    assert [m.token_ids[0] for m in mixed[:4]] == alone  # unconstrained rows untouched
    for m in mixed[4:]:
        data = json.loads(m.texts[0])  # a random model, yet every constrained row parses
        assert set(data) == {"word", "n"} and isinstance(data["n"], int)


async def test_timeout_ends_the_request_and_frees_its_slot(llm: LLM) -> None:
    from openllm_clone.errors import RequestTimeoutError

    old = llm.settings.timeout
    llm.settings.timeout = 0.3
    try:
        got = 0
        with pytest.raises(RequestTimeoutError, match="timed out"):
            async for out in llm.stream(
                llm.tokenize("long"), SamplingParams(max_new_tokens=900, ignore_eos=True)
            ):
                got += len(out.deltas)
        assert got > 0  # it streamed, then timed out
    finally:
        llm.settings.timeout = old
    stats = llm.engine.stats()
    assert stats["running"] == 0 and stats["pending"] == 0 and stats["kv_blocks_used"] == 0


async def test_a_fault_in_one_request_ends_only_that_request(llm: LLM, monkeypatch: Any) -> None:
    from openllm_clone.engine.detokenizer import IncrementalDetokenizer
    from openllm_clone.errors import OpenLLMCloneError

    poison = llm.tokenize("poison pill")
    original = IncrementalDetokenizer.add

    def faulty(self: IncrementalDetokenizer, token_id: int) -> str:
        if self.ids[-len(poison[-5:]) :] == poison[-5:]:
            raise RuntimeError("boom")
        return original(self, token_id)

    monkeypatch.setattr(IncrementalDetokenizer, "add", faulty)
    params = SamplingParams(max_new_tokens=10)
    good = [llm.tokenize(p) for p in prompts(3)]
    results = await asyncio.gather(
        llm.complete(poison, params),
        *(llm.complete(i, params) for i in good),
        return_exceptions=True,
    )
    assert isinstance(results[0], OpenLLMCloneError) and "boom" in str(results[0])
    assert all(len(r.token_ids[0]) == 10 for r in results[1:])  # type: ignore[union-attr]
    assert llm.engine.stats()["kv_blocks_used"] == 0
