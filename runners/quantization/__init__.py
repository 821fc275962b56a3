"""Quantization backends, one small module each (peft's dispatch style).

Each backend exposes ``dispatch(mode, dtype, device, config) -> QuantSpec | None``;
they are tried in order and the first that claims the mode wins. Optional
dependencies are imported lazily and a missing one raises MissingDependencyError
naming the extra; a mode that cannot run on this hardware raises ModelLoadError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from openllm_clone.errors import ModelLoadError

__all__ = [
    "QUANTIZE_MODES",
    "QuantSpec",
    "checkpoint_name",
    "device_map",
    "dispatch",
    "edge_layers",
    "real_weight_bytes",
]

QUANTIZE_MODES = ("int8", "int4", "nf4", "fp4", "gptq", "torchao-int8")


@dataclass
class QuantSpec:
    """What ``from_pretrained`` needs to load a model in a quantized form."""

    mode: str
    quantization_config: Any = None
    load_kwargs: dict[str, Any] = field(default_factory=dict)


def checkpoint_name(mode: str) -> str:
    """What a checkpoint quantized with ``--quantize``/``--method`` ``mode`` reports
    itself as (``int4`` is nf4; a torchao checkpoint just says torchao)."""
    return {"int4": "nf4", "torchao-int8": "torchao"}.get(mode, mode)


def device_map(device: Any) -> Any:
    """``from_pretrained``'s device_map that puts the whole model on ``device``."""
    return "cpu" if device.type == "cpu" else {"": device.index or 0}


def edge_layers(config: Any) -> list[int]:
    """Decoder layers 4-bit modes keep in the model dtype: the first and the last.

    They are the most sensitive to quantization (the usual recipe; on SmolLM2 nf4 went
    from +13.9 % to +8.1 % perplexity for 10 MiB). None for models under 4 layers.
    """
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if not n or n < 4:
        return []
    return [0, n - 1]


def dispatch(mode: str | None, *, dtype: Any, device: Any, config: Any) -> QuantSpec | None:
    """The QuantSpec for ``mode`` (None: no quantization, or a pre-quantized checkpoint)."""
    from . import bitsandbytes, gptq, torchao

    existing = getattr(config, "quantization_config", None)
    if mode is None:
        if existing is not None:  # a pre-quantized checkpoint (GPTQ, bitsandbytes, ...)
            return gptq.dispatch_checkpoint(existing, device=device)
        return None
    if mode not in QUANTIZE_MODES:
        raise ModelLoadError(
            f"unknown quantization {mode!r}; choose from {', '.join(QUANTIZE_MODES)}"
        )
    if existing is not None and mode != "gptq":
        # A checkpoint quantized offline (`openllm-clone quantize`) already is what it is.
        spec = gptq.dispatch_checkpoint(existing, device=device)
        have = spec.mode if spec is not None else "?"
        if have == checkpoint_name(mode):
            return spec
        raise ModelLoadError(
            f"this checkpoint is already quantized ({have}); serve it without "
            f"--quantize, or quantize the original model with {mode}"
        )
    for backend in (bitsandbytes, torchao, gptq):
        spec = backend.dispatch(mode, dtype=dtype, device=device, config=config)
        if spec is not None:
            return spec
    raise ModelLoadError(f"no backend handles quantization {mode!r}")  # pragma: no cover


def real_weight_bytes(model: Any) -> int:
    """Bytes the weights really take (tensor subclasses and 4-bit packing included)."""
    seen: set[int] = set()

    def size(t: Any) -> int:
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in names)
        data = getattr(t, "data", t)
        if hasattr(data, "__tensor_flatten__") and data is not t:
            return size(data)
        key = data.untyped_storage().data_ptr() if data.numel() else id(data)
        if key in seen:
            return 0
        seen.add(key)
        total = data.numel() * data.element_size()
        state = getattr(t, "quant_state", None)  # bitsandbytes 4-bit: absmax and friends
        absmax = getattr(state, "absmax", None)
        if absmax is not None:
            total += absmax.numel() * absmax.element_size()
        return total

    return sum(size(p) for p in model.parameters()) + sum(size(b) for b in model.buffers())
