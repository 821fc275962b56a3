"""DoRA's column norm ``||W + s B A||`` of a base projection, whatever holds its weight.

peft computes it from the layer's weight, dequantized where the layer is quantized
(``dequantize_module_weight``: bitsandbytes, torchao, HQQ). So does this module (with its
own dequantization, see :func:`_dequantized`), and two more cases the runners make:

- a weight released when the runners prepacked it for oneDNN (:mod:`.packed`): its squared
  row norms are kept at packing (``out`` floats a projection), and
  ``||W_o + s (BA)_o||^2 = ||W_o||^2 + 2 s <W_o, (BA)_o> + s^2 ||(BA)_o||^2``, where
  ``<W_o, (BA)_o> = sum_r B[o, r] (A W^T)[r, o]`` takes one pass of A's ``r`` rows
  through the packed layer;
- a quantized layer peft cannot dequantize (GPTQ kernels): ``W^T`` is the layer applied
  to the identity, less its bias (exact for weight-only quantization).

The norm is computed in float32, once per adapter and projection, when the adapter is
installed (peft caches it the same way at inference).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from openllm_clone.errors import AdapterIncompatibleError

if TYPE_CHECKING:
    from openllm_clone.adapters.weights import LoraModule

    from .lora import DoraBase

__all__ = ["ReleasedWeights", "column_norm", "dora_base"]


def column_norm(weight: torch.Tensor, lora: LoraModule) -> torch.Tensor:
    """``||W + scale * B @ A||`` over each output row, float32 ``[out]`` (``weight``:
    ``[out, in]``)."""
    delta = lora.b.float() @ lora.a.float()
    return torch.linalg.norm(weight.float() + lora.scale * delta.to(weight.device), dim=1)


class ReleasedWeights:
    """What DoRA keeps of projection weights that prepacking released."""

    def __init__(self) -> None:
        # id(module) -> (||W_o||^2 [out] float32, x -> x @ W.T without the bias)
        self._kept: dict[int, tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]] = {}

    def keep(
        self, module: Any, weight: torch.Tensor, packed: Any, columns: tuple[int, int] | None = None
    ) -> None:
        """Remember ``module``'s weight before it is released; ``packed`` computes it (with
        its bias) from then on, ``columns`` its share of a fused packed layer's output."""
        lo, hi = columns or (0, weight.shape[0])

        def matmul(x: torch.Tensor) -> torch.Tensor:
            y = packed(x)[:, lo:hi].float()
            bias = getattr(packed, "bias", None)
            return y - bias[lo:hi].float() if bias is not None else y

        self._kept[id(module)] = (weight.detach().float().pow(2).sum(1), matmul)

    def __contains__(self, module: Any) -> bool:
        return id(module) in self._kept

    def column_norm(self, module: Any, lora: LoraModule, dtype: torch.dtype) -> torch.Tensor:
        """:func:`column_norm` of a released weight (see the module's docstring)."""
        row_sq, matmul = self._kept[id(module)]
        a, b, s = lora.a.float(), lora.b.float(), lora.scale
        wa = matmul(a.to(device=row_sq.device, dtype=dtype)).float()  # [r, out]: A W^T
        a, b = a.to(row_sq.device), b.to(row_sq.device)
        cross = (b * wa.T).sum(1)
        delta_sq = ((b @ (a @ a.T)) * b).sum(1)
        return (row_sq + 2 * s * cross + s * s * delta_sq).clamp_min(0).sqrt()


def base_weight(module: Any, dtype: torch.dtype) -> torch.Tensor:
    """A projection's weight ``[out, in]`` in float32, dequantized as peft does."""
    if type(module).__name__ == "Conv1D":  # GPT-2: the weight is [in, out]
        return module.weight.detach().t().float()
    weight = getattr(module, "weight", None)
    if weight is not None and type(weight.data) is torch.Tensor and weight.is_floating_point():
        return weight.detach().float()
    deq = _dequantized(module, weight)
    if deq is not None:
        return deq.detach().float()
    in_features = getattr(module, "in_features", None)
    if not isinstance(in_features, int):
        raise AdapterIncompatibleError(
            f"DoRA needs the base weight of a {type(module).__name__}, which cannot be read"
        )
    device = next((p.device for p in module.parameters()), None) or next(
        (b.device for b in module.buffers()), torch.device("cpu")
    )
    with torch.inference_mode():
        y = module(torch.eye(in_features, dtype=dtype, device=device)).float()  # [in, out]
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        y = y - bias.float()
    return y.t()


def _dequantized(module: Any, weight: Any) -> torch.Tensor | None:
    """bitsandbytes, torchao and HQQ weights dequantized, as peft's
    ``dequantize_module_weight`` does, but without touching the module: on a CPU with
    AVX512-BF16, bitsandbytes repacks a 4-bit weight at its first forward, after which
    peft's helper dequantizes the repacked bytes as if they were the original ones
    (wrong values), and its 8-bit branch moves the weight, losing its scales."""
    kind = type(weight).__name__
    if kind == "Params4bit":
        import bitsandbytes.functional as bnbf

        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # undone on copies
            data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
        return bnbf.dequantize_4bit(data, state)
    if kind == "Int8Params":
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = getattr(getattr(module, "state", None), "SCB", None)
        if scales is None:
            return None
        return weight.data.float() * scales.float().view(-1, 1) / 127
    if weight is not None and type(weight).__module__.startswith("torchao."):
        return weight.dequantize()
    if hasattr(module, "W_q"):  # HQQ
        return module.dequantize()
    return None


def dora_base(layers: list[Any], released: ReleasedWeights, dtype: torch.dtype) -> DoraBase:
    """The :data:`~.lora.DoraBase` of a runner whose decoder layers are ``layers``."""

    def base(layer: int, name: str, lora: LoraModule) -> tuple[torch.Tensor, torch.Tensor | None]:
        module = layers[layer].get_submodule(name)
        with torch.inference_mode():
            if module in released:
                norm = released.column_norm(module, lora, dtype)
            else:
                norm = column_norm(base_weight(module, dtype), lora)
        bias = getattr(module, "bias", None)
        return norm, bias.detach() if isinstance(bias, torch.Tensor) else None

    return base
