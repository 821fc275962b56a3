"""Clients written for other servers, unchanged, against ours: TGI's ``text-generation``,
LoRAX's ``lorax-client`` (generate and generate_stream, with adapters and details), and
vLLM's tokenizer routes as lm-eval's remote tokenizer calls them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.families import reference_greedy, reference_logprobs
from tests.helpers import Server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiny_server(shared_tiny_server: Server) -> Server:
    """This module only sends requests: the session's shared server serves it."""
    return shared_tiny_server


PROMPT = "The weather today is"


def _prompt_ids(server: Server) -> list[int]:
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": PROMPT}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_text_generation_client(tiny_server: Server, tiny_model_dir: Path) -> None:
    from text_generation import Client
    from text_generation.errors import ValidationError

    client = Client(tiny_server.url, timeout=120)
    ids = _prompt_ids(tiny_server)
    want = reference_greedy(tiny_model_dir, [ids], 8)[0]
    r = client.generate(PROMPT, max_new_tokens=8, decoder_input_details=True, top_n_tokens=2)
    details = r.details
    assert [t.id for t in details.tokens] == want
    assert details.finish_reason.value == "length" and details.generated_tokens == 8
    ref = reference_logprobs(tiny_model_dir, ids + want)
    for j, token in enumerate(details.tokens):
        assert abs(token.logprob - float(ref[len(ids) - 1 + j, token.id])) < 1e-4
        assert [t.id for t in details.top_tokens[j]] == ref[len(ids) - 1 + j].topk(
            2
        ).indices.tolist()
    assert [t.id for t in details.prefill] == ids and details.prefill[0].logprob is None
    for p in range(1, len(ids)):
        assert abs(details.prefill[p].logprob - float(ref[p - 1, ids[p]])) < 1e-4
    streamed = list(client.generate_stream(PROMPT, max_new_tokens=8))
    assert [e.token.id for e in streamed] == want
    assert streamed[-1].generated_text == r.generated_text
    assert streamed[-1].details is not None and streamed[-1].details.generated_tokens == 8
    assert all(e.generated_text is None for e in streamed[:-1])
    full = client.generate(PROMPT, max_new_tokens=3, return_full_text=True)
    assert full.generated_text.startswith(PROMPT)
    # Refused, not ignored: a watermark this server cannot apply.
    with pytest.raises(ValidationError):
        client.generate(PROMPT, max_new_tokens=3, watermark=True)


