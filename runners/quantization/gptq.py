"""GPTQ: make GPTQ checkpoints and serve them (AutoGPTQ format included).

auto-gptq does not import with transformers 5; its maintained successor gptqmodel
does the work behind transformers' ``GPTQConfig`` and optimum's ``GPTQQuantizer``.
gptqmodel 7.7 requires torch >= 2.14.1; 7.6 works with torch 2.8 and later, so the
``gptq`` extra pins ``gptqmodel>=7.6,<7.7``. Without it, loading a GPTQ checkpoint or
asking for ``--quantize gptq`` fails at once naming what to install.

Checkpoints are written in the v1 ``gptq`` format (AutoGPTQ's), which every GPTQ
loader reads. Old AutoGPTQ checkpoints that carry their settings in
``quantize_config.json`` instead of ``config.json`` load too.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from openllm_clone.errors import InvalidRequestError, MissingDependencyError, ModelLoadError

from . import QuantSpec, device_map, edge_layers

logger = logging.getLogger(__name__)


def _require_gptqmodel() -> None:
    # On a 2-core machine gptqmodel's default worker count oversubscribes the CPU.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(4, os.cpu_count() or 1))))
    try:
        import gptqmodel  # noqa: F401
        import optimum  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            "GPTQ needs gptqmodel and optimum: `pip install 'openllm-clone[gptq]'` "
            "(gptqmodel>=7.6,<7.7 works with torch 2.8+; 7.7 requires torch >= 2.14.1)"
        ) from exc


def legacy_quantize_config(path: Path) -> dict[str, Any] | None:
    """The quantization_config of an old AutoGPTQ checkpoint (``quantize_config.json``)."""
    file = path / "quantize_config.json"
    if not file.is_file():
        return None
    raw = json.loads(file.read_text())
    return {
        "quant_method": "gptq",
        "bits": int(raw["bits"]),
        "group_size": int(raw.get("group_size", 128)),
        "desc_act": bool(raw.get("desc_act", False)),
        "sym": bool(raw.get("sym", True)),
        "damp_percent": float(raw.get("damp_percent", 0.01)),
        "true_sequential": bool(raw.get("true_sequential", True)),
        "checkpoint_format": raw.get("checkpoint_format", "gptq"),
        # Ours, when the edge layers stayed in full precision (AutoGPTQ never writes it).
        "modules_in_block_to_quantize": raw.get("modules_in_block_to_quantize"),
    }


def quantize(
    src: Path,
    dst: Path,
    *,
    bits: int,
    group_size: int | None,
    texts: list[str],
    seqlen: int = 512,
    desc_act: bool = False,
    sym: bool = True,
    keep_edge_layers: bool | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """GPTQ-quantize the model in ``src`` with calibration ``texts``; write it to ``dst``.

    Runs on the CPU (or the first GPU when there is one). ``keep_edge_layers`` (default:
    at 4 bits and below) keeps the first and last decoder layers in full precision, as
    the bitsandbytes 4-bit modes do. Returns what was done, for the model store's
    metadata.
    """
    _require_gptqmodel()
    import torch
    from optimum.gptq import GPTQQuantizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if bits not in (2, 3, 4, 8):
        raise InvalidRequestError(f"GPTQ bits must be 2, 3, 4 or 8, not {bits}")
    if not texts:
        raise InvalidRequestError("GPTQ needs at least one calibration text")
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    in_features = {m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)}
    if group_size is None:
        group_size = default_group_size(in_features)
    if group_size > 0 and any(f % group_size for f in in_features):
        raise InvalidRequestError(
            f"group size {group_size} does not divide every layer's input width "
            f"({sorted(in_features)})"
        )
    quantizer = GPTQQuantizer(
        bits=bits,
        group_size=group_size,
        dataset=texts,
        desc_act=desc_act,
        sym=sym,
        act_group_aware=not desc_act,
        model_seqlen=seqlen,
        format="gptq",
    )
    if keep_edge_layers is None:
        keep_edge_layers = bits <= 4
    keep = edge_layers(model.config) if keep_edge_layers else []
    originals = _linear_tensors(model, keep)
    say(
        f"quantizing {len(texts)} calibration texts through {model.config.num_hidden_layers} layers"
    )
    quantizer.quantize_model(model, tokenizer)
    say("writing the checkpoint")
    quantizer.save(model, str(dst))  # converts to the v1 (AutoGPTQ) format
    tokenizer.save_pretrained(str(dst))
    quantized_modules = _restore_full_precision(dst, model, originals) if originals else []
    # optimum converts the tensors to v1 on save and says so in quantize_config.json,
    # but config.json (what transformers reads) keeps "gptq_v2": loading would then
    # misread every zero point. Make config.json agree with the tensors, and keep the
    # calibration texts out of both files.
    config_file, saved_file = dst / "config.json", dst / "quantize_config.json"
    config = json.loads(config_file.read_text())
    saved = json.loads(saved_file.read_text()) if saved_file.is_file() else {}
    qc = {**(config.get("quantization_config") or {}), **saved, "quant_method": "gptq"}
    for key in ("dataset", "tokenizer"):
        qc.pop(key, None)
        saved.pop(key, None)
    qc["checkpoint_format"] = qc["format"] = saved.get("format", "gptq")
    if originals:
        # Loading converts only the modules named here (optimum matches name suffixes).
        qc["modules_in_block_to_quantize"] = saved["modules_in_block_to_quantize"] = [
            quantized_modules
        ]
    config["quantization_config"] = qc
    config_file.write_text(json.dumps(config, indent=2))
    if saved:
        saved_file.write_text(json.dumps(saved, indent=2))
    return {
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "full_precision_layers": keep,
        "calibration_texts": len(texts),
        "seconds": round(time.perf_counter() - started, 1),
    }


def default_group_size(in_features: set[int]) -> int:
    """128 (AutoGPTQ's default) for wide models; 32 for narrow ones (inputs under 1024).

    Measured on SmolLM2-135M (576-wide) at 4 bits, perplexity against bf16 on two texts:
    g64 +33.0 % / +8.1 %, g32 +10.7 % / +6.6 %, for ~0.3 more bits a weight. Falls back
    to the largest of 64/32/16 that divides every input width.
    """
    candidates = (128, 64, 32, 16) if min(in_features) >= 1024 else (32, 16)
    for g in candidates:
        if not any(f % g for f in in_features):
            return g
    return -1


def _linear_tensors(model: Any, layers: list[int]) -> dict[str, Any]:
    """The Linear weights and biases of decoder ``layers``, by state-dict name."""
    import torch

    out = {}
    for i in layers:
        block = model.model.layers[i]
        for name, module in block.named_modules():
            if isinstance(module, torch.nn.Linear):
                prefix = f"model.layers.{i}.{name}"
                out[f"{prefix}.weight"] = module.weight.detach().clone()
                if module.bias is not None:
                    out[f"{prefix}.bias"] = module.bias.detach().clone()
    return out


def _restore_full_precision(dst: Path, model: Any, originals: dict[str, Any]) -> list[str]:
    """Put ``originals`` back in place of their quantized tensors in the saved shards.

    Returns the full names of the modules that stay quantized, for
    ``modules_in_block_to_quantize``.
    """
    from safetensors.torch import load_file, save_file

    quantized = sorted(
        {name.rsplit(".", 1)[0] for name, _ in model.named_buffers() if name.endswith(".qweight")}
    )
    kept = {name.rsplit(".", 1)[0] for name in originals}
    index_file = dst / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else None
    shards = sorted(dst.glob("*.safetensors"))
    placed = False
    for shard in shards:
        tensors = load_file(str(shard))
        dropped = [k for k in tensors if k.rsplit(".", 1)[0] in kept]
        if not dropped and (placed or shard != shards[-1]):
            continue
        for k in dropped:
            del tensors[k]
        if not placed:
            tensors.update({k: v.contiguous() for k, v in originals.items()})
            placed = True
        save_file(tensors, str(shard), metadata={"format": "pt"})
        if index is not None:
            wm = index["weight_map"]
            for k in dropped:
                wm.pop(k, None)
            for k in originals:
                wm[k] = shard.name
    if index is not None:
        index_file.write_text(json.dumps(index, indent=2))
    return [q for q in quantized if q not in kept]


def dispatch(mode: str, *, dtype: Any, device: Any, config: Any) -> QuantSpec | None:
    """Claim gptq: only a checkpoint that is already GPTQ-quantized can be served."""
    if mode != "gptq":
        return None
    existing = getattr(config, "quantization_config", None)
    method = (
        (existing or {}).get("quant_method")
        if isinstance(existing, dict)
        else getattr(existing, "quant_method", None)
    )
    if str(method).lower() != "gptq":
        raise ModelLoadError(
            "--quantize gptq serves a GPTQ checkpoint; quantize the model first with "
            "`openllm-clone quantize MODEL --method gptq`"
        )
    return dispatch_checkpoint(existing, device=device)


def dispatch_checkpoint(existing: Any, *, device: Any) -> QuantSpec | None:
    """A checkpoint that carries its own quantization_config."""
    method = (
        existing.get("quant_method")
        if isinstance(existing, dict)
        else getattr(existing, "quant_method", None)
    )
    method = str(method).lower() if method is not None else None
    if method in (None, "none"):
        return None
    if method == "gptq":
        _require_gptqmodel()
        return QuantSpec(mode="gptq", load_kwargs={"device_map": device_map(device)})
    if method in ("bitsandbytes", "torchao"):
        mode = method
        if method == "bitsandbytes":
            from .bitsandbytes import _require, checkpoint_mode

            _require()
            mode = checkpoint_mode(existing)
        return QuantSpec(mode=mode, load_kwargs={"device_map": device_map(device)})
    raise ModelLoadError(f"checkpoints quantized with {method!r} are not supported")
