"""GPTQ both ways on CPU: `openllm-clone quantize` into the store, then serve it (and an
old AutoGPTQ-layout copy of it), with adapters on top."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

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

HAS_GPTQ = (
    importlib.util.find_spec("gptqmodel") is not None
    and importlib.util.find_spec("optimum") is not None
)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not HAS_GPTQ, reason="gptqmodel/optimum missing (extra gptq)"),
]

# Min cosine and top-1 agreement of last-token logits against the fp32 model over 16
# prompts, per bit width. Measured on this random 4-layer model (group size 64, builtin
# calibration): 4-bit 0.85 / 0.125 with every layer quantized (random weights are harsh
# on 4 bits, as for nf4 in test_quantization.py), 0.957 / 0.75 with the first and last
# layers kept (the default at 4 bits); 8-bit 0.999 / 1.0. Thresholds sit below; bench/quantization.py gives
# SmolLM2's perplexity.
THRESHOLDS = {4: (0.9, 0.5), 8: (0.99, 0.75)}


@pytest.fixture(scope="module")
def fp_model(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    return make_tiny_model(
        tmp_path_factory.mktemp("gptq") / "gptq-llama", tokenizer, layers=4, hidden=128, seed=5
    )


def _quantize(fp_model: Path, bits: int) -> str:
    result = run_cli(
        "quantize",
        str(fp_model),
        "--method",
        "gptq",
        "--bits",
        str(bits),
        "--group-size",
        "64",
        "--calibration",
        "builtin",
        "--name",
        f"tiny-gptq{bits}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tag = result.stdout.strip().splitlines()[-1]
    assert tag.startswith(f"tiny-gptq{bits}:")
    import bentoml

    facts = bentoml.models.get(tag).info.metadata["gptq"]  # what was done, in the store
    assert facts["bits"] == bits and facts["group_size"] == 64 and facts["calibration"] == "builtin"
    assert facts["full_precision_layers"] == ([0, 3] if bits <= 4 else [])
    return tag


@pytest.fixture(scope="module")
def gptq_tag(fp_model: Path) -> str:
    return _quantize(fp_model, 4)


def _llm(model: str, dtype: str = "float32", runner: str = "auto") -> LLM:
    return LLM.from_settings(
        Settings(
            model=model,
            dtype=dtype,
            device="cpu",
            kv_cache_mb=64,  # type: ignore[arg-type]
            runner=runner,
        )
    )  # type: ignore[arg-type]


def _last_logits(llm: LLM, prompts: list[list[int]]) -> torch.Tensor:
    return last_logits(llm, prompts).float()


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_command_makes_a_close_smaller_model_that_serves_adapters(
    bits: int, gptq_tag: str, fp_model: Path, tokenizer: Any, tmp_path: Path
) -> None:
    tag = gptq_tag if bits == 4 else _quantize(fp_model, bits)
    prompts = [
        tokenizer(f"Sentence number {i} about topic {i * 7}.")["input_ids"] for i in range(16)
    ]
    ref = _llm(str(fp_model))
    try:
        ref_logits, ref_bytes = _last_logits(ref, prompts), ref.runner.info.weight_bytes
    finally:
        ref.shutdown()
    adapter = make_adapter(fp_model, tmp_path / "ad", seed=3, rank=8)
    llm = _llm(tag)
    try:
        meta = llm.metadata()
        assert meta["quantization"] == "gptq"
        assert meta["weight_bytes"] < ref_bytes
        # 4 bits keep the first and last decoder layers in full precision; 8 bits do not.
        kinds = [
            type(layer.mlp.down_proj) is torch.nn.Linear for layer in llm.runner.model.model.layers
        ]
        assert kinds == ([True, False, False, True] if bits == 4 else [False] * 4)
        logits = _last_logits(llm, prompts)
        cosine, top1 = closeness(logits, ref_logits)
        print(
            f"gptq {bits}-bit: cosine {cosine:.3f} top-1 {top1:.3f} bytes {meta['weight_bytes']} "
            f"vs {ref_bytes}"
        )
        min_cos, min_top1 = THRESHOLDS[bits]
        assert cosine >= min_cos and top1 >= min_top1, (cosine, top1)

        # The adapter was trained on the unquantized model: the quantized one keeps its
        # aliases, so the base-model check passes without force.
        alone, base, mixed = asyncio.run(alone_base_mixed(llm, "ad", prompts[0], load=str(adapter)))
        assert alone != base
        assert mixed == [base, alone, base, alone]
    finally:
        llm.shutdown()
    listed = run_cli("models")
    assert f"tiny-gptq{bits}" in listed.stdout, listed.stdout


def test_old_autogptq_layout_loads_the_same_weights(
    gptq_tag: str, tokenizer: Any, tmp_path: Path
) -> None:
    from openllm_clone.store import resolve_model

    stored = resolve_model(gptq_tag).path
    legacy = tmp_path / "autogptq"
    shutil.copytree(stored, legacy)
    config = json.loads((legacy / "config.json").read_text())
    qc = config.pop("quantization_config")
    assert qc["checkpoint_format"] == "gptq"  # v1: the AutoGPTQ tensor layout
    (legacy / "config.json").write_text(json.dumps(config))
    (legacy / "quantize_config.json").write_text(
        json.dumps(
            {
                "bits": qc["bits"],
                "group_size": qc["group_size"],
                "desc_act": qc["desc_act"],
                "sym": qc["sym"],
                "damp_percent": 0.01,
                "true_sequential": True,
                "model_name_or_path": None,
                "model_file_base_name": "model",
                "modules_in_block_to_quantize": qc["modules_in_block_to_quantize"],
            }
        )
    )
    prompts = [tokenizer(f"Legacy prompt {i}")["input_ids"] for i in range(4)]
    a, b = _llm(gptq_tag), _llm(str(legacy))
    try:
        assert b.runner.info.quantization == "gptq"
        assert torch.equal(_last_logits(a, prompts), _last_logits(b, prompts))
    finally:
        a.shutdown()
        b.shutdown()


def test_quantize_refuses_bad_arguments_clearly(fp_model: Path, tmp_path: Path) -> None:
    bad_group = run_cli("quantize", str(fp_model), "--group-size", "48", "--name", "nope")
    assert bad_group.returncode != 0 and "group size 48" in bad_group.stderr + bad_group.stdout
    missing = run_cli("quantize", str(fp_model), "--calibration", str(tmp_path / "none.txt"))
    assert missing.returncode != 0 and "calibration" in missing.stderr + missing.stdout
    method = run_cli("quantize", str(fp_model), "--method", "awq")
    assert method.returncode != 0 and "unknown quantization method" in method.stderr + method.stdout


def test_gptq_on_a_generic_family_serves_adapters(tokenizer: Any, tmp_path: Path) -> None:
    """GPTQ 8-bit of a Qwen3 model on the generic runner: close, smaller, adapter on top."""
    from tests.families import make_family_model

    fp = make_family_model(
        "qwen3",
        tmp_path / "qwen3",
        tokenizer,
        scale=1.0,
        hidden_size=128,
        intermediate_size=256,
        num_key_value_heads=4,
        head_dim=32,
    )
    result = run_cli(
        "quantize",
        str(fp),
        "--method",
        "gptq",
        "--bits",
        "8",
        "--group-size",
        "64",
        "--calibration",
        "builtin",
        "--name",
        "qwen3-gptq8",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tag = result.stdout.strip().splitlines()[-1]
    adapter = make_adapter(fp, tmp_path / "qwen3-adapter", seed=3, rank=8, targets="all-linear")
    prompts = [
        tokenizer(f"Sentence number {i} about topic {i * 7}.")["input_ids"] for i in range(8)
    ]
    ref = _llm(str(fp), runner="generic")
    try:
        ref_logits, ref_bytes = _last_logits(ref, prompts), ref.runner.info.weight_bytes
    finally:
        ref.shutdown()
    llm = _llm(tag, runner="generic")
    try:
        assert llm.runner.tier == "generic" and llm.runner.info.quantization == "gptq"
        assert llm.runner.info.weight_bytes < ref_bytes
        cosine, top1 = closeness(_last_logits(llm, prompts), ref_logits)
        assert cosine >= THRESHOLDS[8][0] and top1 >= THRESHOLDS[8][1], (cosine, top1)
        alone, base, mixed = asyncio.run(alone_base_mixed(llm, "qa", prompts[0], load=str(adapter)))
        assert alone != base and mixed == [base, alone, base, alone]
    finally:
        llm.shutdown()
