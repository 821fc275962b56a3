"""Reading a peft LoRA folder into plain tensors, and checking it against a base model.

Only ``adapter_model.safetensors`` is read by default; a pickled
``adapter_model.bin`` is refused unless the caller opts in, because unpickling runs
arbitrary code.
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
# The module is keyed by its path inside the layer ("self_attn.q_proj").
_KEY = re.compile(
    r"(?:^|\.)[A-Za-z_]\w*\.(?P<layer>\d+)\.(?P<module>[\w.]+?)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$"
)


@dataclass
class LoraModule:
    """One adapted projection: ``delta(x) = scale * (x @ A.T) @ B.T``."""

    a: torch.Tensor  # [rank, in_features]
    b: torch.Tensor  # [out_features, rank]
    scale: float


@dataclass
class AdapterWeights:
    """A LoRA adapter read from disk, independent of any model."""

    path: str
    config: dict[str, Any]
    modules: dict[tuple[int, str], LoraModule] = field(default_factory=dict)

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
    def kind(self) -> str:
        """``lora``, or ``merge (STRATEGY)`` for a per-request merge."""
        strategy = self.config.get("merge_strategy")
        return f"merge ({strategy})" if strategy else "lora"

    @property
    def base_model(self) -> str | None:
        """``base_model_name_or_path`` from the adapter config."""
        value = self.config.get("base_model_name_or_path")
        return str(value) if value else None

    @property
    def size_bytes(self) -> int:
        """Bytes of the LoRA matrices."""
        return sum(
            m.a.numel() * m.a.element_size() + m.b.numel() * m.b.element_size()
            for m in self.modules.values()
        )


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
    if config.get("use_dora"):
        raise AdapterIncompatibleError("DoRA adapters are not supported")
    if config.get("target_parameters"):
        raise AdapterIncompatibleError(
            f"LoRA on parameters (peft target_parameters {config['target_parameters']}, as "
            "peft makes for the fused experts of MoE models) is not supported: train the "
            "adapter on Linear modules (target_modules) only"
        )
    if config.get("modules_to_save"):
        raise AdapterIncompatibleError(
            f"adapters with modules_to_save ({config['modules_to_save']}) are not supported"
        )

    tensors = _read_tensors(folder, allow_pickle=allow_pickle)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    default_alpha = float(config.get("lora_alpha") or config.get("r") or 8)
    use_rslora = bool(config.get("use_rslora"))

    pairs: dict[tuple[int, str], dict[str, Any]] = {}
    for key, tensor in tensors.items():
        match = _KEY.search(key)
        if match is None:
            raise AdapterIncompatibleError(
                f"unsupported tensor {key!r}: only LoRA on Linear modules of the decoder layers "
                "is served (not embeddings or the output head)"
            )
        slot = (int(match["layer"]), match["module"])
        pairs.setdefault(slot, {})[match["ab"]] = tensor
        pairs[slot]["key"] = key

    weights = AdapterWeights(path=str(folder), config=config)
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
        weights.modules[(layer, module)] = LoraModule(a=a, b=b, scale=scale)
    if not weights.modules:
        raise AdapterIncompatibleError(f"{folder} holds no LoRA weights")
    return weights


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
