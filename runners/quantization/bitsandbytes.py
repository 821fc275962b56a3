"""bitsandbytes: int8 (LLM.int8) and 4-bit (nf4, fp4; ``int4`` means nf4).

Quantizing at load time (``--quantize nf4``), 4-bit modes keep the first and the last
decoder layer in the model dtype, as llama.cpp's k-quants and most 4-bit recipes do
for the most sensitive layers: on SmolLM2 that took nf4 from +13.9 % to +8.1 %
perplexity for 10 MiB (0.27x -> 0.31x of the bf16 weights without the tied embedding;
bench/quantization.py).

``openllm-clone quantize --method nf4|fp4`` does better offline (:func:`quantize`): it
measures each decoder layer's sensitivity on calibration texts (how much the loss
drops when that one layer alone stays unquantized), keeps the most sensitive ones,
and writes a pre-quantized checkpoint that loads without calibration. On SmolLM2
the measured order is not the edge layers (29, 28, 13, 15, ... with layer 0 far
down the list).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from openllm_clone.errors import InvalidRequestError, MissingDependencyError, ModelLoadError

from . import QuantSpec, checkpoint_name, device_map, edge_layers

logger = logging.getLogger(__name__)

_MODES = {"int8", "int4", "nf4", "fp4"}
BLOCKSIZE = 64  # bitsandbytes' 4-bit block (transformers does not expose another)


def _check_4bit_dims(config: Any) -> None:
    """bitsandbytes' CPU 4-bit kernels repack weights in 64-wide tiles."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    dims = {
        "hidden_size": config.hidden_size,
        "intermediate_size": getattr(config, "intermediate_size", None)
        or getattr(config, "n_inner", None)
        or getattr(config, "ffn_dim", None),
        "attention width": heads * head_dim,
        "key/value width": kv,
    }
    bad = {k: v for k, v in dims.items() if isinstance(v, int) and v % 64}
    if bad:
        raise ModelLoadError(
            f"4-bit bitsandbytes on CPU needs every Linear dimension divisible by 64; this "
            f"model has {bad}. Use --quantize int8 or torchao-int8, or a GPU."
        )


def _layer_patterns(layers: list[int]) -> list[str]:
    """transformers skip patterns for decoder ``layers`` (regexes matched from the
    start of a module's name, up to a module boundary)."""
    return [rf".*\.(?:layers|h|blocks)\.{i}" for i in layers]


def _require() -> None:
    try:
        import bitsandbytes  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError.for_extra("bitsandbytes", "quantize") from exc
    # bitsandbytes warns on every int8 matmul that bf16 inputs are cast to fp16.
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")


