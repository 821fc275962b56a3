"""Embeddings through the official openai SDK, langchain-openai and LoRAX's /embed, against
the real server: equal to the pooled hidden states of a transformers forward (fp32), an
adapter's equal to its merged model's, inputs in order, base64, refusals by name."""

from __future__ import annotations

import base64
import struct
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.helpers import Server

pytestmark = pytest.mark.e2e

TEXTS = ["The weather today is sunny.", "A story about a cat", "Numbers: one two three four"]


@pytest.fixture(scope="module")
def server(shared_tiny_server: Server) -> Server:
    """This module only sends requests: the session's shared server serves it."""
    return shared_tiny_server


@pytest.fixture(scope="module")
def client(shared_openai_client: Any) -> Any:
    return shared_openai_client


def _hidden(model_dir: Path, ids: list[int], adapter: Path | None = None) -> torch.Tensor:
    """The final hidden states (after the last norm) of a transformers forward, fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    with torch.no_grad():
        return model.model(torch.tensor([ids])).last_hidden_state[0]


def _ids(server: Server, text: str) -> list[int]:
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": text}, timeout=30)
    return list(r.json()["tokens"])


def test_embeddings_equal_transformers_hidden_states(
    server: Server, client: Any, tiny_model_dir: Path, tiny_adapters: dict[str, Path]
) -> None:
    ids = [_ids(server, t) for t in TEXTS]
    reply = client.embeddings.create(
        model="", input=TEXTS, extra_body={"normalize": False, "pooling": "last"}
    )
    assert [d.index for d in reply.data] == [0, 1, 2]
    assert reply.usage.prompt_tokens == sum(len(i) for i in ids)
    for d, prompt in zip(reply.data, ids):
        want = _hidden(tiny_model_dir, prompt)[-1]
        assert torch.allclose(torch.tensor(d.embedding), want, atol=1e-5, rtol=0)
    mean = client.embeddings.create(model="", input=ids[1], extra_body={"pooling": "mean"})
    want = torch.nn.functional.normalize(_hidden(tiny_model_dir, ids[1]).mean(0), dim=0)
    assert torch.allclose(torch.tensor(mean.data[0].embedding), want, atol=1e-5, rtol=0)
    # An adapter by its name: its LoRA in every layer, as merged into the model.
    alpha = client.embeddings.create(model="alpha", input=ids[0], extra_body={"normalize": False})
    want = _hidden(tiny_model_dir, ids[0], tiny_adapters["alpha"])[-1]
    assert alpha.model == "alpha"
    assert torch.allclose(torch.tensor(alpha.data[0].embedding), want, atol=1e-5, rtol=0)
    # The default: unit length; base64 carries the same floats.
    unit = client.embeddings.create(model="", input=TEXTS[0])
    assert abs(float(torch.tensor(unit.data[0].embedding).norm()) - 1) < 1e-5
    raw = httpx.post(
        f"{server.url}/v1/embeddings",
        json={"model": "", "input": TEXTS[0], "encoding_format": "base64"},
        timeout=60,
    ).json()["data"][0]["embedding"]
    packed = base64.b64decode(raw)
    floats = struct.unpack(f"<{len(packed) // 4}f", packed)
    assert torch.allclose(torch.tensor(floats), torch.tensor(unit.data[0].embedding), atol=1e-6)


def test_refusals_name_the_field(server: Server) -> None:
    for body, field in [
        ({"model": "", "input": "hi", "dimensions": 8}, "dimensions"),
        ({"model": "", "input": []}, "input"),
        ({"model": "", "input": "hi", "pooling": "cls"}, "pooling"),
        ({"model": "nobody", "input": "hi"}, "model"),
    ]:
        r = httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=60)
        assert 400 <= r.status_code < 500 and r.json()["error"]["param"].startswith(field), r.text


def test_langchain_openai_embeddings_and_lorax_embed(server: Server) -> None:
    from langchain_openai import OpenAIEmbeddings

    # Texts as they are (without it, langchain tokenizes with tiktoken, OpenAI's models').
    lc = OpenAIEmbeddings(
        model="tiny-llama",
        base_url=f"{server.url}/v1",
        api_key="unused",  # type: ignore[arg-type]
        check_embedding_ctx_length=False,
    )
    vectors = lc.embed_documents(TEXTS)
    assert len(vectors) == 3 and len({tuple(v) for v in vectors}) == 3
    query = lc.embed_query(TEXTS[1])
    assert torch.allclose(torch.tensor(query), torch.tensor(vectors[1]), atol=1e-5)
    lorax = httpx.post(
        f"{server.url}/embed",
        json={"inputs": TEXTS[1], "parameters": {"adapter_id": None}},
        timeout=60,
    )
    assert lorax.status_code == 200, lorax.text
    assert torch.allclose(torch.tensor(lorax.json()["embeddings"]), torch.tensor(query), atol=1e-5)
