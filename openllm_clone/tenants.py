"""Tenants: API keys with scopes and limits, read from a keys file (no torch).

A keys file (``--keys-file``, TOML or YAML by its extension) lists keys, each a table::

    [[keys]]
    tenant = "acme"                       # the unit of limits, fairness and metering
    key_id = "3f9a1c0d"                   # public part of the key (shown by `keys list`)
    key_hash = "sha256$<salt>$<digest>"   # the key itself is never stored
    adapters = ["acme-*", "shared"]       # names or glob patterns it may use
    base_model = true                     # may it use the base model
    admin = false                         # may it load/unload adapters, read /v1/usage
    requests_per_minute = 600
    tokens_per_minute = 200000            # prompt + completion
    max_concurrent = 8
    max_tokens = 1024                     # per request
    weight = 1.0                          # share of the engine under fair scheduling

A key reads ``oc-<key_id>-<secret>``: the id finds the entry, the salted SHA-256 of the
whole key is compared in constant time (keys are 192-bit random tokens, so a fast hash is
enough: nothing to brute-force). ``openllm-clone keys add`` prints a new key once.

The file is re-read when it changes (its size, mtime or inode; checked on every
request, a ``stat``), so adding or revoking a key needs no restart and in-flight
requests keep the entry they started with. SIGHUP to ``openllm-clone start`` forces a
re-read (an edit that keeps size, mtime and inode, as a copy that preserves times):
the server rewrites a marker file (:func:`request_reload`, named in
``OPENLLM_CLONE_KEYS_RELOAD``) whose stamp every process serving the file checks beside
the file's own. A file that no longer parses keeps the last good table in force and
logs why.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import fnmatch
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from openllm_clone._files import file_stamp, write_atomic
from openllm_clone.errors import InvalidRequestError, PermissionDeniedError
from openllm_clone.limits import RateLimiter, UsageLog, UsageMeter
from openllm_clone.settings import Settings

__all__ = [
    "GENERATION_PATHS",
    "KeyEntry",
    "KeysFile",
    "Tenancy",
    "cap_max_tokens",
    "check_base_model",
    "check_max_tokens",
    "current_entry",
    "current_tenant",
    "hash_key",
    "load_keys",
    "new_key",
    "request_reload",
    "reload_marker",
    "save_keys",
    "tenancy_for",
    "usage_sink",
    "verify_key",
]

logger = logging.getLogger(__name__)
RELOAD_ENV = "OPENLLM_CLONE_KEYS_RELOAD"  # the reload marker's path (see request_reload)

_KEY = re.compile(r"^oc-([0-9a-f]{8})-([A-Za-z0-9_-]{16,})$")
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# Where a request's token counts go when it ends (prompt, completion), if anywhere: a Ray
# replica reports them to the router, which meters and rate-limits.
usage_sink: contextvars.ContextVar[list[tuple[int, int]] | None] = contextvars.ContextVar(
    "openllm_clone_usage_sink", default=None
)

# Requests that reach the engine: the ones rate limits count.
GENERATION_PATHS = frozenset(
    {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/embeddings",
        "/embed",
        "/v1/generate",
        "/v1/generate_stream",
        "/",
        "/generate",
        "/generate_stream",
    }
)

# The key entry of the request being served (set by the middleware, read where a route
# resolves an adapter and where a request enters the engine). None: no authentication.
current_tenant: contextvars.ContextVar[KeyEntry | None] = contextvars.ContextVar(
    "openllm_clone_tenant", default=None
)


class KeyEntry(BaseModel):
    """One API key: whose it is, what it may use, and its limits (None: unlimited)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: str = Field(description="Tenant name: the unit of limits, fair share and usage.")
    key_id: str = Field(description="Public id of the key (its second dash-separated part).")
    key_hash: str = Field(description="sha256$<salt hex>$<digest hex> of the whole key.")
    adapters: list[str] = Field(
        default_factory=list, description="Adapter names or glob patterns the key may use."
    )
    base_model: bool = Field(default=True, description="May the key use the base model.")
    admin: bool = Field(
        default=False, description="May load and unload adapters and read /v1/usage."
    )
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    max_concurrent: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1, description="Per-request output cap.")
    weight: float = Field(default=1.0, gt=0, description="Share of the engine (fair mode).")

    @field_validator("tenant")
    @classmethod
    def _tenant_name(cls, value: str) -> str:
        if not _TENANT.match(value):
            raise ValueError("a tenant name is 1-64 letters, digits, '.', '_' or '-'")
        return value

    @field_validator("key_hash")
    @classmethod
    def _hash_form(cls, value: str) -> str:
        parts = value.split("$")
        if len(parts) != 3 or parts[0] != "sha256":
            raise ValueError("key_hash must read sha256$<salt>$<digest> (see `keys add`)")
        return value

    def may_use(self, adapter: str | None) -> bool:
        """True when this key may use ``adapter`` (None: the base model)."""
        if adapter is None:
            return self.base_model
        return any(fnmatch.fnmatchcase(adapter, pattern) for pattern in self.adapters)

    def public(self) -> dict[str, Any]:
        """What ``keys list`` shows: everything but the hash."""
        return self.model_dump(exclude={"key_hash"})


