"""bf16 Linear layers prepacked for oneDNN (CPU): about 1.5x faster than ``F.linear``.

Both runners use it: the fast runner for its fused projections and head, the generic
runner for every plain bf16 Linear of the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["PackedLinear", "packed_linears_work"]


class PackedLinear:
    """A bf16 Linear prepacked for oneDNN."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.out_features = weight.shape[0]
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def packed_linears_work() -> bool:
    """True when this machine's torch runs prepacked bf16 Linears correctly."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.randn(64, 64, dtype=torch.bfloat16)
        x = torch.randn(3, 64, dtype=torch.bfloat16)
        y = PackedLinear(w, None)(x)
        return bool(torch.allclose(y.float(), F.linear(x, w).float(), atol=0.5, rtol=0.05))
    except (RuntimeError, AttributeError):
        return False