def test_text_generation_chat_unpatched(tiny_server: Server) -> None:
    """text-generation's chat() as it is: it names the model "tgi" (the base model here),
    parses our chat response and chunks with its own models, and may send top_logprobs
    without logprobs (which asks for them, on this surface). Greedy: the same text as the
    OpenAI route's for the same messages."""
    from text_generation import Client
    from text_generation.types import Message

    client = Client(tiny_server.url, timeout=120)
    messages = [Message(role="user", content="What is the weather like?")]
    reply = client.chat(messages, max_tokens=6, temperature=0.0)
    assert reply.model == "tgi" and reply.system_fingerprint.startswith("openllm-clone")
    text = reply.choices[0].message.content
    assert text and reply.choices[0].finish_reason == "length"
    assert reply.usage["completion_tokens"] == 6
    body = {
        "model": "",
        "messages": [{"role": "user", "content": "What is the weather like?"}],
        "max_tokens": 6,
        "temperature": 0,
    }
    openai = httpx.post(f"{tiny_server.url}/v1/chat/completions", json=body, timeout=120)
    assert openai.json()["choices"][0]["message"]["content"] == text
    chunks = list(client.chat(messages, max_tokens=6, temperature=0.0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    every = client.chat(
        messages,
        repetition_penalty=1.1,
        frequency_penalty=0.1,
        presence_penalty=0.1,
        top_logprobs=2,
        max_tokens=4,
        n=1,
        seed=7,
        temperature=0.7,
        top_p=0.9,
    )
    logprobs = every.choices[0].logprobs["content"]
    assert len(logprobs) == 4 and all(len(t["top_logprobs"]) == 2 for t in logprobs)
    # Elsewhere top_logprobs alone stays a 400, as OpenAI answers it.
    refused = httpx.post(
        f"{tiny_server.url}/v1/chat/completions", json={**body, "top_logprobs": 2}, timeout=60
    )
    assert refused.status_code == 400 and "top_logprobs" in refused.text


def test_lorax_client_with_adapters(
    tiny_server: Server, tiny_model_dir: Path, tiny_adapters: dict[str, Path]
) -> None:
    from lorax import Client
    from lorax.errors import NotFoundError, ValidationError

    client = Client(tiny_server.url, timeout=120)
    ids = _prompt_ids(tiny_server)
    want = reference_greedy(tiny_model_dir, [ids], 8, adapter=tiny_adapters["alpha"])[0]
    base = reference_greedy(tiny_model_dir, [ids], 8)[0]
    assert want != base
    r = client.generate(
        PROMPT, adapter_id="alpha", max_new_tokens=8, details=True, return_k_alternatives=2
    )
    assert r.details is not None and [t.id for t in r.details.tokens] == want
    assert r.details.prompt_tokens == len(ids)
    ref = reference_logprobs(tiny_model_dir, ids + want, adapter=tiny_adapters["alpha"])
    for j, token in enumerate(r.details.tokens):
        assert abs(token.logprob - float(ref[len(ids) - 1 + j, token.id])) < 1e-4
        assert token.alternative_tokens is not None and len(token.alternative_tokens) == 2
    stream = list(client.generate_stream(PROMPT, adapter_id="alpha", max_new_tokens=8))
    assert [e.token.id for e in stream] == want
    assert stream[-1].generated_text == r.generated_text
    assert [
        t.id for t in client.generate(PROMPT, max_new_tokens=8, details=True).details.tokens
    ] == base
    merged = client.generate(
        PROMPT,
        max_new_tokens=4,
        details=True,
        merged_adapters={
            "ids": ["alpha", "beta"],
            "weights": [0.5, 0.5],
            "merge_strategy": "linear",
            "density": 1.0,
        },
    )
    assert merged.details is not None and len(merged.details.tokens) == 4
    _lorax_ties_merge(client, tiny_server, tiny_adapters)
    best = client.generate(PROMPT, max_new_tokens=4, details=True, do_sample=True, best_of=2)
    assert best.details is not None and best.details.best_of_sequences is not None
    runner_up = best.details.best_of_sequences[0]
    assert sum(t.logprob for t in best.details.tokens) >= sum(t.logprob for t in runner_up.tokens)
    with pytest.raises(NotFoundError):
        client.generate(PROMPT, adapter_id="no-such-adapter", max_new_tokens=2)
    # best_of cannot stream, whichever route is asked (not n samples interleaved in one stream).
    r = httpx.post(
        f"{tiny_server.url}/generate_stream",
        timeout=60,
        json={
            "inputs": PROMPT,
            "parameters": {"best_of": 2, "do_sample": True, "max_new_tokens": 2},
        },
    )
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    with pytest.raises(ValidationError):
        client.generate(
            PROMPT, adapter_id=str(tiny_adapters["beta"]), adapter_source="local", max_new_tokens=2
        )  # no --adapter-root: local folders are refused


async def test_async_clients(tiny_server: Server) -> None:
    from lorax import AsyncClient as LoraxAsync
    from text_generation import AsyncClient as TGIAsync

    tgi = await TGIAsync(tiny_server.url, timeout=120).generate(PROMPT, max_new_tokens=4)
    lorax = await LoraxAsync(tiny_server.url, timeout=120).generate(PROMPT, max_new_tokens=4)
    assert tgi.generated_text == lorax.generated_text
    tokens = [
        e.token.id
        async for e in LoraxAsync(tiny_server.url, timeout=120).generate_stream(
            PROMPT, adapter_id="beta", max_new_tokens=4
        )
    ]
    assert len(tokens) == 4


def test_tokenizer_routes(tiny_server: Server, tiny_model_dir: Path) -> None:
    from lm_eval.utils import RemoteTokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    remote = RemoteTokenizer(f"{tiny_server.url}/v1/completions")
    text = "Tokenize me, please: héllo 日本"
    assert remote.encode(text) == tok(text, add_special_tokens=False)["input_ids"]
    assert remote.decode(remote.encode(text)) == text
    assert remote.eos_token == tok.eos_token and remote.eos_token_id == tok.eos_token_id
    chat = httpx.post(
        f"{tiny_server.url}/tokenize",
        timeout=30,
        json={"messages": [{"role": "user", "content": "hi"}]},
    ).json()
    assert (
        chat["tokens"]
        == tok(
            tok.apply_chat_template(
                [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
            )
        )["input_ids"]
    )
    for bad in ({"tokens": [10**9]}, {"tokens": "x"}):
        r = httpx.post(f"{tiny_server.url}/detokenize", json=bad, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_huggingface_inference_client(
    tiny_server: Server, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub's own TGI client (InferenceClient.text_generation) on the root routes.
    Its offline switch (HF_HUB_OFFLINE, set for the whole suite) blocks every URL, ours on
    127.0.0.1 too: lifted for this test only."""
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient

    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)

    client = InferenceClient(base_url=tiny_server.url, timeout=120)
    ids = _prompt_ids(tiny_server)
    want = reference_greedy(tiny_model_dir, [ids], 6)[0]
    out = client.text_generation(PROMPT, max_new_tokens=6, details=True, decoder_input_details=True)
    assert [t.id for t in out.details.tokens] == want
    assert [t.id for t in out.details.prefill] == ids
    assert client.text_generation(PROMPT, max_new_tokens=6) == out.generated_text
    streamed = list(client.text_generation(PROMPT, max_new_tokens=6, stream=True, details=True))
    assert [e.token.id for e in streamed] == want
    assert streamed[-1].details is not None and streamed[-1].details.generated_tokens == 6


def _lorax_ties_merge(client: Any, server: Server, adapters: dict[str, Path]) -> None:
    """LoRAX's TIES merge through lorax-client equals the same recipe through the OpenAI
    route (both peft's add_weighted_adapter combination: tests/unit/test_adapters.py);
    fields a strategy does not take, and adapters of two ranks, are refused by name."""
    from lorax.errors import UnprocessableEntityError, ValidationError

    added = httpx.post(
        f"{server.url}/v1/adapters", json={"name": "delta", "source": str(adapters["delta"])}
    )
    assert added.status_code == 200, added.text
    try:
        recipe = {
            "ids": ["alpha", "delta"],
            "weights": [0.7, 0.4],
            "merge_strategy": "ties",
            "density": 0.5,
            "majority_sign_method": "frequency",
        }
        lorax = client.generate(PROMPT, max_new_tokens=6, details=True, merged_adapters=recipe)
        assert lorax.details is not None
        body = {
            "model": "",
            "prompt": PROMPT,
            "max_tokens": 6,
            "temperature": 0,
            "merged_adapters": recipe,
            "logprobs": 0,
        }
        openai = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).json()
        tokens = openai["choices"][0]["logprobs"]["tokens"]
        assert "".join(tokens) == lorax.generated_text
        alpha = client.generate(PROMPT, adapter_id="alpha", max_new_tokens=6)
        assert alpha.generated_text != lorax.generated_text
        for bad, error, field in [
            ({**recipe, "merge_strategy": "linear"}, ValidationError, "density"),
            ({**recipe, "merge_strategy": "dare_linear"}, ValidationError, "majority_sign"),
            ({**recipe, "ids": ["alpha", "beta"]}, UnprocessableEntityError, "ranks 4, 8"),
        ]:
            with pytest.raises(error, match=field):
                client.generate(PROMPT, max_new_tokens=2, merged_adapters=bad)
    finally:
        httpx.delete(f"{server.url}/v1/adapters/delta", timeout=120)
