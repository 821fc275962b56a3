"""Reading a peft LoRA folder into plain tensors, and checking it against a base model.

What is read: LoRA pairs on the Linear modules of the decoder layers; DoRA's magnitude
vector beside them (``use_dora``); whole modules the adapter trained and saved
(``modules_to_save``, usually ``lm_head`` and ``embed_tokens``), which the runner checks
against its own embeddings and head. Only ``adapter_model.safetensors`` is read by
default; a pickled ``adapter_model.bin`` is refused unless the caller opts in, because
unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openllm_clone.errors import AdapterIncompatibleError, AdapterLoadError

if TYPE_CHECKING:
    import torch

__all__ = ["AdapterWeights", "LoraModule", "read_adapter"]

# peft keys name a module inside a numbered decoder layer, whatever the family calls them:
#   base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight     (Llama, Qwen, Gemma)
#   base_model.model.transformer.h.3.attn.c_attn.lora_A.weight         (GPT-2)
#   base_model.model.gpt_neox.layers.3.attention.query_key_value.lora_B.weight
# The module is keyed by its path inside the layer ("self_attn.q_proj"). DoRA adds the
# module's magnitude vector ("...q_proj.lora_magnitude_vector", ".weight" in older peft).
_KEY = re.compile(
    r"(?:^|\.)[A-Za-z_]\w*\.(?P<layer>\d+)\.(?P<module>[\w.]+?)\."
    r"(?:lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight|(?P<mag>lora_magnitude_vector)(?:\.weight)?)$"
)
# A whole saved module (modules_to_save): "base_model.model.lm_head.weight" ->
# "lm_head". Older peft, and peft saving resized embeddings, write the trained copy as
# "...lm_head.modules_to_save[.default].weight" beside the base's "original_module".
_SAVED = re.compile(
    r"^(?:base_model\.model\.)?(?P<path>[\w.]+?)"
    r"(?:\.(?P<variant>modules_to_save|original_module)(?:\.[\w-]+)?)?\.weight$"
)


@dataclass
class LoraModule:
    """One adapted projection: ``delta(x) = scale * (x @ A.T) @ B.T``; with DoRA's
    ``magnitude`` m, the projection becomes ``m / ||W + scale * B @ A||_row * (W x +
    delta(x))`` (plus the bias), the norm taken over each output row of the weight."""

    a: torch.Tensor  # [rank, in_features]
    b: torch.Tensor  # [out_features, rank]
    scale: float
    magnitude: torch.Tensor | None = None  # [out_features], DoRA only


@dataclass
class AdapterWeights:
    """A LoRA adapter read from disk, independent of any model."""

    path: str
    config: dict[str, Any]
    modules: dict[tuple[int, str], LoraModule] = field(default_factory=dict)
    # modules_to_save: the module's path in the model ("lm_head", "model.embed_tokens")
    # -> its trained weight.
    saved: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """The highest rank among the adapted modules."""
        return max((m.a.shape[0] for m in self.modules.values()), default=0)

    @property
    def alpha(self) -> float:
        """The configured ``lora_alpha``."""
        return float(self.config.get("lora_alpha", self.rank))

    @property
    def target_modules(self) -> list[str]:
        """Names of the projections the adapter changes (peft's short names: ``q_proj``)."""
        return sorted({path.rsplit(".", 1)[-1] for _, path in self.modules})

    @property
    def dora(self) -> bool:
        """True for a DoRA adapter (magnitude vectors beside its LoRA pairs)."""
        return any(m.magnitude is not None for m in self.modules.values())

    @property
    def kind(self) -> str:
        """``lora`` or ``dora``, then the saved modules (``lora + lm_head,
        embed_tokens``); ``merge (STRATEGY)`` for a per-request merge."""
        strategy = self.config.get("merge_strategy")
        if strategy:
            return f"merge ({strategy})"
        kind = "dora" if self.dora else "lora"
        if self.saved:
            kind += " + " + ", ".join(p.rsplit(".", 1)[-1] for p in sorted(self.saved))
        return kind

    @property
    def base_model(self) -> str | None:
        """``base_model_name_or_path`` from the adapter config."""
        value = self.config.get("base_model_name_or_path")
        return str(value) if value else None

    @property
    def size_bytes(self) -> int:
        """Bytes of the LoRA matrices, magnitude vectors and saved modules."""
        tensors = [t for m in self.modules.values() for t in (m.a, m.b, m.magnitude)]
        tensors += list(self.saved.values())
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup: the first pattern matching the key."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def read_adapter(
    path: str | os.PathLike[str], *, allow_pickle: bool = False, max_bytes: int | None = None
) -> AdapterWeights:
    """Read a peft LoRA folder; raise a typed error for anything we cannot serve."""
    folder = Path(path)
    if max_bytes is not None:
        for name in ("adapter_model.safetensors", "adapter_model.bin"):
            file = folder / name
            if file.is_file() and file.stat().st_size > max_bytes:
                raise AdapterIncompatibleError(
                    f"{name} is {file.stat().st_size / 2**20:.0f} MiB; the limit is "
                    f"{max_bytes / 2**20:.0f} MiB (--max-adapter-mb)"
                )
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterIncompatibleError(f"{folder} has no adapter_config.json: not a peft adapter")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(f"cannot read {config_file}: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterIncompatibleError(f"{config_file} is not a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterIncompatibleError(f"only LoRA adapters are served, not {peft_type}")
    if config.get("target_parameters"):
        raise AdapterIncompatibleError(
            f"LoRA on parameters (peft target_parameters {config['target_parameters']}, as "
            "peft makes for the fused experts of MoE models) is not supported: train the "
            "adapter on Linear modules (target_modules) only"
        )
    for option, what in (
        ("trainable_token_indices", "trainable tokens (peft trainable_token_indices)"),
        ("lora_bias", "a trained bias on lora_B (peft lora_bias)"),
        ("layer_replication", "replicated layers (peft layer_replication)"),
    ):
        if config.get(option):
            raise AdapterIncompatibleError(f"adapters with {what} are not supported")
    use_dora = bool(config.get("use_dora"))
    saved_names = [str(n) for n in config.get("modules_to_save") or []]

    tensors = _read_tensors(folder, allow_pickle=allow_pickle)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    default_alpha = float(config.get("lora_alpha") or config.get("r") or 8)
    use_rslora = bool(config.get("use_rslora"))

    pairs: dict[tuple[int, str], dict[str, Any]] = {}
    saved_variants: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.search(key)
        if match is None:
            found = _saved_path(key, saved_names)
            if found is None:
                raise AdapterIncompatibleError(
                    f"unsupported tensor {key!r}: only LoRA (and DoRA) on Linear modules of "
                    "the decoder layers and the modules listed in modules_to_save are served"
                )
            saved_variants.setdefault(found[0], {})[found[1]] = tensor
            continue
        slot = (int(match["layer"]), match["module"])
        if match["mag"]:
            if not use_dora:
                raise AdapterIncompatibleError(
                    f"{key!r} is a DoRA magnitude vector but the config does not set use_dora"
                )
            pairs.setdefault(slot, {})["M"] = tensor
            continue
        pairs.setdefault(slot, {})[match["ab"]] = tensor
        pairs[slot]["key"] = key

    # The trained copy: "modules_to_save" where peft wrote one, else the plain key (the
    # base's own "original_module" is never served).
    saved = {
        path: variants.get("modules_to_save", variants.get(""))
        for path, variants in saved_variants.items()
        if "modules_to_save" in variants or "" in variants
    }
    weights = AdapterWeights(path=str(folder), config=config, saved=saved)
    for (layer, module), ab in sorted(pairs.items()):
        if "A" not in ab or "B" not in ab:
            raise AdapterIncompatibleError(f"layer {layer} {module}: lora_A or lora_B missing")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterIncompatibleError(
                f"layer {layer} {module}: lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)} do not form a LoRA pair"
            )
        rank = int(a.shape[0])
        module_key = ab["key"].split(".lora_")[0]
        alpha = float(_pattern_value(alpha_pattern, module_key, default_alpha))
        configured_rank = int(_pattern_value(rank_pattern, module_key, config.get("r", rank)))
        if configured_rank != rank:
            raise AdapterIncompatibleError(
                f"layer {layer} {module}: rank {rank} in the weights, {configured_rank} in the config"
            )
        scale = alpha / (rank**0.5) if use_rslora else alpha / rank
        magnitude = ab.get("M")
        if use_dora and (
            magnitude is None or magnitude.dim() != 1 or magnitude.shape[0] != b.shape[0]
        ):
            raise AdapterIncompatibleError(
                f"layer {layer} {module}: a DoRA adapter needs a magnitude vector of "
                f"{b.shape[0]} values (lora_magnitude_vector), found "
                f"{'none' if magnitude is None else tuple(magnitude.shape)}"
            )
        weights.modules[(layer, module)] = LoraModule(a=a, b=b, scale=scale, magnitude=magnitude)
    if not weights.modules:
        raise AdapterIncompatibleError(f"{folder} holds no LoRA weights")
    return weights


def _names(path: str, name: str) -> bool:
    """peft's modules_to_save match: ``name`` is the module's path or its last parts."""
    return path == name or path.endswith("." + name)


def _saved_path(key: str, names: list[str]) -> tuple[str, str] | None:
    """The module path of a saved module's weight and which copy it is
    (``modules_to_save``, ``original_module`` or ``""``), when ``key`` is one of ``names``."""
    match = _SAVED.match(key)
    if match is None or not any(_names(match["path"], n) for n in names):
        return None
    return match["path"], match["variant"] or ""


def _read_tensors(folder: Path, *, allow_pickle: bool) -> dict[str, torch.Tensor]:
    safetensors_file = folder / "adapter_model.safetensors"
    pickle_file = folder / "adapter_model.bin"
    if safetensors_file.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(safetensors_file), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterLoadError(f"cannot read {safetensors_file}: {exc}") from exc
    if pickle_file.is_file():
        if not allow_pickle:
            raise AdapterIncompatibleError(
                f"{pickle_file.name} is a pickled file, which can run code when loaded; "
                "convert it to safetensors, or start the server with "
                "--allow-pickle-adapters to accept it"
            )
        import torch

        try:
            return torch.load(str(pickle_file), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many kinds here
            raise AdapterLoadError(f"cannot read {pickle_file}: {exc}") from exc
    raise AdapterIncompatibleError(f"{folder} has no adapter_model.safetensors")
