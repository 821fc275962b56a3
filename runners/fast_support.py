"""Which models the fast runner serves, decided from a config alone (no torch here: the
``start`` command checks a model before any worker imports torch)."""

from __future__ import annotations

from typing import Any

__all__ = ["GEMMA_MODEL_TYPES", "SUPPORTED_MODEL_TYPES", "fast_refusal"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
# Gemma 3: norms scale by (1 + weight) in float32, four norms a layer (the attention and
# MLP outputs are normalised too), local and global layers with their own rotary tables
# and a sliding window on the local ones.
GEMMA_MODEL_TYPES = ("gemma3_text",)


def fast_refusal(config: Any, max_model_len: int | None = None) -> str | None:
    """Why this runner cannot serve ``config`` (None when it can)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return (
            f"model type {model_type!r} has no fast path (fast: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if model_type in GEMMA_MODEL_TYPES:
        if getattr(config, "final_logit_softcapping", None) or getattr(
            config, "attn_logit_softcapping", None
        ):
            return "logit soft-capping has no fast path"
        return None  # its sliding layers are windowed here
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True):
        context = min(
            max_model_len or 1 << 62, int(getattr(config, "max_position_embeddings", 2048))
        )
        if window < context:
            return (
                f"its sliding window ({window} tokens) is shorter than the context ({context}); "
                "the fast path has no window (--max-model-len within the window makes it fit)"
            )
    return None
