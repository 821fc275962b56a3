"""Where adapter files come from: a local folder, the BentoML model store, or the hub."""

from __future__ import annotations

import os
from pathlib import Path

from openllm_clone.errors import AdapterIncompatibleError, AdapterLoadError, AdapterNotFoundError

__all__ = ["ADAPTER_LABEL", "resolve_adapter_source"]

# Label set on adapters imported into the BentoML model store.
ADAPTER_LABEL = "openllm-clone-adapter"


def _check_roots(path: Path, roots: list[str]) -> Path:
    real = path.resolve(strict=True)
    if not roots:
        return real
    for root in roots:
        real_root = Path(root).resolve()
        if real == real_root or real_root in real.parents:
            return real
    raise AdapterIncompatibleError(
        f"adapter path {str(path)!r} is outside the allowed adapter roots"
    )


def _from_store(tag: str) -> Path | None:
    try:
        import bentoml
        from bentoml.exceptions import NotFound
    except ImportError:  # pragma: no cover - bentoml is a core dependency
        return None
    try:
        model = bentoml.models.get(tag)
    except (NotFound, ValueError, Exception):  # bad tags raise several kinds
        return None
    if model.info.labels.get("kind") != ADAPTER_LABEL:
        return None
    return Path(model.path)


def resolve_adapter_source(source: str, *, roots: list[str] | None = None) -> Path:
    """Turn an adapter source into a local folder, or raise a typed error."""
    try:
        return _resolve(source, roots or [])
    except (OSError, RuntimeError) as exc:
        # A name too long for the filesystem, "~user" of an unknown user, a symlink loop:
        # the client's input, not a server fault.
        raise AdapterNotFoundError(
            f"adapter source {source[:200]!r} cannot be opened: {type(exc).__name__}"
        ) from exc


def _resolve(source: str, roots: list[str]) -> Path:
    if not source or "\x00" in source:
        raise AdapterIncompatibleError("adapter source is empty or invalid")
    looks_local = source.startswith(("/", ".", "~")) or os.sep in source and Path(source).exists()
    if looks_local or Path(source).is_dir():
        path = Path(source).expanduser()
        if not path.exists():
            raise AdapterNotFoundError(f"adapter folder {source!r} does not exist")
        if not path.is_dir():
            raise AdapterIncompatibleError(f"adapter source {source!r} is not a folder")
        return _check_roots(path, roots)
    stored = _from_store(source)
    if stored is not None:
        return stored
    if source.count("/") == 1 and ".." not in source:
        return _from_hub(source)
    raise AdapterNotFoundError(
        f"adapter source {source!r} is not a folder, an adapter in the model store, or a hub id"
    )


def _from_hub(repo_id: str) -> Path:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise AdapterNotFoundError(
            f"adapter {repo_id!r} is not local and the hub is offline (HF_HUB_OFFLINE)"
        )
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id,
            allow_patterns=["adapter_config.json", "adapter_model.safetensors"],
            etag_timeout=5,
        )
    except Exception as exc:
        raise AdapterLoadError(
            f"cannot download adapter {repo_id!r} from the hub ({type(exc).__name__}); "
            "without network, copy it locally or import it into the model store"
        ) from exc
    return Path(path)
