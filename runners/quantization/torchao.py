"""torchao int8 weight-only: a fast CPU int8 (bf16 activations, int8 weights)."""

from __future__ import annotations

from typing import Any

from openllm_clone.errors import MissingDependencyError

from . import QuantSpec, device_map


def dispatch(mode: str, *, dtype: Any, device: Any, config: Any) -> QuantSpec | None:
    """Claim torchao-int8."""
    if mode != "torchao-int8":
        return None
    try:
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig
    except ImportError as exc:
        raise MissingDependencyError.for_extra("torchao", "quantize") from exc
    return QuantSpec(
        mode=mode,
        quantization_config=TorchAoConfig(Int8WeightOnlyConfig()),
        load_kwargs={"device_map": device_map(device)},
    )
