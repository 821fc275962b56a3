"""Loading a base model folder into a :class:`TorchRunner` with the chosen dtype and device."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

from openllm_clone.errors import ModelLoadError
from openllm_clone.settings import Settings

__all__ = [
    "check_loaded_weights",
    "choose_runner",
    "compile_cache_dir",
    "emulated_bf16_warning",
    "load_runner",
    "refuse_missing",
    "warm_up",
    "pick_device",
    "pick_dtype",
]

logger = logging.getLogger(__name__)


def pick_device(name: str) -> Any:
    """``auto`` is CUDA when available, else CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for, but CUDA is not available here")
    return device


def pick_dtype(name: str, device: Any) -> Any:
    """``auto`` is bfloat16 on CUDA and on CPUs with native bf16, else float32."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # older builds lack the probe
        native_bf16 = False
    return torch.bfloat16 if native_bf16 else torch.float32


def emulated_bf16_warning(dtype: Any, device: Any) -> str | None:
    """What to tell a user who asked for bf16 on a CPU that only emulates it, or None."""
    import torch

    if dtype != torch.bfloat16 or device.type != "cpu":
        return None
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return None
    except Exception:  # older builds lack the probe: say nothing rather than guess
        return None
    return (
        "bfloat16 on this CPU is emulated (no AVX512-BF16 or AMX): its matrix products run "
        "about 2x slower than float32 here (bench/models.py); --dtype auto picks float32 "
        "on this machine, bfloat16 halves the weights' memory"
    )


def compile_cache_dir(settings: Settings, path: Path, dtype: Any) -> Path | None:
    """Where ``--compile`` keeps this model's compiled step: a folder under
    ``--compile-cache`` named after the model and a key of everything the package
    depends on (see :func:`~.compiled.package_key`); None when turned off."""
    from .compiled import package_key

    chosen = settings.compile_cache
    if chosen is not None and chosen.lower() == "none":
        return None
    if chosen is None:
        from openllm_clone._files import bentoml_home

        root = Path(bentoml_home()) / "openllm-clone" / "compiled"
    else:
        root = Path(chosen)  # made absolute by Settings
    files = sorted(
        (str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns)
        for f in path.rglob("*")
        if f.is_file()
    )
    key = package_key(
        {
            "model": str(path.resolve()),
            "files": files,
            "dtype": str(dtype),
            "max_batch_size": settings.max_batch_size,
            "max_model_len": settings.max_model_len,
            "stages": settings.compiled_stages,
        }
    )
    # Named after the folder (a store model's name and version), not how it was asked
    # for: `import --compile` and `start` by tag, alias or path find the same package.
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(path.resolve().parts[-2:]))
    return root / f"{name.strip('_')[-60:] or 'model'}-{key}"


def choose_runner(config: Any, settings: Settings) -> str:
    """``fast`` or ``generic`` for this model config under ``--runner`` and ``--compile``."""
    from .fast_support import fast_refusal

    refusal = fast_refusal(config, settings.max_model_len)
    if settings.runner == "fast" and refusal is not None:
        raise ModelLoadError(f"--runner fast cannot serve this model: {refusal}; use --runner auto")
    if settings.compile == "on":
        if settings.runner == "generic":
            raise ModelLoadError(
                "--compile needs the fast runner; --runner generic has no compiled step"
            )
        if refusal is not None:
            raise ModelLoadError(
                f"--compile needs the fast runner, which cannot serve this model: "
                f"{refusal}; start without --compile"
            )
    if settings.runner == "generic":
        return "generic"
    return "fast" if refusal is None else "generic"


def check_loaded_weights(loading: dict[str, Any], path: Path) -> None:
    """Refuse a model whose checkpoint lacks weights it needs (transformers would fill them
    with random values and the server would answer fluent garbage); tied weights are not
    missing. Weights the model does not use are a warning."""
    refuse_missing(sorted(loading.get("missing_keys") or ()), path)
    unexpected = sorted(loading.get("unexpected_keys") or ())
    if unexpected:
        logger.warning(
            "the checkpoint in %s has %s that the model does not use (ignored)",
            path,
            describe_names(unexpected),
        )


def refuse_missing(missing: list[str], path: Path) -> None:
    """Raise :class:`ModelLoadError` naming the weights the checkpoint in ``path`` lacks
    (the first few and a count); nothing when none (the load and ``import`` both ask)."""
    if missing:
        raise ModelLoadError(
            f"the checkpoint in {path} lacks {describe_names(missing)} that the model needs; "
            "it would be served with random values in their place"
        )


def describe_names(names: list[str], shown: int = 4) -> str:
    """``3 weights (a, b, c)`` or ``40 weights (a, b, c, d and 36 more)``."""
    listed = ", ".join(names[:shown])
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{len(names)} weight{'s' if len(names) != 1 else ''} ({listed}{more})"


def warm_up(runner: Any) -> None:
    """Load the compiled step from the cache, or compile it (``--compile``), or start its
    background compile. Call it on the thread that will run the steps where it can: the
    compiled step loaded on another thread (a worker's loading thread) ran 5-10 % slower
    at batch 1 here; a compile (``warmup_compiles``) runs on the loading thread instead,
    so that the server answers its probes meanwhile."""
    if not runner.compiled:
        return
    try:
        runner.warmup()
    except Exception as exc:  # Inductor's errors are many and deep: name the flag
        raise ModelLoadError(
            f"--compile could not compile the decode step ({type(exc).__name__}: "
            f"{str(exc)[:500]}); start without --compile"
        ) from exc


def load_runner(
    path: Path, settings: Settings, *, model_id: str, warmup: bool = True
) -> tuple[Any, Any]:
    """Load the model and tokenizer from ``path``; return ``(runner, tokenizer)``.
    ``warmup=False`` leaves :func:`warm_up` to the caller."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .quantization import dispatch, real_weight_bytes

    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    warning = emulated_bf16_warning(dtype, device)
    if warning is not None:
        logger.warning(warning)
    started = time.perf_counter()
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the model config in {path}: {exc}") from exc
    if getattr(config, "quantization_config", None) is None:
        from .quantization.gptq import legacy_quantize_config

        legacy = legacy_quantize_config(Path(path))  # an old AutoGPTQ checkpoint
        if legacy is not None:
            config.quantization_config = legacy
    spec = dispatch(settings.quantize, dtype=dtype, device=device, config=config)
    kwargs: dict[str, Any] = {"dtype": dtype, "config": config}
    if spec is not None:
        kwargs.update(spec.load_kwargs)
        if spec.quantization_config is not None:
            kwargs["quantization_config"] = spec.quantization_config
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model, loading = AutoModelForCausalLM.from_pretrained(
            str(path), output_loading_info=True, **kwargs
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load the model in {path}: {exc}") from exc
    check_loaded_weights(loading, path)
    if spec is None:
        model.to(device)
    weight_bytes = real_weight_bytes(model)
    torch.set_grad_enabled(False)
    tier = choose_runner(config, settings)
    common: dict[str, Any] = {
        "model_id": model_id,
        "kv_cache_bytes": settings.kv_cache_mb * 2**20,
        "block_size": settings.block_size,
        "max_model_len": settings.max_model_len,
        "max_adapters": settings.max_adapters,
        "quantization": spec.mode if spec is not None else None,
    }
    runner: Any
    if tier == "fast":
        from .torch_runner import TorchRunner

        runner = TorchRunner(
            model,
            compile=settings.compile,
            max_batch_size=settings.max_batch_size,
            compile_cache=lambda: compile_cache_dir(settings, Path(path), dtype),
            model_path=Path(path),
            stages=settings.compiled_stages,
            **common,
        )
    else:
        from .generic import GenericRunner

        if settings.compile == "auto":
            logger.info("decode steps run eagerly (the generic runner has no compiled step)")
        runner = GenericRunner(model, **common)
    runner.info.weight_bytes = weight_bytes
    if warmup:
        warm_up(runner)
    logger.info(
        "loaded %s (%s, %s runner, %s%s on %s, %.0f MiB of weights) in %.1f s; "
        "KV cache %d blocks of %d tokens",
        model_id,
        runner.info.architecture,
        runner.tier,
        runner.info.dtype,
        f", {spec.mode}" if spec is not None else "",
        device,
        weight_bytes / 2**20,
        time.perf_counter() - started,
        runner.num_blocks,
        runner.block_size,
    )
    return runner, tokenizer
