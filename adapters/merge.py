"""Per-request adapter merging (LoRAX's ``merged_adapters``), linear strategy.

A weighted sum of LoRA deltas is itself a LoRA of the summed rank: concatenate the
``A`` matrices along the rank axis and the weighted, scaled ``B`` matrices likewise
(peft's ``add_weighted_adapter(..., combination_type="cat")``). It is exact, costs
one concatenation, and the result is cached as an ordinary adapter under a name
derived from its recipe, so that later requests with the same recipe reuse it.
"""

from __future__ import annotations

import re

import torch

from openllm_clone.errors import InvalidRequestError

from .weights import AdapterWeights, LoraModule

__all__ = ["MERGE_PREFIX", "merge_linear", "merge_name", "parse_merge_name"]

MERGE_PREFIX = "merge:"
_PART = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._\-]*)\*(?P<weight>-?[0-9.]+(?:e-?[0-9]+)?)$")


def merge_name(names: list[str], weights: list[float]) -> str:
    """The canonical name of a merge recipe, e.g. ``merge:a*0.5+b*0.5``."""
    if len(names) != len(weights):
        raise InvalidRequestError(
            "merged_adapters: names and weights differ in length", param="merged_adapters"
        )
    if len(set(names)) != len(names):
        raise InvalidRequestError(
            "merged_adapters: an adapter is named twice", param="merged_adapters"
        )
    return MERGE_PREFIX + "+".join(f"{n}*{float(w):g}" for n, w in zip(names, weights))


def parse_merge_name(name: str) -> list[tuple[str, float]]:
    """Inverse of :func:`merge_name`."""
    parts = []
    for part in name.removeprefix(MERGE_PREFIX).split("+"):
        match = _PART.match(part)
        if match is None:
            raise InvalidRequestError(f"invalid merge recipe {name!r}", param="merged_adapters")
        parts.append((match["name"], float(match["weight"])))
    return parts


def merge_linear(components: list[tuple[AdapterWeights, float]], *, path: str) -> AdapterWeights:
    """Sum of ``weight * delta`` over the components, as one LoRA of the summed rank."""
    modules: dict[tuple[int, str], list[tuple[LoraModule, float]]] = {}
    for weights, coeff in components:
        for key, module in weights.modules.items():
            modules.setdefault(key, []).append((module, coeff))
    merged = AdapterWeights(
        path=path, config={"peft_type": "LORA", "merge": path, "base_model_name_or_path": None}
    )
    for key, parts in modules.items():
        a = torch.cat([m.a.float() for m, _ in parts], dim=0)
        b = torch.cat([m.b.float() * (m.scale * c) for m, c in parts], dim=1)
        merged.modules[key] = LoraModule(a=a, b=b, scale=1.0)
    merged.config["r"] = merged.rank
    merged.config["lora_alpha"] = merged.rank
    return merged
