"""Can a runner serve this model? Answered from its config in seconds, before a server starts.

``start`` calls :func:`check_model` before it launches any worker, so a model no runner
can serve ends the command at once with one line (model type, reason, what is
supported) instead of a worker that fails its load again and again; ``import`` prints
the same line as a warning. The check builds the model on PyTorch's ``meta`` device
(no memory, no weights read) and runs one forward there through the generic runner's
attention, counting the attention calls; the full self-check against the model's own
eager attention happens at load (:class:`~.generic.GenericRunner`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from openllm_clone.errors import ModelLoadError
from openllm_clone.settings import Settings

__all__ = [
    "Support",
    "check_model",
    "checkpoint_names",
    "missing_weights",
    "not_a_causal_lm",
    "supported_summary",
]

logger = logging.getLogger(__name__)

# Layer kinds the paged attention computes exactly; anything else in ``layer_types``
# (linear attention, mamba, conv, chunked attention) is not attention as it knows it.
_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "attention", "global", "local"}


@dataclass
class Support:
    """The runner a model gets, or why it gets none."""

    model_type: str
    runner: str | None  # "fast", "generic", or None when nothing can serve it
    reason: str = ""

    @property
    def ok(self) -> bool:
        """True when some runner serves the model."""
        return self.runner is not None

    def line(self) -> str:
        """One line for a person: the model type, the runner or the reason."""
        if self.ok:
            return f"model type {self.model_type!r}: served by the {self.runner} runner"
        return (
            f"model type {self.model_type!r} cannot be served: {self.reason}. {supported_summary()}"
        )


def supported_summary() -> str:
    """What runs, in one sentence."""
    from .fast_support import SUPPORTED_MODEL_TYPES

    return (
        f"Supported: the fast runner for {', '.join(SUPPORTED_MODEL_TYPES)}; the generic runner "
        "for any transformers causal LM whose attention goes through AttentionInterface "
        "(Qwen3, Gemma 1-3, Phi, GPT-2, GPT-NeoX, OPT, Mixtral, OLMo 2, Granite, StarCoder2, ...)"
    )


def check_model(path: Path, settings: Settings) -> Support:
    """Which runner would serve the model folder at ``path`` under ``settings``."""
    plain = _plain_config(path)
    if plain is not None:
        refusal = not_a_causal_lm(plain)
        if refusal is None:
            try:
                checkpoint_names(path)  # headers only: a truncated file, before any worker
            except ModelLoadError as exc:
                refusal = exc.message
        if refusal is not None:
            return Support(str(plain.get("model_type", "?")), None, refusal)
    if plain is not None and _plainly_fast(plain, settings):
        return Support(str(plain["model_type"]), "fast")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        return Support("?", None, f"its config cannot be read ({exc})")
    model_type = str(getattr(config, "model_type", "?"))
    from .loader import choose_runner

    try:
        runner = choose_runner(config, settings)
    except ModelLoadError as exc:
        return Support(model_type, None, exc.message)
    if runner == "fast":
        return Support(model_type, "fast")
    reason = _generic_refusal(config)
    return Support(model_type, None if reason else "generic", reason or "")


_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def not_a_causal_lm(plain: dict[str, Any]) -> str | None:
    """Why the model a ``config.json`` describes is not a causal LM (an encoder such as
    ``BertModel``, a classifier), or None. Judged by the classes it names in
    ``architectures``: ``*ForCausalLM``, ``*LMHeadModel``, or a class transformers' causal-LM
    auto class maps to (Gemma 3's ``*ForConditionalGeneration``). A config without
    ``architectures`` is left to the model-type check."""
    names = [str(a) for a in plain.get("architectures") or []]
    if not names or any(a.endswith(_CAUSAL_SUFFIXES) for a in names):
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if any(a in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for a in names):
        return None
    return (
        f"its config.json names {', '.join(names)}, which is not a causal language model "
        "(no *ForCausalLM or *LMHeadModel class): only causal LMs generate text, and loading "
        "it as one would put a randomly initialised head on it"
    )


def checkpoint_names(path: Path) -> set[str] | None:
    """The tensor names of the folder's safetensors files, read from their headers (no
    weights read); None when it has none (``.bin`` checkpoints: the load decides)."""
    import struct

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        return None
    names: set[str] = set()
    for file in files:
        try:
            with open(file, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                if size > 100 * 2**20:
                    raise ValueError(f"a header of {size} bytes")
                header = json.loads(fh.read(size))
            if not isinstance(header, dict):
                raise ValueError("its header is not a JSON object")
            end = (
                8
                + size
                + max(
                    (int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"),
                    default=0,
                )
            )
            if file.stat().st_size < end:
                raise ValueError(f"truncated: {file.stat().st_size} of its {end} bytes")
        except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
            raise ModelLoadError(f"{file} is not a readable safetensors file ({exc})") from exc
        names.update(k for k in header if k != "__metadata__")
    return names


def missing_weights(path: Path) -> list[str]:
    """The weights the model at ``path`` needs that its checkpoint lacks, as transformers'
    load reports them (tied weights are not missing); [] when none, or when the files do
    not tell (``.bin``, a quantized checkpoint: the load decides). Reads only the
    safetensors headers and builds the model on ``meta``; only when a name seems missing
    (transformers may rename checkpoint keys) does it load the model to ask transformers."""
    names = checkpoint_names(path)
    if names is None:
        return []
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    if getattr(config, "quantization_config", None) is not None:
        return []
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - the modeling code refuses the config: the load decides
        return []
    needed = {name for name, _ in model.named_parameters()}  # a tied weight counted once
    if needed <= names:
        return []
    _, loading = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.bfloat16, output_loading_info=True
    )
    return sorted(loading.get("missing_keys") or ())


def _plain_config(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _plainly_fast(plain: dict[str, Any], settings: Settings) -> bool:
    """True when ``config.json`` alone shows that the fast runner serves the model, so
    that ``start`` need not import transformers and torch (~5 s of every start) before
    the worker does. Any doubt answers False and the full check runs: a quantized
    checkpoint, Gemma (its config class's defaults decide soft-capping), or a family with
    a sliding window whose file leaves the window to the class default."""
    from .fast_support import GEMMA_MODEL_TYPES, SUPPORTED_MODEL_TYPES, fast_refusal

    model_type = plain.get("model_type")
    if settings.runner == "generic" or model_type not in SUPPORTED_MODEL_TYPES:
        return False
    if "quantization_config" in plain or model_type in GEMMA_MODEL_TYPES:
        return False
    if model_type != "llama" and not {"sliding_window", "max_position_embeddings"} <= set(plain):
        return False
    return fast_refusal(SimpleNamespace(**plain), settings.max_model_len) is None


def _generic_refusal(config: Any) -> str | None:
    """Why the generic runner cannot serve ``config`` (None when it looks servable)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "transformers has no causal-LM class for it (AutoModelForCausalLM)"
    kinds = set(getattr(config, "layer_types", None) or [])
    other = sorted(str(k) for k in kinds - _ATTENTION_LAYER_TYPES)
    if other:
        return f"it has layers that are not attention ({', '.join(other)})"
    if getattr(config, "attention_chunk_size", None):
        return "chunked attention is not implemented by the paged attention"
    if getattr(config, "alibi", False) or getattr(config, "use_alibi", False):
        return "ALiBi position biases are not implemented by the paged attention"
    if getattr(config, "quantization_config", None) is not None:
        return None  # quantized layers are not built on meta: the load-time check decides
    import torch

    from .attention_hook import NO_ATTENTION, install_paged_attention, probe_attention

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # the modeling code refuses the config
        return f"transformers cannot build it ({type(exc).__name__}: {exc})"
    refusal = install_paged_attention(model)
    if refusal is not None:
        return refusal
    try:
        probes = probe_attention(model, 4, "meta")
    except Exception as exc:  # data-dependent ops (MoE routing) do not run on meta: load decides
        logger.debug(
            "meta forward of %s did not run (%s); the load-time check decides", model_type, exc
        )
        return None
    return NO_ATTENTION if not probes else None
