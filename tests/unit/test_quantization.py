"""Quantized runners on CPU: load, generate, adapters on top, closeness, real memory."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from openllm_clone.errors import MissingDependencyError, ModelLoadError
from openllm_clone.llm import LLM
from openllm_clone.settings import Settings
from tests.helpers import alone_base_mixed, closeness, last_logits, make_adapter, make_tiny_model

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None

# Minimum cosine similarity and top-1 agreement of last-token logits against the bf16
# model, over 16 prompts. Measured on this random 4-layer test model: bnb int8 and
# torchao int8 >= 0.995 / 0.85; nf4 0.83 / 0.44; fp4 0.77 / 0.19 (random weights are
# harsh on 4-bit). On SmolLM2 the same measure gave int8 0.978 / 0.81, nf4 0.81 / 0.69,
# fp4 0.74 / 0.63 (bench/quantization.py reports perplexity). Thresholds sit below.
THRESHOLDS = {
    "int8": (0.99, 0.75),
    "torchao-int8": (0.99, 0.75),
    "nf4": (0.75, 0.3),
    "fp4": (0.7, 0.1),
}


@pytest.fixture(scope="module")
def quant_model(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """Every Linear dimension a multiple of 64 (bitsandbytes 4-bit on CPU needs it)."""
    from transformers import AutoConfig

    path = make_tiny_model(
        tmp_path_factory.mktemp("q") / "quant-llama", tokenizer, layers=4, hidden=128, seed=7
    )
    config = AutoConfig.from_pretrained(str(path))
    assert config.num_attention_heads == 4 and config.hidden_size // 4 == 32
    return path


@pytest.fixture(scope="module")
def quant_adapter(tmp_path_factory: pytest.TempPathFactory, quant_model: Path) -> Path:
    return make_adapter(quant_model, tmp_path_factory.mktemp("qa") / "qa", seed=11, rank=8)


def _llm(path: Path, quantize: str | None) -> LLM:
    return LLM.from_settings(
        Settings(model=str(path), dtype="bfloat16", device="cpu", quantize=quantize, kv_cache_mb=64)
    )  # type: ignore[arg-type]


def _last_logits(llm: LLM, prompts: list[list[int]]) -> torch.Tensor:
    return last_logits(llm, prompts)


MODES = [
    pytest.param("int8", marks=pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes missing")),
    pytest.param(
        "torchao-int8", marks=pytest.mark.skipif(not HAS_TORCHAO, reason="torchao missing")
    ),
]


@pytest.mark.parametrize(
    "mode",
    [
        *MODES,
        pytest.param("nf4", marks=pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes missing")),
        pytest.param("fp4", marks=pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes missing")),
    ],
)
def test_quantized_mode_is_close_smaller_and_serves_adapters(
    mode: str, quant_model: Path, quant_adapter: Path, tokenizer: Any
) -> None:
    prompts = [
        tokenizer(f"Sentence number {i} about topic {i * 7}.")["input_ids"] for i in range(16)
    ]
    ref = _llm(quant_model, None)
    try:
        ref_logits = _last_logits(ref, prompts)
        ref_bytes = ref.runner.info.weight_bytes
    finally:
        ref.shutdown()
    llm = _llm(quant_model, mode)
    try:
        assert llm.runner.info.quantization == mode
        assert llm.runner.info.weight_bytes < ref_bytes
        logits = _last_logits(llm, prompts)
        cosine, top1 = closeness(logits, ref_logits)
        min_cos, min_top1 = THRESHOLDS[mode]
        assert cosine >= min_cos and top1 >= min_top1, (cosine, top1)

        # The adapter was trained on the unquantized model: the quantized one keeps its
        # aliases, so the base-model check passes without force.
        alone, base, mixed = asyncio.run(
            alone_base_mixed(llm, "qa", prompts[0], load=str(quant_adapter))
        )
        assert alone != base
        if mode == "int8":
            # LLM.int8 picks outlier columns over the whole batch, so a row's result
            # depends on its neighbours: equal within the batch, not token-exact alone.
            assert mixed[0] == mixed[2] and mixed[1] == mixed[3] and mixed[0] != mixed[1]
            assert mixed[1][0] == alone[0] and mixed[0][0] == base[0]
        else:
            assert mixed == [base, alone, base, alone]
    finally:
        llm.shutdown()


def test_4bit_on_cpu_needs_dims_divisible_by_64(tiny_model_dir: Path) -> None:
    if not HAS_BNB:
        pytest.skip("bitsandbytes missing")
    with pytest.raises(ModelLoadError, match="divisible by 64"):
        _llm(tiny_model_dir, "nf4")


def test_gptq_without_gptqmodel_fails_clearly(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "gptqmodel", None)  # as if the extra were not installed
    with pytest.raises(ModelLoadError, match="quantize the model first"):
        _llm(tiny_model_dir, "gptq")
    import json
    import shutil

    ckpt = tiny_model_dir.parent / "fake-gptq"
    shutil.copytree(tiny_model_dir, ckpt, dirs_exist_ok=True)
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(MissingDependencyError, match="gptqmodel"):
        _llm(ckpt, None)


@pytest.fixture(scope="module")
def neox_model(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """A GPT-NeoX (generic runner): fused query_key_value, every Linear dim a multiple of 64."""
    from tests.families import make_family_model

    return make_family_model(
        "gpt_neox",
        tmp_path_factory.mktemp("neox") / "neox",
        tokenizer,
        scale=1.0,
        num_key_value_heads=4,
    )


@pytest.mark.parametrize(
    "mode",
    [
        *MODES,
        pytest.param("nf4", marks=pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes missing")),
        pytest.param("fp4", marks=pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes missing")),
    ],
)
def test_quantized_generic_family_serves_adapters(
    mode: str, neox_model: Path, tokenizer: Any, tmp_path: Path
) -> None:
    """Each load-time mode on a non-Llama family, through the generic runner, with an
    adapter trained on the unquantized model on top."""
    adapter = make_adapter(
        neox_model, tmp_path / "neox-adapter", seed=5, rank=8, targets="all-linear"
    )
    prompts = [
        tokenizer(f"Sentence number {i} about topic {i * 7}.")["input_ids"] for i in range(8)
    ]
    ref = _llm(neox_model, None)
    try:
        ref_logits = _last_logits(ref, prompts)
        ref_bytes = ref.runner.info.weight_bytes
    finally:
        ref.shutdown()
    llm = _llm(neox_model, mode)
    try:
        assert llm.runner.tier == "generic" and llm.runner.info.quantization == mode
        assert llm.runner.info.weight_bytes < ref_bytes
        cosine, top1 = closeness(_last_logits(llm, prompts), ref_logits)
        min_cos, min_top1 = THRESHOLDS[mode]
        assert cosine >= min_cos and top1 >= min_top1, (cosine, top1)
        alone, base, mixed = asyncio.run(
            alone_base_mixed(llm, "neox-adapter", prompts[0], load=str(adapter))
        )
        assert alone != base
        if mode == "int8":  # outlier columns depend on the whole batch (see above)
            assert mixed[0] == mixed[2] and mixed[1] == mixed[3] and mixed[0] != mixed[1]
        else:
            assert mixed == [base, alone, base, alone]
    finally:
        llm.shutdown()


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes missing")
def test_dora_on_an_nf4_base_equals_peft_on_that_base(
    quant_model: Path, tokenizer: Any, tmp_path: Path
) -> None:
    """A DoRA adapter trained on the unquantized model, served on its nf4 base: the norm
    of the dequantized weight plus the adapter, as peft computes it. Last-token logits
    equal peft's own forward on the same nf4 model within bf16 rounding (measured here:
    3 % of the largest logit, cosine 0.9994, where the adapter itself moves them by 140 %).

    peft's reference runs with bitsandbytes' CPU repacking off: on a CPU with AVX512-BF16
    bitsandbytes repacks a 4-bit weight at its first forward and peft 0.22 then
    dequantizes the repacked bytes as the original ones (wrong norms); the server
    dequantizes either layout (runners/dora.py)."""
    from openllm_clone.runners.base import StepRow
    from openllm_clone.runners.quantization.bitsandbytes import dispatch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    dora = make_adapter(quant_model, tmp_path / "dora", seed=3, rank=8, dora=True)
    prompts = [
        tokenizer(f"Sentence number {i} about topic {i * 7}.")["input_ids"] for i in range(6)
    ]
    llm = _llm(quant_model, "nf4")
    try:
        asyncio.run(llm.adapters.load("dora", str(dora)))
        record = llm.adapters.get("dora")
        assert record is not None and record.kind == "dora"
        ours = {}
        blocks = llm.engine.blocks
        for slot in (0, record.slot):
            got = []
            for ids in prompts:  # one row a step: peft's reference runs one at a time
                table = [blocks.allocate() for _ in range((len(ids) + 15) // 16)]
                got.append(llm.runner.step([StepRow(ids, 0, table, adapter_slot=slot)])[0])
                blocks.free(table)
            ours[slot] = torch.stack(got)
    finally:
        llm.shutdown()
    spec = dispatch(
        "nf4",
        dtype=torch.bfloat16,
        device=torch.device("cpu"),
        config=AutoConfig.from_pretrained(str(quant_model)),
    )
    assert spec is not None
    model = AutoModelForCausalLM.from_pretrained(
        str(quant_model),
        dtype=torch.bfloat16,
        quantization_config=spec.quantization_config,
        **spec.load_kwargs,
    )
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    peft_model = PeftModel.from_pretrained(model, str(dora)).eval()
    with torch.inference_mode():
        ref = torch.stack(
            [peft_model(torch.tensor([ids])).logits[0, -1].float() for ids in prompts]
        )
    scale = ref.abs().max()
    assert float((ours[record.slot] - ref).abs().max() / scale) < 0.06
    assert torch.nn.functional.cosine_similarity(ours[record.slot], ref, dim=-1).min() > 0.998
    assert float((ours[0] - ref).abs().max() / scale) > 0.5  # the adapter matters
