"""Adapters on the generic runner: families whose modules have other names and shapes
(GPT-2's fused Conv1D ``c_attn``, Phi-3's fused ``qkv_proj``, GPT-NeoX's
``query_key_value``, Gemma 3's sliding layers). Mixed batches of base rows and two
random peft adapters equal peft's ``merge_and_unload`` model, each row alone."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from openllm_clone.errors import AdapterIncompatibleError
from openllm_clone.llm import LLM
from openllm_clone.protocol import SamplingParams
from openllm_clone.settings import Settings
from tests.families import make_family_model, reference_greedy
from tests.helpers import make_adapter

pytestmark = pytest.mark.slow

NEW_TOKENS = 12
PROMPTS = ["The weather today is", "A story about a cat who", "Numbers: one two three"]


@pytest.mark.parametrize(
    ("family", "runner", "per_token_from"),
    [
        ("gpt2", "generic", 8),
        ("phi3", "generic", 8),
        ("gpt_neox", "generic", 8),
        ("gemma3_text", "generic", 8),
        ("qwen3", "generic", 8),
        # Qwen3 and Gemma 3 also have a fast path: the same adapters on it.
        ("gemma3_text", "fast", 8),
        ("qwen3", "fast", 8),
        # Decode steps through the per-token LoRA path too (normally from 8 distinct adapters).
        ("gpt2", "generic", 1),
        ("gemma3_text", "generic", 1),
        ("gemma3_text", "fast", 1),
    ],
)
async def test_mixed_adapters_equal_merged(
    family: str,
    runner: str,
    per_token_from: int,
    tokenizer: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from openllm_clone.runners import lora as lora_mod

    monkeypatch.setattr(lora_mod, "_PER_TOKEN_MIN_ADAPTERS", per_token_from)
    base = make_family_model(family, tmp_path / family, tokenizer)
    adapters = {
        "one": make_adapter(base, tmp_path / "one", seed=1, rank=8, targets="all-linear"),
        "two": make_adapter(base, tmp_path / "two", seed=2, rank=4, targets="all-linear"),
    }
    await _mixed_rows_equal_merged(family, runner, base, adapters)


async def test_adapter_for_a_missing_module_is_refused(
    tokenizer: Any, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """An adapter made for Llama names q_proj; GPT-2 has no such module: 422, nothing loaded."""

    base = make_family_model("gpt2", tmp_path / "gpt2", tokenizer)
    llama_adapter = make_adapter(tiny_model_dir, tmp_path / "llama-adapter", seed=1, rank=4)
    llm = LLM.from_settings(Settings(model=str(base), dtype="float32", kv_cache_mb=16))
    try:
        with pytest.raises(AdapterIncompatibleError, match="does not exist in the base model"):
            await llm.adapters.load("llama", str(llama_adapter), force=True)
        assert "llama" not in llm.adapters.names()
    finally:
        llm.shutdown()


async def test_moe_expert_parameters_are_refused_clearly(tokenizer: Any, tmp_path: Path) -> None:
    """peft's ``all-linear`` on a MoE model also adapts the fused expert parameters
    (``target_parameters``): refused with that reason; attention-only adapters load."""
    base = make_family_model("qwen3_moe", tmp_path / "moe", tokenizer)
    experts = make_adapter(base, tmp_path / "experts", seed=1, rank=4, targets="all-linear")
    attention = make_adapter(
        base, tmp_path / "attention", seed=1, rank=4, targets=["q_proj", "v_proj"]
    )
    llm = LLM.from_settings(Settings(model=str(base), dtype="float32", kv_cache_mb=16))
    try:
        with pytest.raises(AdapterIncompatibleError, match="target_parameters"):
            await llm.adapters.load("experts", str(experts))
        await llm.adapters.load("attention", str(attention))
        assert llm.adapters.names() == ["attention"]
    finally:
        llm.shutdown()


@pytest.mark.parametrize(
    ("family", "runner", "embeddings"),
    [
        ("gpt2", "generic", "wte"),  # Conv1D projections (weights stored [in, out])
        ("gemma3_text", "generic", "embed_tokens"),  # embeddings scaled by sqrt(hidden)
        ("gemma3_text", "fast", "embed_tokens"),
    ],
)
async def test_dora_and_saved_modules_mixed_with_lora_equal_merged(
    family: str, runner: str, embeddings: str, tokenizer: Any, tmp_path: Path
) -> None:
    """DoRA rows, rows of an adapter with its own head and embeddings (modules_to_save),
    LoRA rows and base rows in the same steps, on families other than Llama: each equals
    peft's merge_and_unload of its adapter run alone."""
    base = make_family_model(family, tmp_path / family, tokenizer)
    adapters = {
        "dora": make_adapter(
            base, tmp_path / "dora", seed=1, rank=8, targets="all-linear", dora=True
        ),
        "saved": make_adapter(
            base,
            tmp_path / "saved",
            seed=2,
            rank=4,
            targets="all-linear",
            save=["lm_head", embeddings],
        ),
        "lora": make_adapter(base, tmp_path / "lora", seed=3, rank=4, targets="all-linear"),
    }
    await _mixed_rows_equal_merged(family, runner, base, adapters)


async def _mixed_rows_equal_merged(
    family: str, runner: str, base: Path, adapters: dict[str, Path]
) -> None:
    """Every prompt with no adapter and with each adapter, all at once: each row's greedy
    tokens equal transformers on peft's merge_and_unload of its adapter, run alone."""
    llm = LLM.from_settings(
        Settings(
            model=str(base),
            dtype="float32",
            kv_cache_mb=16,
            max_adapters=len(adapters),
            runner=runner,  # type: ignore[arg-type]
        )
    )
    try:
        assert llm.runner.tier == runner
        prompts = [llm.tokenize(p) for p in PROMPTS]
        want = {None: reference_greedy(base, prompts, NEW_TOKENS)}
        for name, path in adapters.items():
            await llm.adapters.load(name, str(path))
            want[name] = reference_greedy(base, prompts, NEW_TOKENS, adapter=path)
            assert want[name] != want[None], f"{name} changes nothing"
        params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
        cases = [(a, i) for i in range(len(prompts)) for a in (None, *adapters)]
        outs = await asyncio.gather(
            *(llm.complete(prompts[i], params, adapter=a) for a, i in cases)
        )
        for (a, i), out in zip(cases, outs, strict=True):
            assert out.token_ids[0] == want[a][i], f"{family} adapter={a} prompt={i}"
    finally:
        llm.shutdown()
