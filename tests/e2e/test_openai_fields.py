"""OpenAI request fields as other people's clients send them: logit_bias, frequency and
presence penalties (checked against a reference of OpenAI's formula on transformers'
own logits), explicit nulls, GET /v1/models/{id}, JSON 404/405, a non-empty ``model``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.families import reference_logprobs
from tests.helpers import Server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiny_server(shared_tiny_server: Server) -> Server:
    """This module only sends requests: the session's shared server serves it."""
    return shared_tiny_server


PROMPT = "The weather today is"
N = 12


def _reference(
    model_dir: Path,
    ids: list[int],
    frequency: float,
    presence: float,
    bias: dict[int, float] | None = None,
) -> list[int]:
    """Greedy decoding with OpenAI's penalties applied to transformers' fp32 logits:
    logit[t] -= frequency * count[t] + presence * (count[t] > 0), counts over the output."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    seq = list(ids)
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(N):
            logits = model(torch.tensor([seq])).logits[0, -1].double()
            for token in set(out):
                logits[token] -= frequency * out.count(token) + presence
            for token, b in (bias or {}).items():
                logits[token] += b
            nxt = int(logits.argmax())
            out.append(nxt)
            seq.append(nxt)
    return out


def _generate(server: Server, **config: Any) -> dict[str, Any]:
    body = {
        "prompt": PROMPT,
        "llm_config": {"max_new_tokens": N, "temperature": 0, "ignore_eos": True, **config},
    }
    r = httpx.post(f"{server.url}/v1/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize(
    ("frequency", "presence"), [(1.5, 0.0), (0.0, 2.0), (0.8, 0.6), (-1.0, 0.0)]
)
def test_penalties_follow_openais_formula(
    tiny_server: Server, tiny_model_dir: Path, frequency: float, presence: float
) -> None:
    plain = _generate(tiny_server)
    ids = plain["prompt_token_ids"]
    got = _generate(tiny_server, frequency_penalty=frequency, presence_penalty=presence)
    want = _reference(tiny_model_dir, ids, frequency, presence)
    assert got["outputs"][0]["token_ids"] == want
    assert want != plain["outputs"][0]["token_ids"], "the penalty changed nothing: a weak test"


def test_logit_bias_forces_and_forbids(tiny_server: Server, tiny_model_dir: Path) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused")
    plain = _generate(tiny_server)
    first = plain["outputs"][0]["token_ids"][0]
    forced = 1234
    r = _generate(tiny_server, logit_bias={str(forced): 100})
    assert r["outputs"][0]["token_ids"] == [forced] * N
    banned = _generate(tiny_server, logit_bias={str(first): -100})["outputs"][0]["token_ids"]
    assert first not in banned
    assert banned == _reference(
        tiny_model_dir, plain["prompt_token_ids"], 0.0, 0.0, {first: -100.0}
    )
    # Through the SDK, on both OpenAI routes.
    text = client.completions.create(
        model="tiny-llama",
        prompt=PROMPT,
        max_tokens=4,
        temperature=0,
        logit_bias={str(forced): 100},
        extra_body={"ignore_eos": True},
    )
    assert text.choices[0].text == client_decode(tiny_model_dir, [forced] * 4)
    chat = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        temperature=0,
        logit_bias={str(forced): 100},
    )
    assert chat.choices[0].message.content == client_decode(tiny_model_dir, [forced] * 3)
    bad = httpx.post(
        f"{tiny_server.url}/v1/completions",
        timeout=60,
        json={"model": "tiny-llama", "prompt": PROMPT, "logit_bias": {"10000000": 5}},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "logit_bias"
    bad = httpx.post(
        f"{tiny_server.url}/v1/completions",
        timeout=60,
        json={"model": "tiny-llama", "prompt": PROMPT, "logit_bias": {"5": 101}},
    )
    assert bad.status_code == 400


def client_decode(model_dir: Path, ids: list[int]) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir)).decode(ids)


def test_explicit_nulls_mean_defaults(tiny_server: Server) -> None:
    nulls = {
        "temperature": None,
        "top_p": None,
        "n": None,
        "frequency_penalty": None,
        "presence_penalty": None,
        "stop": None,
        "seed": None,
        "logit_bias": None,
        "user": None,
        "stream": None,
        "stream_options": None,
    }
    r = httpx.post(
        f"{tiny_server.url}/v1/completions",
        timeout=60,
        json={"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 3, "echo": None, **nulls},
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1
    r = httpx.post(
        f"{tiny_server.url}/v1/chat/completions",
        timeout=60,
        json={
            "model": "tiny-llama",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": None,
            "max_completion_tokens": 3,
            **nulls,
        },
    )
    assert r.status_code == 200, r.text


def test_model_cards_and_json_errors_for_routes(tiny_server: Server) -> None:
    url = tiny_server.url
    card = httpx.get(f"{url}/v1/models/tiny-llama", timeout=30)
    assert card.status_code == 200 and card.json()["id"] == "tiny-llama"
    adapter = httpx.get(f"{url}/v1/models/alpha", timeout=30).json()
    assert adapter["id"] == "alpha" and adapter["parent"] == "tiny-llama"
    missing = httpx.get(f"{url}/v1/models/nope", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    unknown = httpx.get(f"{url}/v1/no-such-route", timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"
    wrong = httpx.get(f"{url}/v1/completions", timeout=30)
    assert wrong.status_code == 405 and wrong.json()["error"]["type"] == "method_not_allowed"
    # An empty model means the base model, and the response names it.
    r = httpx.post(
        f"{url}/v1/completions", timeout=60, json={"model": "", "prompt": PROMPT, "max_tokens": 2}
    )
    assert r.status_code == 200 and r.json()["model"] == "tiny-llama"


def test_many_prompts_and_token_prompts_one_choice_each(tiny_server: Server) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused")
    prompts = ["The weather today is", "A story about a cat", "Numbers: one two"]
    alone = [
        client.completions.create(
            model="tiny-llama",
            prompt=p,
            max_tokens=6,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
        for p in prompts
    ]
    many = client.completions.create(
        model="tiny-llama",
        prompt=prompts,
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.text for c in many.choices] == alone
    assert many.usage is not None and many.usage.completion_tokens == 18
    ids = [_generate(tiny_server)["prompt_token_ids"]]
    by_ids = client.completions.create(
        model="tiny-llama",
        prompt=ids[0],
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert by_ids.choices[0].text == alone[0]
    nested = client.completions.create(
        model="tiny-llama",
        prompt=ids * 2,
        max_tokens=6,
        temperature=0,
        n=2,
        seed=3,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in nested.choices) == [0, 1, 2, 3]
    # Streaming several prompts: every choice index gets its text, then one usage chunk.
    got: dict[int, str] = {}
    usage = None
    for chunk in client.completions.create(
        model="tiny-llama",
        prompt=prompts,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    ):
        for c in chunk.choices:
            got[c.index] = got.get(c.index, "") + c.text
        usage = chunk.usage or usage
    assert [got[i] for i in range(3)] == alone
    assert usage is not None and usage.completion_tokens == 18
    # Echo returns each prompt before its completion.
    echoed = client.completions.create(
        model="tiny-llama",
        prompt=prompts[:2],
        max_tokens=6,
        temperature=0,
        echo=True,
        extra_body={"ignore_eos": True},
    )
    assert [c.text for c in echoed.choices] == [
        p + a for p, a in zip(prompts[:2], alone[:2], strict=True)
    ]
    bad = httpx.post(
        f"{tiny_server.url}/v1/completions",
        timeout=60,
        json={"model": "tiny-llama", "prompt": [[1, 2, 10**9]]},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
    empty = httpx.post(
        f"{tiny_server.url}/v1/completions", timeout=60, json={"model": "tiny-llama", "prompt": []}
    )
    assert empty.status_code == 400


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": [[1, 2**70]]},  # once an OverflowError (500) in decode
        {"prompt": [-1, 5]},
        {"prompt": "hi", "echo": True, "logit_bias": {str(2**70): 1}},
    ],
)
def test_huge_or_negative_token_ids_are_400(tiny_server: Server, body: dict[str, Any]) -> None:
    r = httpx.post(
        f"{tiny_server.url}/v1/completions", timeout=60, json={"model": "tiny-llama", **body}
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


# --- logprobs ---------------------------------------------------------------------------


def _tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _check_top(ref_row: Any, got: dict[str, float], k: int, tok: Any) -> None:
    """``got`` (text -> logprob) holds the k most likely tokens with their logprobs."""
    import torch

    values, ids = torch.topk(ref_row, k)
    for token, value in zip(ids.tolist(), values.tolist(), strict=True):
        assert abs(got[tok.decode([token])] - value) < 1e-4


def test_completion_logprobs_equal_a_forward(tiny_server: Server, tiny_model_dir: Path) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused")
    tok = _tokenizer(tiny_model_dir)
    ids = tok(PROMPT)["input_ids"]
    r = client.completions.create(
        model="tiny-llama",
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    lp = r.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == 8
    out = _generate(tiny_server)["outputs"][0]["token_ids"][:8]  # the same greedy tokens
    ref = reference_logprobs(tiny_model_dir, ids + out)
    for j, token in enumerate(out):
        assert lp.tokens[j] == tok.decode([token])
        assert abs(lp.token_logprobs[j] - float(ref[len(ids) - 1 + j, token])) < 1e-4
        _check_top(ref[len(ids) - 1 + j], lp.top_logprobs[j], 3, tok)
        assert len(lp.top_logprobs[j]) <= 4  # the alternatives and the chosen token
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    if not any("\ufffd" in t for t in lp.tokens):  # no character split across tokens
        assert "".join(lp.tokens) == r.choices[0].text

    # echo + max_tokens=0 scores the prompt only (what lm-eval's loglikelihood sends).
    scored = client.completions.create(
        model="tiny-llama",
        prompt=[ids, ids[:5]],
        max_tokens=0,
        echo=True,
        logprobs=1,
        temperature=0,
    )
    assert [c.index for c in scored.choices] == [0, 1]
    assert scored.usage is not None and scored.usage.completion_tokens == 0
    prompt_ref = reference_logprobs(tiny_model_dir, ids)
    for choice, prompt in zip(scored.choices, [ids, ids[:5]], strict=True):
        assert choice.text == tok.decode(prompt) and choice.finish_reason == "length"
        got = choice.logprobs
        assert got is not None and len(got.token_logprobs) == len(prompt)
        assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
        for p in range(1, len(prompt)):
            assert abs(got.token_logprobs[p] - float(prompt_ref[p - 1, prompt[p]])) < 1e-4
            _check_top(prompt_ref[p - 1], got.top_logprobs[p], 1, tok)

    # echo with generation: the prompt's entries, then the completion's, in one list; the
    # stream carries the same logprobs.
    both = client.completions.create(
        model="tiny-llama",
        prompt=PROMPT,
        max_tokens=4,
        temperature=0,
        echo=True,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    whole = both.choices[0].logprobs
    assert whole is not None and len(whole.tokens) == len(ids) + 4
    assert whole.token_logprobs[1 : len(ids)] == pytest.approx(
        [float(prompt_ref[p - 1, ids[p]]) for p in range(1, len(ids))], abs=1e-4
    )
    assert whole.token_logprobs[len(ids) :] == pytest.approx(lp.token_logprobs[:4], abs=1e-5)
    streamed: list[float | None] = []
    offsets: list[int] = []
    for chunk in client.completions.create(
        model="tiny-llama",
        prompt=PROMPT,
        max_tokens=4,
        temperature=0,
        echo=True,
        logprobs=2,
        stream=True,
        extra_body={"ignore_eos": True},
    ):
        for c in chunk.choices:
            if c.logprobs is not None:
                streamed += c.logprobs.token_logprobs
                offsets += c.logprobs.text_offset
    assert streamed[0] is None and streamed[1:] == pytest.approx(whole.token_logprobs[1:], abs=1e-5)
    assert offsets == whole.text_offset


def test_chat_logprobs_equal_a_forward(tiny_server: Server, tiny_model_dir: Path) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused")
    tok = _tokenizer(tiny_model_dir)
    messages = [{"role": "user", "content": "Say something."}]
    r = client.chat.completions.create(
        model="tiny-llama",
        messages=messages,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=4,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 6
    prompt = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))[
        "input_ids"
    ]
    tokens = list(prompt)  # greedy continuation, one forward per token, as the reference
    for entry in content:
        ref = reference_logprobs(tiny_model_dir, tokens)[-1]
        best = int(ref.argmax())
        assert entry.token == tok.decode([best])
        assert abs(entry.logprob - float(ref[best])) < 1e-4
        top = ref.topk(4)
        assert [t.token for t in entry.top_logprobs] == [
            tok.decode([i]) for i in top.indices.tolist()
        ]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            top.values.tolist(), abs=1e-4
        )
        if "\ufffd" not in entry.token:  # a whole character: its bytes are its UTF-8
            assert bytes(entry.bytes or []).decode() == entry.token
        tokens.append(best)
    if not any("\ufffd" in e.token for e in content):
        assert "".join(e.token for e in content) == r.choices[0].message.content
    streamed = []
    for chunk in client.chat.completions.create(
        model="tiny-llama",
        messages=messages,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=4,
        stream=True,
        extra_body={"ignore_eos": True},
    ):
        for c in chunk.choices:
            if c.logprobs is not None and c.logprobs.content:
                streamed += [(e.token, e.logprob) for e in c.logprobs.content]
    assert [t for t, _ in streamed] == [e.token for e in content]
    assert [v for _, v in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)
    bad = httpx.post(
        f"{tiny_server.url}/v1/chat/completions",
        timeout=60,
        json={"model": "tiny-llama", "messages": messages, "top_logprobs": 2},
    )
    assert bad.status_code == 400 and "logprobs" in bad.json()["error"]["message"]
    bad = httpx.post(
        f"{tiny_server.url}/v1/completions",
        timeout=60,
        json={"model": "tiny-llama", "prompt": PROMPT, "logprobs": 21},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "logprobs"
