"""Incremental detokenization, stop strings, sampling and block allocation."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from openllm_clone.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from openllm_clone.engine.kv_cache import BlockAllocator, blocks_for
from openllm_clone.engine.sampling import apply_repetition_penalty, sample_rows
from openllm_clone.protocol import SamplingParams


@pytest.mark.parametrize(
    "text", ["Grüße aus Köln 🎉 — 東京タワー", "naïve café 👩‍👩‍👧 ok", "plain ascii"]
)
def test_incremental_detokenizer_never_splits_characters(tokenizer: Any, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=[1, 2])
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_straddling_deltas_is_cut_and_never_leaked() -> None:
    matcher = StopStringMatcher(["###", "END"])
    out = [matcher.feed(d) for d in ["Hello #", "#", " wait", " #", "#", "#tail"]]
    assert "".join(out) == "Hello ## wait "
    assert matcher.stopped
    assert matcher.feed("more") == ""


def test_stop_string_prefix_released_at_end() -> None:
    matcher = StopStringMatcher(["END"])
    assert matcher.feed("the EN") == "the "
    assert matcher.flush() == "EN"


def test_greedy_and_seeded_sampling() -> None:
    logits = torch.tensor([[0.1, 3.0, 0.2, 0.0], [5.0, 0.0, 0.0, 4.9]])
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=2)]
    a = [
        sample_rows(logits.clone(), params, [None, torch.Generator().manual_seed(7)], [[], []])
        for _ in range(3)
    ]
    assert all(x == a[0] for x in a) and a[0][0] == 1 and a[0][1] in (0, 3)


def test_sampled_frequencies_follow_the_distribution() -> None:
    """Inverse-CDF draws: each token as often as its probability, a zero one never."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = torch.log(probs).expand(16, -1)
    params = [SamplingParams(temperature=1.0)] * 16
    gens = [torch.Generator().manual_seed(100 + i) for i in range(16)]
    counts = torch.zeros(5)
    for _ in range(250):
        for t in sample_rows(logits.clone(), params, gens, [[]] * 16):
            counts[t] += 1
    assert counts[4] == 0
    assert (counts / counts.sum() - probs).abs().max() < 0.03
    # Temperature sharpens: at 0.5 the weights are probs**2, renormalised.
    sharp = probs**2 / (probs**2).sum()
    half = [SamplingParams(temperature=0.5)] * 16
    counts.zero_()
    for _ in range(250):
        for t in sample_rows(logits.clone(), half, gens, [[]] * 16):
            counts[t] += 1
    assert (counts / counts.sum() - sharp).abs().max() < 0.03


def test_inverse_cdf_over_chunks_of_a_wide_vocabulary() -> None:
    """The two-level draw (256-entry chunks, then the entry) over a vocabulary of several
    chunks: mass on entries at chunk edges and inside chunks is drawn as often as its
    probability, and entries of zero mass (whole chunks of them included) never."""
    vocab = 1000
    mass = {0: 0.1, 255: 0.2, 256: 0.3, 700: 0.15, 999: 0.25}
    probs = torch.zeros(vocab)
    for i, m in mass.items():
        probs[i] = m
    logits = torch.log(probs).expand(16, -1)
    params = [SamplingParams(temperature=1.0)] * 16
    gens = [torch.Generator().manual_seed(7 + i) for i in range(16)]
    counts = torch.zeros(vocab)
    for _ in range(200):
        for t in sample_rows(logits.clone(), params, gens, [[]] * 16):
            counts[t] += 1
    assert set(counts.nonzero().flatten().tolist()) == set(mass)
    freq = counts / counts.sum()
    assert max(abs(float(freq[i]) - m) for i, m in mass.items()) < 0.03


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    params = [SamplingParams(temperature=1.0, top_p=0.5)]
    picks = {
        sample_rows(logits.clone(), params, [torch.Generator().manual_seed(s)], [[]])[0]
        for s in range(30)
    }
    assert picks == {0}


def test_repetition_penalty_changes_greedy_choice() -> None:
    row = torch.tensor([2.0, 1.9, -1.0])
    apply_repetition_penalty(row, [0, 0, 2], 1.5)
    assert row.tolist() == pytest.approx([2.0 / 1.5, 1.9, -1.5])


def test_block_allocator_refcounts() -> None:
    alloc = BlockAllocator(5, 16)
    assert alloc.num_free == 4  # block 0 is the null block
    a, b = alloc.allocate(), alloc.allocate()
    assert 0 not in (a, b)
    alloc.share(a)
    alloc.free([a, b])
    assert alloc.num_free == 3 and alloc.refcount(a) == 1
    alloc.free([a])
    assert alloc.num_free == 4
    with pytest.raises(ValueError):
        alloc.free([a])
    assert blocks_for(17, 16) == 2 and blocks_for(16, 16) == 1


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1e-300),
        SamplingParams(temperature=5.0, top_p=1e-300),
        SamplingParams(temperature=1.0, repetition_penalty=1e-300),
        SamplingParams(temperature=1.0, top_k=1),
    ],
)
def test_sampling_never_fails_on_extreme_parameters(params: SamplingParams) -> None:
    logits = torch.tensor([[30.0, -40.0, 5.0, 29.0]])
    token = sample_rows(logits, [params], [torch.Generator().manual_seed(0)], [[0, 3]])[0]
    assert 0 <= token < 4
