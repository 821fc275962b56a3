"""`openllm-clone quantize --method nf4|fp4`: a bitsandbytes 4-bit checkpoint whose
unquantized layers are chosen by measured sensitivity; served with adapters on top."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from openllm_clone.errors import ModelLoadError
from openllm_clone.llm import LLM
from openllm_clone.settings import Settings
from tests.helpers import (
    alone_base_mixed,
    closeness,
    last_logits,
    make_adapter,
    make_tiny_model,
    run_cli,
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes missing (extra quantize)"
)

# Min cosine and top-1 agreement of last-token logits against the bf16 model over 16
# prompts. Measured on this random 4-layer model with one layer kept (the default for 4
# layers): fp4 0.915 / 0.19 (on-the-fly fp4 with two edge layers kept: 0.77 / 0.19 in
# test_quantization.py; random weights give flat logits, so top-1 is harsh).
# Thresholds sit below; bench/quantization.py gives SmolLM2's perplexity.
MIN_COSINE, MIN_TOP1 = 0.85, 0.1


@pytest.fixture(scope="module")
def fp_model(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """Every Linear dimension a multiple of 64 (bitsandbytes 4-bit on CPU needs it)."""
    return make_tiny_model(
        tmp_path_factory.mktemp("bnbq") / "bnbq-llama", tokenizer, layers=4, hidden=128, seed=9
    )


def _llm(model: str, quantize: str | None = None) -> LLM:
    return LLM.from_settings(
        Settings(
            model=model,
            dtype="bfloat16",
            device="cpu",
            quantize=quantize,  # type: ignore[arg-type]
            kv_cache_mb=64,
        )
    )


def _embedding_bytes(llm: LLM) -> int:
    embed = llm.runner.embed.weight
    return embed.numel() * embed.element_size()


@pytest.mark.model
@pytest.mark.slow
def test_sensitivity_finds_the_layer_that_4bit_damages(bentoml_home: Path) -> None:
    """On SmolLM2 (a real model: the loss means something; a random one's does not move),
    a layer whose 64-weight blocks each hold one large weight loses its other weights to
    the 4-bit round trip: it must come out as the most sensitive layer. The large weights
    sit on input features the layer's norms zero, so the unquantized model computes what
    it computed before, less those few input features."""
    from openllm_clone.runners.quantization.bitsandbytes import layer_sensitivity
    from openllm_clone.runners.quantization.calibration import BUILTIN_TEXTS
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openllm_clone.store import resolve_model

    path = str(resolve_model("smollm2").path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    target = 17  # not an edge layer, and low in SmolLM2's own order (29, 28, 13, 15, ...)
    damaged = model.model.layers[target]
    with torch.no_grad():
        for norm in (damaged.input_layernorm, damaged.post_attention_layernorm):
            norm.weight[::64] = 0.0  # these input features never reach the projections
        for proj in (
            damaged.self_attn.q_proj,
            damaged.self_attn.k_proj,
            damaged.self_attn.v_proj,
            damaged.mlp.gate_proj,
            damaged.mlp.up_proj,
        ):
            proj.weight[:, ::64] = 8 * proj.weight.abs().max()  # one per 64-wide block
    before = {n: p.clone() for n, p in model.named_parameters()}
    batches = [tokenizer(t, return_tensors="pt")["input_ids"] for t in BUILTIN_TEXTS[:2]]
    layers = len(model.model.layers)
    for mode in ("fp4", "nf4"):
        sensitivity = layer_sensitivity(model, batches, mode)
        assert len(sensitivity) == layers
        assert max(range(layers), key=lambda i: sensitivity[i]) == target, (mode, sensitivity)
    # The model is left with its own weights.
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_quantize_fp4_keeps_the_measured_layer_and_serves_adapters(
    fp_model: Path, tokenizer: Any, tmp_path: Path
) -> None:
    result = run_cli("quantize", str(fp_model), "--method", "fp4", "--name", "tiny-fp4")
    assert result.returncode == 0, result.stderr[-3000:]
    tag = result.stdout.strip().splitlines()[-1]
    assert tag.startswith("tiny-fp4:")

    import bentoml

    stored = bentoml.models.get(tag)
    facts = stored.info.metadata["bitsandbytes"]
    assert stored.info.metadata["quantization"] == "fp4"
    assert facts["mode"] == "fp4" and len(facts["sensitivity"]) == 4
    kept = facts["full_precision_layers"]
    assert kept == [max(range(4), key=lambda i: facts["sensitivity"][i])]  # 4 layers: keep 1
    assert f"kept in full precision: {kept}" in result.stderr

    from openllm_clone.bento import _checkpoint_quantization

    assert _checkpoint_quantization(Path(stored.path)) == "fp4"  # a bento installs bitsandbytes

    prompts = [
        tokenizer(f"Sentence number {i} about topic {i * 7}.")["input_ids"] for i in range(16)
    ]
    ref = _llm(str(fp_model))
    try:
        ref_logits = last_logits(ref, prompts).float()
        ref_bytes = ref.runner.info.weight_bytes - _embedding_bytes(ref)
    finally:
        ref.shutdown()
    adapter = make_adapter(fp_model, tmp_path / "ad", seed=4, rank=8)
    llm = _llm(tag)
    try:
        assert llm.runner.info.quantization == "fp4"
        # Without the (tied, unquantized) embedding: 1 of 4 layers in bf16, 3 at ~0.28x.
        assert llm.runner.info.weight_bytes - _embedding_bytes(llm) < 0.6 * ref_bytes
        layers = llm.runner.model.model.layers
        for i, layer in enumerate(layers):
            kinds = {type(m).__name__ for m in layer.modules() if "Linear" in type(m).__name__}
            assert kinds == ({"Linear"} if i in kept else {"Linear4bit"}), (i, kinds)
        logits = last_logits(llm, prompts).float()
        cosine, top1 = closeness(logits, ref_logits)
        assert cosine >= MIN_COSINE and top1 >= MIN_TOP1, (cosine, top1)

        # The adapter was trained on the unquantized model: the quantized one keeps its
        # aliases, so the base-model check passes without force.
        alone, base, mixed = asyncio.run(alone_base_mixed(llm, "ad", prompts[0], load=str(adapter)))
        assert alone != base
        assert mixed == [base, alone, base, alone]
    finally:
        llm.shutdown()

    # --quantize naming the checkpoint's own mode is accepted; another one is refused.
    same = _llm(tag, "fp4")
    same.shutdown()
    with pytest.raises(ModelLoadError, match=r"already quantized \(fp4\)"):
        _llm(tag, "nf4")
    config = json.loads((Path(stored.path) / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "fp4"
    again = run_cli("quantize", tag, "--method", "nf4", "--name", "nope")
    assert again.returncode != 0 and "already quantized (fp4)" in again.stderr + again.stdout
    listed = run_cli("models")
    row = next(line for line in listed.stdout.splitlines() if "tiny-fp4:" in line)
    assert "fp4" in [cell.strip() for cell in row.split("│")], row  # the quantization column


def test_quantize_4bit_refuses_bad_arguments_clearly(fp_model: Path) -> None:
    cases = [
        (["--method", "fp4", "--bits", "8"], "fp4 is 4-bit"),
        (["--method", "nf4", "--keep-layers", "4"], "between 0 and 3"),
        (["--method", "nf4", "--group-size", "32"], "GPTQ options"),
        (["--method", "gptq", "--keep-layers", "2"], "--keep-layers is for nf4/fp4"),
        (["--method", "int8"], "quantize at load time"),
    ]
    for args, message in cases:
        result = run_cli("quantize", str(fp_model), *args, "--name", "nope")
        assert result.returncode != 0 and message in result.stderr + result.stdout, (
            args,
            result.stderr[-2000:],
        )
