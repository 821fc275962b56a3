"""Per-request adapter merging (LoRAX's ``merged_adapters``): linear, TIES, DARE.

``linear`` (the default) is exact: a weighted sum of LoRA deltas is itself a LoRA of the
summed rank (the ``A`` matrices concatenated along the rank axis, the weighted, scaled
``B`` matrices likewise: peft's ``add_weighted_adapter(..., combination_type="cat")``).

``ties``, ``dare_linear``, ``dare_ties`` and ``magnitude_prune`` are peft's own
``add_weighted_adapter`` combinations, run by peft's own code
(:mod:`peft.utils.merge_utils`) the way ``add_weighted_adapter`` runs them: on the ``A``
and on the ``B`` matrices apart, each adapter weighted by ``sqrt(|weight * scale|)`` (the
sign on ``A``), so the adapters must share one rank and the merge keeps it. DARE prunes
at random: the merge runs under a fixed seed, with the modules in the model's order, so
that every worker and replica builds the same adapter (and a peft model whose RNG was
seeded alike builds it too).

A merge is cached as an ordinary adapter under a name derived from its recipe
(``merge:a*0.5+b*0.5``, ``merge:ties(0.5,total):a*0.5+b*0.5``), so that later requests
with the same recipe reuse it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from openllm_clone.errors import AdapterIncompatibleError, InvalidRequestError

from .weights import AdapterWeights, LoraModule

__all__ = [
    "MERGE_PREFIX",
    "MERGE_SEED",
    "MERGE_STRATEGIES",
    "SIGN_METHODS",
    "MergeRecipe",
    "merge",
    "merge_linear",
    "merge_name",
    "parse_merge",
    "parse_merge_name",
]

MERGE_PREFIX = "merge:"
MERGE_STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")
MERGE_SEED = 0  # DARE's random pruning: the same merge in every worker
_PART = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._\-]*)\*(?P<weight>-?[0-9.]+(?:e-?[0-9]+)?)$")
_HEAD = re.compile(
    r"^(?P<strategy>[a-z_]+)\((?P<density>[0-9.]+(?:e-?[0-9]+)?),(?P<sign>[a-z]+)\):"
)
# Inside a layer, the order of the modules in the model (peft merges them in that order,
# which DARE's random draws follow); other names after these, alphabetically.
_MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MergeRecipe:
    """How to merge: the adapters with their weights, and the strategy's parameters."""

    parts: tuple[tuple[str, float], ...]
    strategy: str = "linear"
    density: float = 1.0
    majority_sign_method: str = "total"

    @property
    def name(self) -> str:
        """The canonical adapter name of the merge."""
        head = ""
        if self.strategy != "linear":
            head = f"{self.strategy}({self.density:g},{self.majority_sign_method}):"
        return MERGE_PREFIX + head + "+".join(f"{n}*{w:g}" for n, w in self.parts)


def merge_name(
    names: list[str],
    weights: list[float],
    *,
    strategy: str = "linear",
    density: float | None = None,
    majority_sign_method: str | None = None,
) -> str:
    """The canonical name of a merge recipe, e.g. ``merge:a*0.5+b*0.5``; a 400 naming the
    field for what the strategy does not take."""
    if len(names) != len(weights):
        raise InvalidRequestError(
            "merged_adapters: names and weights differ in length", param="merged_adapters"
        )
    if len(set(names)) != len(names):
        raise InvalidRequestError(
            "merged_adapters: an adapter is named twice", param="merged_adapters"
        )
    if strategy not in MERGE_STRATEGIES:
        raise InvalidRequestError(
            f"merge_strategy must be one of {', '.join(MERGE_STRATEGIES)}, not {strategy!r}",
            param="merge_strategy",
        )
    if density is not None and not 0.0 <= density <= 1.0:
        raise InvalidRequestError("density must lie in [0, 1]", param="density")
    if strategy == "linear" and density is not None and density != 1.0:
        raise InvalidRequestError(
            "density prunes the deltas of ties, dare_linear, dare_ties and magnitude_prune "
            "merges; the linear merge keeps them whole",
            param="density",
        )
    if majority_sign_method is not None:
        if majority_sign_method not in SIGN_METHODS:
            raise InvalidRequestError(
                f"majority_sign_method must be one of {', '.join(SIGN_METHODS)}",
                param="majority_sign_method",
            )
        if strategy not in ("ties", "dare_ties"):
            raise InvalidRequestError(
                "majority_sign_method is used by the ties and dare_ties merges only",
                param="majority_sign_method",
            )
    recipe = MergeRecipe(
        parts=tuple((n, float(w)) for n, w in zip(names, weights)),
        strategy=strategy,
        density=1.0 if density is None else float(density),
        majority_sign_method=majority_sign_method or "total",
    )
    return recipe.name


