"""GPTQ: serve GPTQ checkpoints (AutoGPTQ format included) through gptqmodel + optimum.

auto-gptq does not import with transformers 5; its maintained successor gptqmodel
does the work behind transformers' ``GPTQConfig``. Without it, loading a GPTQ
checkpoint or asking for ``--quantize gptq`` fails at once naming what to install.
"""

from __future__ import annotations

from typing import Any

from openllm_clone.errors import MissingDependencyError, ModelLoadError

from . import QuantSpec


def _require_gptqmodel() -> None:
    try:
        import gptqmodel  # noqa: F401
        import optimum  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            "GPTQ needs gptqmodel and optimum (`pip install gptqmodel optimum`); gptqmodel "
            "7.x requires torch >= 2.14.1"
        ) from exc


def dispatch(mode: str, *, dtype: Any, device: Any, config: Any) -> QuantSpec | None:
    """Claim gptq: only a checkpoint that is already GPTQ-quantized can be served."""
    if mode != "gptq":
        return None
    existing = getattr(config, "quantization_config", None)
    method = (existing or {}).get("quant_method") if isinstance(existing, dict) else getattr(
        existing, "quant_method", None)
    if str(method).lower() != "gptq":
        raise ModelLoadError(
            "--quantize gptq serves a GPTQ checkpoint; quantize the model first with "
            "`openllm-clone quantize MODEL --method gptq`"
        )
    return dispatch_checkpoint(existing, device=device)


def dispatch_checkpoint(existing: Any, *, device: Any) -> QuantSpec | None:
    """A checkpoint that carries its own quantization_config."""
    method = existing.get("quant_method") if isinstance(existing, dict) else getattr(
        existing, "quant_method", None)
    method = str(method).lower() if method is not None else None
    if method in (None, "none"):
        return None
    if method == "gptq":
        _require_gptqmodel()
        device_map = "cpu" if device.type == "cpu" else {"": device.index or 0}
        return QuantSpec(mode="gptq", load_kwargs={"device_map": device_map})
    if method in ("bitsandbytes", "torchao"):
        return QuantSpec(mode=method, load_kwargs={"device_map": "cpu" if device.type == "cpu"
                                                   else {"": device.index or 0}})
    raise ModelLoadError(f"checkpoints quantized with {method!r} are not supported")
