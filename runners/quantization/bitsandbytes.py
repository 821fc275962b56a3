"""bitsandbytes: int8 (LLM.int8) and 4-bit (nf4, fp4; ``int4`` means nf4).

4-bit modes keep the first and the last decoder layer in the model dtype, as
llama.cpp's k-quants and most 4-bit recipes do for the most sensitive layers: on
SmolLM2 that took nf4 from +13.9 % to +8.1 % perplexity for 10 MiB (0.27x -> 0.31x of
the bf16 weights without the tied embedding; bench/quantization.py).
"""

from __future__ import annotations

import warnings
from typing import Any

from openllm_clone.errors import MissingDependencyError, ModelLoadError

from . import QuantSpec, edge_layers

_MODES = {"int8", "int4", "nf4", "fp4"}


def _check_4bit_dims(config: Any) -> None:
    """bitsandbytes' CPU 4-bit kernels repack weights in 64-wide tiles."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    dims = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "attention width": heads * head_dim, "key/value width": kv}
    bad = {k: v for k, v in dims.items() if v % 64}
    if bad:
        raise ModelLoadError(
            f"4-bit bitsandbytes on CPU needs every Linear dimension divisible by 64; this "
            f"model has {bad}. Use --quantize int8 or torchao-int8, or a GPU."
        )


def _edge_layers(config: Any) -> list[str]:
    """transformers skip patterns for the first and last decoder layers (regexes
    matched from the start of a module's name, up to a module boundary)."""
    return [rf".*\.(?:layers|h|blocks)\.{i}" for i in edge_layers(config)]


def dispatch(mode: str, *, dtype: Any, device: Any, config: Any) -> QuantSpec | None:
    """Claim int8/int4/nf4/fp4."""
    if mode not in _MODES:
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise MissingDependencyError.for_extra("bitsandbytes", "quantize") from exc
    # bitsandbytes warns on every int8 matmul that bf16 inputs are cast to fp16.
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    if mode == "int8":
        qconfig = BitsAndBytesConfig(load_in_8bit=True)
    else:
        if device.type == "cpu":
            _check_4bit_dims(config)
        qconfig = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="fp4" if mode == "fp4" else "nf4",
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=["lm_head", *_edge_layers(config)],
        )
    device_map = "cpu" if device.type == "cpu" else {"": device.index or 0}
    return QuantSpec(mode=mode, quantization_config=qconfig, load_kwargs={"device_map": device_map})