def parse_merge(name: str) -> MergeRecipe:
    """Inverse of :func:`merge_name`."""
    rest = name.removeprefix(MERGE_PREFIX)
    strategy, density, sign = "linear", 1.0, "total"
    head = _HEAD.match(rest)
    if head is not None:
        strategy, density, sign = head["strategy"], float(head["density"]), head["sign"]
        rest = rest[head.end() :]
    parts = []
    for part in rest.split("+"):
        match = _PART.match(part)
        if match is None or strategy not in MERGE_STRATEGIES or sign not in SIGN_METHODS:
            raise InvalidRequestError(f"invalid merge recipe {name!r}", param="merged_adapters")
        parts.append((match["name"], float(match["weight"])))
    return MergeRecipe(tuple(parts), strategy, density, sign)


def parse_merge_name(name: str) -> list[tuple[str, float]]:
    """The adapters of a merge recipe's name, with their weights."""
    return list(parse_merge(name).parts)


def merge(
    components: list[tuple[AdapterWeights, float]], recipe: MergeRecipe, *, path: str
) -> AdapterWeights:
    """The adapter ``recipe`` makes of ``components`` (each adapter's weights and weight)."""
    for weights, _ in components:
        if weights.dora or weights.saved:
            raise AdapterIncompatibleError(
                f"{weights.path} is a {weights.kind} adapter; merges combine plain LoRA "
                "adapters only (peft's add_weighted_adapter refuses DoRA, and a saved "
                "module has no weighted combination)"
            )
    if recipe.strategy == "linear":
        return merge_linear(components, path=path)
    return _merge_task_arithmetic(components, recipe, path=path)


def _grouped(
    components: list[tuple[AdapterWeights, float]],
) -> dict[tuple[int, str], list[tuple[LoraModule, float]]]:
    modules: dict[tuple[int, str], list[tuple[LoraModule, float]]] = {}
    for weights, coeff in components:
        for key, module in weights.modules.items():
            modules.setdefault(key, []).append((module, coeff))
    return modules


def _merged(path: str, modules: dict[tuple[int, str], LoraModule], strategy: str) -> AdapterWeights:
    merged = AdapterWeights(
        path=path,
        config={
            "peft_type": "LORA",
            "merge": path,
            "merge_strategy": strategy,
            "base_model_name_or_path": None,
        },
    )
    merged.modules.update(modules)
    merged.config["r"] = merged.rank
    merged.config["lora_alpha"] = merged.rank  # the scales are folded into the matrices
    return merged


def merge_linear(components: list[tuple[AdapterWeights, float]], *, path: str) -> AdapterWeights:
    """Sum of ``weight * delta`` over the components, as one LoRA of the summed rank."""
    modules = {}
    for key, parts in _grouped(components).items():
        a = torch.cat([m.a.float() for m, _ in parts], dim=0)
        b = torch.cat([m.b.float() * (m.scale * c) for m, c in parts], dim=1)
        modules[key] = LoraModule(a=a, b=b, scale=1.0)
    return _merged(path, modules, "linear")


def _module_order(key: tuple[int, str]) -> tuple[int, int, str]:
    layer, module = key
    short = module.rsplit(".", 1)[-1]
    rank = _MODULE_ORDER.index(short) if short in _MODULE_ORDER else len(_MODULE_ORDER)
    return layer, rank, module


def _combination(recipe: MergeRecipe) -> Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]:
    from peft.utils import merge_utils

    density, sign = recipe.density, recipe.majority_sign_method
    if recipe.strategy == "ties":
        return lambda tensors, w: merge_utils.ties(tensors, w, density, sign)  # type: ignore[arg-type]
    if recipe.strategy == "dare_ties":
        return lambda tensors, w: merge_utils.dare_ties(tensors, w, density, sign)  # type: ignore[arg-type]
    if recipe.strategy == "dare_linear":
        return lambda tensors, w: merge_utils.dare_linear(tensors, w, density)
    return lambda tensors, w: merge_utils.magnitude_prune(tensors, w, density)


def _merge_task_arithmetic(
    components: list[tuple[AdapterWeights, float]], recipe: MergeRecipe, *, path: str
) -> AdapterWeights:
    """peft's ``_generalized_task_arithmetic_weighted_adapter``, module by module."""
    import warnings

    ranks = sorted({weights.rank for weights, _ in components})
    if len(ranks) > 1:
        raise AdapterIncompatibleError(
            f"a {recipe.strategy} merge needs adapters of one rank (it merges their A and B "
            f"matrices apart, as peft does); these have ranks {', '.join(map(str, ranks))}: "
            "merge them with merge_strategy 'linear'",
            param="merged_adapters",
        )
    combine = _combination(recipe)
    modules = {}
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that density 1 prunes nothing
        torch.manual_seed(MERGE_SEED)
        grouped = _grouped(components)
        for key in sorted(grouped, key=_module_order):
            parts = grouped[key]
            scaled = [c * m.scale for m, c in parts]
            root = [math.sqrt(abs(s)) for s in scaled]
            weights_a = torch.tensor([r if s >= 0 else -r for r, s in zip(root, scaled)])
            weights_b = torch.tensor(root)
            a = combine([m.a.float() for m, _ in parts], weights_a)
            b = combine([m.b.float() for m, _ in parts], weights_b)
            modules[key] = LoraModule(a=a, b=b, scale=1.0)
    return _merged(path, modules, recipe.strategy)
