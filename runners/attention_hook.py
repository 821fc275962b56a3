"""How the generic runner's attention plugs into transformers.

An attention function registered through transformers' ``AttentionInterface`` under
:data:`ATTENTION_NAME` replaces the model's own. During a runner step it hands each
layer's call to the runner in :data:`local` (the runner's paged attention); during a
probe (:func:`probe_attention`) it records every attention call's module and shapes and
attends causally, so the runner learns the model's layers without reading its code.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

from .attention import attend, window_mask

__all__ = [
    "ATTENTION_NAME",
    "NO_ATTENTION",
    "Probe",
    "accepts_attention_functions",
    "install_paged_attention",
    "local",
    "probe_attention",
]

ATTENTION_NAME = "openllm_clone_paged"


@dataclass
class Probe:
    """What the first forward learns about each attention call."""

    module: Any
    kv_heads: int
    k_dim: int
    v_dim: int
    dtype: torch.dtype


class _Local(threading.local):
    runner: Any = None  # the GenericRunner whose step is running on this thread
    probe: list[Probe] | None = None


local = _Local()  # this thread's runner in a step, or the probe in progress
_registered = False


def _register() -> None:
    """Register the paged attention function with transformers (once per process)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _paged_attention)
    _registered = True


def _paged_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: ``query [1, H, T, D]``, ``key/value [1, KV, T, D]``
    (rotary already applied); returns ``[1, T, H, Dv]``."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    sinks = s_aux if s_aux is not None else getattr(module, "sinks", None)
    if local.probe is not None:  # the first forward: learn the shapes, attend causally
        local.probe.append(Probe(module, key.shape[1], key.shape[-1], value.shape[-1], key.dtype))
        T = query.shape[2]
        pos = torch.arange(T, device=query.device)
        mask = window_mask(pos.unsqueeze(1), pos.unsqueeze(0), sliding_window)
        out = attend(query, key, value, mask, scaling, softcap, sinks)
        return out.transpose(1, 2), None
    runner = local.runner
    if runner is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention called outside a runner step")
    return runner._paged(query, key, value, scaling, sliding_window, softcap, sinks), None


NO_ATTENTION = (
    "no attention layer goes through transformers' AttentionInterface (its attention "
    "calls its own kernels, or it is a state-space or recurrent model)"
)


def accepts_attention_functions(model: Any) -> bool:
    """transformers' own test: does the modeling code dispatch through AttentionInterface?"""
    probe = getattr(model, "_can_set_attn_implementation", None)
    if probe is None:
        return True
    try:
        return bool(probe())
    except Exception:  # the probe reads source files; without them, let the load decide
        return True


def install_paged_attention(model: Any) -> str | None:
    """Switch ``model`` to the paged attention; the reason it cannot be, or None."""
    _register()
    if not accepts_attention_functions(model):
        return (
            "its attention does not go through transformers' AttentionInterface (the modeling "
            "code calls its own kernels)"
        )
    try:
        model.set_attn_implementation(ATTENTION_NAME)
    except (ValueError, KeyError, AttributeError, NotImplementedError) as exc:
        return f"its modeling code does not accept a custom attention function ({exc})"
    return None


def probe_attention(model: Any, tokens: int, device: Any) -> list[Probe]:
    """A forward of ``tokens`` tokens with plain causal attention (no cache, any device,
    ``meta`` included): every attention call's module and shapes, in call order."""
    probes: list[Probe] = []
    local.probe = probes
    try:
        with torch.inference_mode():
            ids = (torch.arange(tokens, device=device) % 97 + 1).unsqueeze(0)
            pos = torch.arange(tokens, device=device).unsqueeze(0)
            model(input_ids=ids, position_ids=pos, use_cache=False)
    finally:
        local.probe = None
    return probes
