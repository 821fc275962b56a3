"""What /readyz answers while a worker starts (:mod:`openllm_clone.readiness`)."""

from __future__ import annotations

from openllm_clone.readiness import Readiness


def test_readyz_reason_is_json() -> None:
    """The middleware's 503 body: the error tree's shape (one builder, ``to_dict``)."""
    states = Readiness()
    states.starting("loading the model")
    error = states.error()
    assert error is not None and error.status_code == 503
    body = error.to_dict()["error"]
    assert (
        body["type"] == "not_ready"
        and body["message"] == "the server is starting: loading the model"
    )
    states.failed("cannot load the model: broken")
    failed = states.error()
    assert failed is not None and "could not start: cannot load the model" in failed.message
    states.ready()
    assert states.error() is None and states.is_ready