def four_bit_config(mode: str, *, dtype: Any, keep_layers: list[int]) -> Any:
    """The BitsAndBytesConfig of a 4-bit mode that keeps ``keep_layers`` unquantized."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="fp4" if mode == "fp4" else "nf4",
        bnb_4bit_compute_dtype=dtype,
        # The output head stays in the model dtype (GPT-NeoX calls it embed_out).
        llm_int8_skip_modules=["lm_head", "embed_out", *_layer_patterns(keep_layers)],
    )


def dispatch(mode: str, *, dtype: Any, device: Any, config: Any) -> QuantSpec | None:
    """Claim int8/int4/nf4/fp4."""
    if mode not in _MODES:
        return None
    _require()
    if mode == "int8":
        from transformers import BitsAndBytesConfig

        qconfig = BitsAndBytesConfig(load_in_8bit=True)
    else:
        if device.type == "cpu":
            _check_4bit_dims(config)
        qconfig = four_bit_config(mode, dtype=dtype, keep_layers=edge_layers(config))
    return QuantSpec(
        mode=mode, quantization_config=qconfig, load_kwargs={"device_map": device_map(device)}
    )


def checkpoint_mode(existing: Any) -> str:
    """nf4, fp4 or int8: the mode of a pre-quantized bitsandbytes checkpoint."""
    get = existing.get if isinstance(existing, dict) else lambda k, d=None: getattr(existing, k, d)
    if get("load_in_4bit") or get("_load_in_4bit"):
        return str(get("bnb_4bit_quant_type", "nf4") or "nf4")
    return "int8"


def default_keep_layers(num_layers: int) -> int:
    """Layers a calibrated 4-bit checkpoint keeps unquantized: an eighth, rounded up
    (none under 4 layers). About 0.05x of the weights, with 4-bit at ~0.28x."""
    return 0 if num_layers < 4 else math.ceil(num_layers / 8)


def _decoder_layers(model: Any) -> Any:
    """The decoder blocks of a Llama-style (``model.layers``) or GPT-2-style (``h``) model."""
    for path in (("model", "layers"), ("transformer", "h"), ("gpt_neox", "layers")):
        obj = model
        for attr in path:
            obj = getattr(obj, attr, None)
        if obj is not None:
            return obj
    raise ModelLoadError(
        f"cannot find the decoder layers of {type(model).__name__} to measure them"
    )


def layer_sensitivity(
    model: Any, batches: list[Any], mode: str, progress: Callable[[str], None] | None = None
) -> list[float]:
    """How much each decoder layer hurts when quantized, measured on ``batches``.

    Every decoder layer's Linear weights are replaced by their 4-bit round trip
    (bitsandbytes' own quantize/dequantize, so the error is the real one); then, one
    layer at a time, that layer's original weights are put back and the loss over
    the calibration tokens is measured. A layer's sensitivity is the loss it removes
    by staying unquantized (the model is left with its original weights). Memory: the
    model plus one copy of its decoder weights (in host memory for a model on a GPU).
    """
    import bitsandbytes.functional as bnbf
    import torch

    layers = _decoder_layers(model)
    linears = [[m for m in layer.modules() if isinstance(m, torch.nn.Linear)] for layer in layers]
    device = linears[0][0].weight.device
    # The originals wait in host memory when the model is on a GPU, so the GPU holds one
    # copy of the weights; each layer's round trip is computed once.
    originals = [
        [
            m.weight.data.to("cpu", copy=True) if device.type != "cpu" else m.weight.data
            for m in group
        ]
        for group in linears
    ]

    def round_trip(w: Any) -> Any:
        q, state = bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type=mode)
        return bnbf.dequantize_4bit(q, state, blocksize=BLOCKSIZE, quant_type=mode).to(w.dtype)

    def use(i: int, quantized: bool) -> None:
        for m, w in zip(linears[i], originals[i]):
            w = w.to(device)
            m.weight.data = round_trip(w) if quantized else w

    def loss() -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for ids in batches:
                n = ids.shape[1] - 1
                total += model(ids, labels=ids).loss.float().item() * n
                count += n
        return total / max(count, 1)

    say = progress or (lambda _msg: None)
    try:
        for i in range(len(layers)):
            use(i, quantized=True)
        all_quantized = loss()
        out = []
        for i in range(len(layers)):
            say(f"measuring layer {i + 1}/{len(layers)}")
            kept = [m.weight.data for m in linears[i]]  # its round trip, put back after
            use(i, quantized=False)
            out.append(all_quantized - loss())
            for m, w in zip(linears[i], kept):
                m.weight.data = w
    finally:
        for i in range(len(layers)):
            use(i, quantized=False)
    return out


def quantize(
    src: Path,
    dst: Path,
    *,
    mode: str,
    texts: list[str],
    keep_layers: int | None = None,
    seqlen: int = 512,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write a pre-quantized nf4/fp4 checkpoint of ``src`` to ``dst`` that keeps the
    ``keep_layers`` most sensitive decoder layers (measured on ``texts``) unquantized.

    Runs on the CPU in bf16 (the first GPU when there is one). Returns what was done,
    for the model store's metadata.
    """
    _require()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if mode not in ("nf4", "fp4", "int4"):
        raise InvalidRequestError(
            f"calibrated bitsandbytes quantization is 4-bit: nf4 or fp4, not {mode!r}"
        )
    mode = checkpoint_name(mode)
    if not texts:
        raise InvalidRequestError("layer sensitivity needs at least one calibration text")
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    config = AutoConfig.from_pretrained(str(src))
    if device.type == "cpu":
        try:
            _check_4bit_dims(config)
        except ModelLoadError as exc:
            raise InvalidRequestError(exc.message) from exc
    num_layers = int(config.num_hidden_layers)
    if keep_layers is None:
        keep_layers = default_keep_layers(num_layers)
    if not 0 <= keep_layers < num_layers:
        raise InvalidRequestError(
            f"--keep-layers must be between 0 and {num_layers - 1} for this "
            f"{num_layers}-layer model, not {keep_layers}"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16)
    model = model.to(device).eval()  # type: ignore[arg-type]
    batches = [tokenizer(t, return_tensors="pt")["input_ids"][:, :seqlen].to(device) for t in texts]
    batches = [b for b in batches if b.shape[1] > 1]
    if not batches:
        raise InvalidRequestError("the calibration texts are too short (need two tokens or more)")
    say(f"measuring {num_layers} layers on {sum(b.shape[1] for b in batches)} calibration tokens")
    sensitivity = layer_sensitivity(model, batches, mode, say)
    del model
    keep = sorted(sorted(range(num_layers), key=lambda i: -sensitivity[i])[:keep_layers])
    logger.info(
        "%s: keeping decoder layers %s unquantized (sensitivity %s)",
        mode,
        keep,
        [round(sensitivity[i], 4) for i in keep],
    )
    say("quantizing and writing the checkpoint")
    qmodel = AutoModelForCausalLM.from_pretrained(
        str(src),
        dtype=torch.bfloat16,
        device_map=device_map(device),
        quantization_config=four_bit_config(mode, dtype=torch.bfloat16, keep_layers=keep),
    )
    # Save before any forward pass: on CPU, bitsandbytes 0.50 repacks 4-bit weights at
    # the first forward, and saving a repacked model writes (and leaves in memory)
    # wrong weights (measured: logits cosine 0.94 instead of 0.9999 to the round trip).
    qmodel.save_pretrained(str(dst))
    tokenizer.save_pretrained(str(dst))
    return {
        "mode": mode,
        "full_precision_layers": keep,
        "sensitivity": [round(x, 5) for x in sensitivity],
        "calibration_texts": len(batches),
        "seconds": round(time.perf_counter() - started, 1),
    }
