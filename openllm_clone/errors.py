"""The error tree of openllm-clone.

Every error the server can answer with carries the HTTP status it maps to, and the
typed ones also inherit the builtin that callers already catch::

    OpenLLMCloneError                      500
      InvalidRequestError (ValueError)     400
        RequestTooLargeError               413  (a body over --max-body-mb)
      AuthenticationError                  401
      PermissionDeniedError                403  (a key outside its scope: the base model)
      NotFoundError (LookupError)          404  (an unknown route or model)
      MethodNotAllowedError                405
      AdapterError                         500
        AdapterNotFoundError (LookupError) 404
        AdapterIncompatibleError (ValueError) 422
        AdapterLoadError                   500
      RateLimitError                       429  (a tenant over its limits; Retry-After)
      CapacityError                        503  (queue full, no adapter slot free)
      UnavailableError                     503  (the replica serving it died: retry)
      NotReadyError                        503  (still starting: /readyz, routes)
      RequestTimeoutError (TimeoutError)   504  (the request outlived --timeout)
      ModelLoadError                       500
        StartupError                       500  (a start-up adapter it cannot serve)
      MissingDependencyError (ImportError) 500

The HTTP client mirrors the server side with ``APIStatusError``, ``APIConnectionError``
and ``APITimeoutError`` (see :mod:`openllm_clone.client`).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AdapterError",
    "AdapterIncompatibleError",
    "AdapterLoadError",
    "AdapterNotFoundError",
    "AuthenticationError",
    "CapacityError",
    "InvalidRequestError",
    "MethodNotAllowedError",
    "MissingDependencyError",
    "ModelLoadError",
    "NotFoundError",
    "NotReadyError",
    "OpenLLMCloneError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestTimeoutError",
    "RequestTooLargeError",
    "StartupError",
    "UnavailableError",
]


class OpenLLMCloneError(Exception):
    """Base class of every error raised by openllm-clone."""

    status_code: int = 500
    error_type: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def to_dict(self) -> dict[str, Any]:
        """The JSON error body (OpenAI's shape, which OpenLLM clients also read)."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.status_code,
            }
        }


class InvalidRequestError(OpenLLMCloneError, ValueError):
    """The request is malformed or out of bounds; ``param`` names the field."""

    status_code = 400
    error_type = "invalid_request_error"


class RequestTooLargeError(InvalidRequestError):
    """The request body is over the server's limit."""

    status_code = 413
    error_type = "request_too_large"


class AuthenticationError(OpenLLMCloneError):
    """Missing or wrong API key."""

    status_code = 401
    error_type = "authentication_error"


class PermissionDeniedError(OpenLLMCloneError, PermissionError):
    """The key is valid but may not do this (use the base model, manage adapters)."""

    status_code = 403
    error_type = "permission_denied"


class NotFoundError(OpenLLMCloneError, LookupError):
    """An unknown route or model."""

    status_code = 404
    error_type = "not_found_error"


class MethodNotAllowedError(OpenLLMCloneError):
    """A known route asked with a method it does not answer."""

    status_code = 405
    error_type = "method_not_allowed"


class AdapterError(OpenLLMCloneError):
    """Base class of adapter errors."""

    error_type = "adapter_error"


class AdapterNotFoundError(AdapterError, LookupError):
    """The named adapter is not loaded and no source is known for it."""

    status_code = 404
    error_type = "adapter_not_found"


class AdapterIncompatibleError(AdapterError, ValueError):
    """The adapter does not fit the base model (modules, shapes, rank, format)."""

    status_code = 422
    error_type = "adapter_incompatible"


class AdapterLoadError(AdapterError):
    """The adapter's files could not be read."""

    status_code = 500
    error_type = "adapter_load_error"


class CapacityError(OpenLLMCloneError):
    """The server is full (waiting queue, adapter slots); retry later."""

    status_code = 503
    error_type = "overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimitError(OpenLLMCloneError):
    """A tenant is over one of its limits; ``retry_after`` says when the window has room.
    ``headers`` are the ``x-ratelimit-*`` headers of the refusal."""

    status_code = 429
    error_type = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float = 1.0,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.headers = headers or []


class UnavailableError(CapacityError):
    """The process serving the request went away (a Ray replica died); nothing was
    returned, so the request is safe to send again."""

    error_type = "unavailable"


class NotReadyError(CapacityError):
    """The server is still starting (the model or its start-up adapters are loading), or
    could not start; ``/readyz`` and the routes answer with it until it is ready."""

    error_type = "not_ready"


class RequestTimeoutError(OpenLLMCloneError, TimeoutError):
    """The request ran past the server's per-request timeout; its slot was freed."""

    status_code = 504
    error_type = "timeout"


class ModelLoadError(OpenLLMCloneError):
    """The base model could not be found or loaded."""

    error_type = "model_load_error"


class StartupError(ModelLoadError):
    """The server cannot start as asked: an adapter named at start (``--adapter-id``, a
    bento's, the run-time adapters file) cannot be served. ``--lenient-adapters`` starts
    without it instead."""

    error_type = "startup_error"


class MissingDependencyError(OpenLLMCloneError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""

    error_type = "missing_dependency"

    @classmethod
    def for_extra(cls, package: str, extra: str) -> MissingDependencyError:
        """Build the error for ``package``, shipped by the ``extra`` extra."""
        return cls(
            f"{package} is not installed; install it with `pip install 'openllm-clone[{extra}]'`"
        )
