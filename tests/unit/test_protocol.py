"""Settings, schemas and the error tree (no model)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from openllm_clone.errors import (
    AdapterIncompatibleError,
    AdapterNotFoundError,
    CapacityError,
    InvalidRequestError,
    MissingDependencyError,
    OpenLLMCloneError,
)
from openllm_clone.protocol import ChatCompletionRequest, GenerateRequest, SamplingParams
from openllm_clone.settings import Settings, parse_adapter_spec


def test_adapter_spec_forms() -> None:
    assert parse_adapter_spec("fr=/data/adapters/french").model_dump() == {
        "name": "fr",
        "source": "/data/adapters/french",
        "pinned": False,
    }
    assert parse_adapter_spec("/data/adapters/french/").name == "french"
    with pytest.raises(ValueError):
        parse_adapter_spec("=/x")


def test_settings_round_trip_through_env() -> None:
    settings = Settings(
        model="/m", port=4000, api_keys=[" k1 ", ""], adapters=[parse_adapter_spec("a=/x")]
    )
    assert settings.api_keys == ["k1"]
    again = Settings.from_env(settings.to_env())
    assert again == settings
    assert Settings.from_env({}) == Settings()


def test_settings_reject_duplicate_adapter_names() -> None:
    with pytest.raises(ValidationError, match="unique"):
        Settings(adapters=[parse_adapter_spec("a=/x"), parse_adapter_spec("a=/y")])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", -1),
        ("temperature", -1),
        ("top_p", 0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("repetition_penalty", 0),
        ("n", 0),
        ("n", 17),
        ("seed", -1),
    ],
)
def test_sampling_bounds_name_the_field(field: str, value: float) -> None:
    with pytest.raises(ValidationError) as info:
        SamplingParams(**{field: value})
    assert info.value.errors()[0]["loc"] == (field,)


def test_generate_request_merges_llm_config() -> None:
    body = GenerateRequest(
        prompt="hi",
        llm_config={"max_new_tokens": 7, "temperature": 0.5},
        temperature=0.0,
        stop="###",
    )
    params = body.sampling_params()
    assert params.max_new_tokens == 7 and params.temperature == 0.0 and params.stop == ["###"]


def test_chat_request_rejects_non_text_parts() -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest(
            model="m",
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ],
        )
    ok = ChatCompletionRequest(
        model="m",
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            }
        ],
    )
    assert ok.messages[0].text() == "ab"


def test_error_tree_statuses_and_builtins() -> None:
    assert issubclass(InvalidRequestError, ValueError) and InvalidRequestError.status_code == 400
    assert issubclass(AdapterNotFoundError, LookupError) and AdapterNotFoundError.status_code == 404
    assert issubclass(AdapterIncompatibleError, ValueError)
    assert AdapterIncompatibleError.status_code == 422
    assert CapacityError("busy").status_code == 503
    assert issubclass(MissingDependencyError, ImportError)
    err = MissingDependencyError.for_extra("bitsandbytes", "quantize")
    assert "openllm-clone[quantize]" in str(err)
    body = InvalidRequestError("bad", param="top_p").to_dict()
    assert body["error"]["param"] == "top_p" and body["error"]["code"] == 400
    assert isinstance(InvalidRequestError("x"), OpenLLMCloneError)
