"""Building a self-contained bento: package code, base model and adapters, baked settings.

The bento references the base model and each adapter as BentoML models (not loose
files), carries a copy of openllm-clone's code in its ``src/`` (so serving needs no
checkout or install of it), pins the Python requirements of this environment in the
chosen flavour (``cpu``: PyTorch's CPU wheels; ``cuda``: PyPI's default wheels on a
CUDA base image), and bakes the serving settings into ``openllm_clone_settings.json``,
which the service reads when no ``OPENLLM_CLONE_SETTINGS`` is set.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openllm_clone.errors import ModelLoadError
from openllm_clone.settings import SETTINGS_FILE, AdapterSpec, Settings

__all__ = [
    "BENTO_LABEL",
    "BuiltBento",
    "build_bento",
    "export_build_context",
    "list_bentos",
    "prune_bentos",
]

BENTO_LABEL = "openllm-clone"
_CORE = [
    "torch",
    "transformers",
    "accelerate",
    "safetensors",
    "peft",
    "bentoml",
    "fastapi",
    "httpx",
    "pydantic",
    "typer",
    "rich",
    "tokenizers",
    "ninja",
]
_QUANTIZE = {
    "int8": ["bitsandbytes"],
    "int4": ["bitsandbytes"],
    "nf4": ["bitsandbytes"],
    "fp4": ["bitsandbytes"],
    "torchao-int8": ["torchao"],
    "gptq": ["gptqmodel", "optimum"],
}


@dataclass
class BuiltBento:
    """What ``openllm-clone build`` made."""

    tag: str
    path: Path
    size_bytes: int
    dockerfile: Path


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"cannot locate the {name} package to copy into the bento")
    return Path(next(iter(spec.submodule_search_locations)))


def _copy_code(ctx: Path) -> None:
    """openllm_clone and its mapped folders (``_layout.PACKAGE_ROOTS``) as one package tree,
    with the kernels' C++ sources where the wheel puts them (``_layout.DATA_ROOTS``)."""
    from openllm_clone._layout import DATA_ROOTS, PACKAGE_ROOTS, csrc_folder

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in PACKAGE_ROOTS:  # the namespace root comes first, its subfolders after
        target = ctx.joinpath(*name.split("."))
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(_package_dir(name), target, ignore=ignore)
    runners = str(_package_dir("openllm_clone.runners"))
    for name in DATA_ROOTS:
        target = ctx.joinpath(*name.split("."))
        shutil.copytree(csrc_folder(runners), target, dirs_exist_ok=True)


def _checkpoint_quantization(path: Path) -> str | None:
    """The quantization a pre-quantized checkpoint (``openllm-clone quantize``, GPTQ,
    bitsandbytes, torchao) needs at load time, as a ``--quantize`` name."""
    from openllm_clone.store import describe_model

    try:
        method = describe_model(path)["quantization"]
    except (OSError, ValueError):
        return None
    return None if method == "none" else {"torchao": "torchao-int8"}.get(method, method)


def _requirements(flavour: str, quantize: str | None) -> dict[str, Any]:
    names = _CORE + _QUANTIZE.get(quantize or "", [])
    packages = []
    for name in names:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if name in _CORE:
                raise
            raise ModelLoadError(
                f"--quantize {quantize} needs {name}, which is not installed"
            ) from None
        if name == "torch":
            version = version.split("+")[0]
        packages.append(f"{name}=={version}")
    python: dict[str, Any] = {"packages": packages, "lock_packages": False}
    if flavour == "cpu":
        python["extra_index_url"] = ["https://download.pytorch.org/whl/cpu"]
    return python