def new_key() -> tuple[str, str]:
    """A fresh ``(key_id, key)``."""
    key_id = secrets.token_hex(4)
    return key_id, f"oc-{key_id}-{secrets.token_urlsafe(24)}"


def hash_key(key: str, salt: str | None = None) -> str:
    """The stored form of ``key``: ``sha256$<salt>$<digest>``."""
    salt = salt or secrets.token_hex(16)
    digest = hashlib.sha256(bytes.fromhex(salt) + key.encode()).hexdigest()
    return f"sha256${salt}${digest}"


def verify_key(key: str, stored: str) -> bool:
    """True when ``key`` hashes to ``stored`` (constant-time comparison)."""
    _, salt, _ = stored.split("$")
    return hmac.compare_digest(hash_key(key, salt), stored)


def _parse(path: str) -> list[KeyEntry]:
    with open(path, "rb") as fh:
        raw = fh.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(raw.decode()) or {}
    else:
        import tomllib

        data = tomllib.loads(raw.decode())
    if not isinstance(data, dict) or not isinstance(data.get("keys", []), list):
        raise ValueError("the keys file needs a top-level list `keys`")
    entries = [KeyEntry.model_validate(item) for item in data.get("keys", [])]
    ids = [e.key_id for e in entries]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"key ids must be unique; repeated: {dupes}")
    return entries


def load_keys(path: str) -> list[KeyEntry]:
    """The entries of a keys file (an empty list when it does not exist yet)."""
    if not os.path.exists(path):
        return []
    try:
        return _parse(path)
    except (OSError, ValueError, ValidationError) as exc:
        raise InvalidRequestError(f"keys file {path}: {exc}") from exc


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # JSON string escapes are valid TOML basic strings


def save_keys(path: str, entries: list[KeyEntry]) -> None:
    """Write ``entries`` to ``path`` atomically (a temporary file, then a rename), so a
    server re-reading the file never sees half of it; readable by its owner only."""
    rows = [e.model_dump(exclude_none=True) for e in entries]
    if path.endswith((".yaml", ".yml")):
        import yaml

        text = yaml.safe_dump({"keys": rows}, sort_keys=False)
    else:
        blocks = [
            "[[keys]]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in row.items())
            for row in rows
        ]
        text = "# openllm-clone keys file: edit with `openllm-clone keys`.\n\n" + "\n".join(blocks)
    write_atomic(path, text, prefix=".keys-")


@dataclass
class _Table:
    stamp: tuple[int, ...] | None  # the file's stamp, then its reload marker's
    by_id: dict[str, KeyEntry]


def reload_marker(create: bool = False) -> str | None:
    """The marker file whose changes make the keys file be re-read (``None``: none, as in
    a process that no ``openllm-clone start`` set up). ``create``: this process's own,
    named in the environment its workers inherit."""
    if create and not os.environ.get(RELOAD_ENV):
        name = f"openllm-clone-{os.getpid()}-keys.reload"
        path = os.environ[RELOAD_ENV] = os.path.join(tempfile.gettempdir(), name)
        atexit.register(_remove, path)
    return os.environ.get(RELOAD_ENV) or None


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def request_reload(keys_file: str) -> str:
    """Make every process serving ``keys_file`` with this process's marker re-read it on
    its next request (SIGHUP). Returns (and logs) whether the file parses; if not, the
    servers keep their last good table, as for any edit."""
    try:
        line = f"SIGHUP: re-reading keys file {keys_file} ({len(_parse(keys_file))} keys)"
        logger.info(line)
    except (OSError, ValueError, ValidationError) as exc:
        line = f"SIGHUP: keys file {keys_file} does not parse ({exc}); the last good one stays"
        logger.error(line)
    marker = reload_marker(create=True)
    assert marker is not None
    write_atomic(marker, f"{time.time_ns()}\n", prefix=".keys-reload-")  # a new stamp
    return line