def build_bento(
    settings: Settings,
    *,
    flavour: str = "cpu",
    version: str | None = None,
    name: str = "openllm-clone",
) -> BuiltBento:
    """Import what needs importing, write the build context, and build the bento."""
    import bentoml

    from openllm_clone.store import import_adapter, resolve_model

    if flavour not in ("cpu", "cuda"):
        raise ValueError("flavour must be cpu or cuda")
    resolved = resolve_model(settings.model)
    model_tag = resolved.tag
    if model_tag is None:  # a local folder or hub id: put it in the store first
        from openllm_clone.store import import_model

        model_tag = import_model(str(resolved.path))
    adapters = []
    for spec in settings.adapters:
        tag = spec.source
        if Path(spec.source).expanduser().is_dir():
            tag = import_adapter(spec.source, name=f"adapter-{spec.name}".lower())
        adapters.append(AdapterSpec(name=spec.name, source=tag, pinned=spec.pinned))
    needs = settings.quantize or _checkpoint_quantization(resolved.path)
    baked = settings.model_copy(
        update={
            "model": model_tag,
            "adapters": adapters,
            "adapter_roots": [],
            "host": "0.0.0.0",
            "model_name": settings.model_name or resolved.name,
        }
    )

    with tempfile.TemporaryDirectory(prefix="openllm-clone-build-") as tmp:
        ctx = Path(tmp)
        _copy_code(ctx)
        (ctx / SETTINGS_FILE).write_text(baked.model_dump_json(indent=2))
        docker: dict[str, Any] = {"python_version": "3.11"}
        if flavour == "cuda":
            docker["cuda_version"] = "12.1.1"
        if flavour == "cpu" and settings.compile != "off":  # Inductor's C++ kernels
            docker["system_packages"] = ["g++"]
        bento = bentoml.bentos.build(
            "openllm_clone.service:LLMService",
            name=name,
            version=version,
            build_ctx=str(ctx),
            include=["openllm_clone/**/*.py", "openllm_clone/**/csrc/*", SETTINGS_FILE],
            labels={
                "kind": BENTO_LABEL,
                "model": model_tag,
                "flavour": flavour,
                "quantize": needs or "none",
                "compile": settings.compile,
                "adapters": ",".join(a.name for a in adapters) or "none",
            },
            models=[model_tag, *(a.source for a in adapters)],
            python=_requirements(flavour, needs),
            docker=docker,
        )
    path = Path(bento.path)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    models_size = sum(
        sum(f.stat().st_size for f in Path(bentoml.models.get(t).path).rglob("*") if f.is_file())
        for t in [model_tag, *(a.source for a in adapters)]
    )
    return BuiltBento(
        tag=str(bento.tag),
        path=path,
        size_bytes=size + models_size,
        dockerfile=path / "env" / "docker" / "Dockerfile",
    )


def export_build_context(tag: str, dest: Path) -> Path:
    """Write the bento's full Docker build context (models included) to ``dest``.

    The same context ``bentoml containerize`` would hand to Docker, so any builder
    (docker, buildah, kaniko) can build it: ``docker build -f env/docker/Dockerfile DEST``.
    """
    import bentoml
    from bentoml._internal.container import construct_containerfile

    bento = bentoml.bentos.get(tag)
    with construct_containerfile(bento, enable_buildkit=False) as (ctx, dockerfile):
        shutil.copytree(ctx, dest, dirs_exist_ok=True)
    return dest / "env" / "docker" / "Dockerfile"


def list_bentos() -> list[Any]:
    """Bentos built by openllm-clone, newest first."""
    import bentoml

    found = [b for b in bentoml.bentos.list() if b.info.labels.get("kind") == BENTO_LABEL]
    return sorted(found, key=lambda b: b.info.creation_time, reverse=True)


def prune_bentos(keep: int = 1) -> list[str]:
    """Delete all but the ``keep`` newest bentos of each name; return the deleted tags."""
    import bentoml

    deleted: list[str] = []
    seen: dict[str, int] = {}
    for bento in list_bentos():
        count = seen.get(bento.tag.name, 0)
        seen[bento.tag.name] = count + 1
        if count >= keep:
            bentoml.bentos.delete(str(bento.tag))
            deleted.append(str(bento.tag))
    return deleted