class KeysFile:
    """A keys file, re-read whenever it changes on disk or its reload marker does."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.marker = reload_marker()
        self._table = _Table(None, {})
        self._reload(strict=True)

    def _stamp(self) -> tuple[int, ...] | None:
        own = file_stamp(self.path)
        if own is None or self.marker is None:
            return own
        return (*own, *(file_stamp(self.marker) or ()))

    def _reload(self, strict: bool = False) -> None:
        stamp = self._stamp()
        try:
            entries = _parse(self.path) if stamp is not None else []
        except (OSError, ValueError, ValidationError) as exc:
            if strict:
                raise InvalidRequestError(f"keys file {self.path}: {exc}") from exc
            logger.error(
                "keys file %s no longer parses (%s); keeping the last good one", self.path, exc
            )
            self._table = _Table(stamp, self._table.by_id)
            return
        if self._table.stamp is not None or strict is False:
            logger.info("keys file %s loaded: %d keys", self.path, len(entries))
        self._table = _Table(stamp, {e.key_id: e for e in entries})

    def entries(self) -> list[KeyEntry]:
        """The keys in force now."""
        if self._stamp() != self._table.stamp:
            self._reload()
        return list(self._table.by_id.values())

    def authenticate(self, key: str) -> KeyEntry | None:
        """The entry whose key is ``key``, or None."""
        if self._stamp() != self._table.stamp:
            self._reload()
        match = _KEY.match(key)
        if match is None:
            return None
        entry = self._table.by_id.get(match.group(1))
        if entry is None or not verify_key(key, entry.key_hash):
            return None
        return entry


def current_entry() -> KeyEntry | None:
    """The key entry of the request being served (None: no authentication). A function,
    so that code Ray pickles by value refers to it by name, not to the ContextVar."""
    return current_tenant.get()


def cap_max_tokens(default: int) -> int:
    """A route's default output length, lowered to the current key's ``max_tokens``."""
    entry = current_tenant.get()
    if entry is None or entry.max_tokens is None:
        return default
    return min(default, entry.max_tokens)


def check_max_tokens(asked: int) -> None:
    """Refuse (400) an output length over the current key's ``max_tokens``."""
    entry = current_tenant.get()
    if entry is not None and entry.max_tokens is not None and asked > entry.max_tokens:
        raise InvalidRequestError(
            f"max_tokens: this API key allows at most {entry.max_tokens} tokens per request "
            f"({asked} asked)",
            param="max_tokens",
        )


def check_base_model() -> None:
    """Refuse (403) the base model to a key that may only use adapters."""
    entry = current_tenant.get()
    if entry is not None and not entry.base_model:
        raise PermissionDeniedError(
            "this API key may not use the base model; name one of its adapters as the model"
        )


def _legacy(tenant: str, admin: bool) -> KeyEntry:
    return KeyEntry(tenant=tenant, key_id="-", key_hash="sha256$00$00", adapters=["*"], admin=admin)


class Tenancy:
    """Who a request is, and the per-tenant counters of this process: the keys file,
    the plain ``--api-key`` / ``--admin-api-key`` keys (all-access tenants ``default`` and
    ``admin``), the rate limiter and the usage meter."""

    def __init__(
        self,
        keys_file: str | None,
        api_keys: list[str],
        admin_api_keys: list[str],
        workers: int = 1,
        usage_log: str | None = None,
    ) -> None:
        self.keys = KeysFile(keys_file) if keys_file else None
        self.api_keys = list(api_keys)
        self.admin_api_keys = list(admin_api_keys)
        # Plain keys manage adapters unless admin keys exist (the behaviour before tenants).
        self._plain = _legacy("default", admin=not admin_api_keys)
        self._admin = _legacy("admin", admin=True)
        self.limiter = RateLimiter(share=1.0 / max(1, workers))
        self.meter = UsageMeter(UsageLog(usage_log) if usage_log else None)

    @property
    def enabled(self) -> bool:
        """True when requests must carry a key."""
        return bool(self.keys or self.api_keys or self.admin_api_keys)

    def authenticate(self, token: str) -> KeyEntry | None:
        """The entry of ``token``, or None when no key matches."""
        # Every plain key is compared (no early exit), so timing does not say which matched.
        plain = admin = False
        for key in self.api_keys:
            plain |= hmac.compare_digest(token.encode(), key.encode())
        for key in self.admin_api_keys:
            admin |= hmac.compare_digest(token.encode(), key.encode())
        if admin:
            return self._admin
        if plain:
            return self._plain
        return self.keys.authenticate(token) if self.keys else None


_TENANCY: dict[tuple[Any, ...], Tenancy] = {}


def tenancy_for(settings: Settings) -> Tenancy:
    """The process's one :class:`Tenancy` for these settings (the middleware counts
    requests in it; the engine observer, or the Ray router, tokens and usage)."""
    s = settings
    # Ray's router is one process whatever --workers says (a BentoML option).
    workers = s.workers if s.backend == "bentoml" else 1
    key = (s.keys_file, tuple(s.api_keys), tuple(s.admin_api_keys), workers, s.usage_log)
    found = _TENANCY.get(key)
    if found is None:
        found = _TENANCY[key] = Tenancy(
            s.keys_file, s.api_keys, s.admin_api_keys, workers, usage_log=s.usage_log
        )
    return found
