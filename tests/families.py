"""Tiny seeded random models of many transformers families, and their reference outputs.

Each model has SmolLM2's tokenizer, 2 decoder layers 64 wide, an untied output head
(tied heads of tiny random models repeat one token under greedy decoding) and weights
scaled up so that greedy output is not degenerate. Windows are shorter than the
test prompts, so sliding-window layers really slide.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = [
    "FAMILIES",
    "MORE_FAMILIES",
    "make_family_model",
    "reference_greedy",
    "reference_logprobs",
    "reference_model",
]

WINDOW = 8  # tokens; shorter than every test prompt plus its output

# family -> config arguments beyond the common ones below.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": WINDOW},
    "qwen2": {"sliding_window": WINDOW, "use_sliding_window": True, "max_window_layers": 1},
    "qwen3": {"head_dim": 16},
    "qwen3_moe": {
        "head_dim": 16,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "decoder_sparse_step": 1,
    },
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "sliding_window": WINDOW},
    "gemma3_text": {
        "head_dim": 16,
        "sliding_window": WINDOW,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "phi3": {},
    "phi": {},
    "gpt2": {},
    "gpt_neox": {},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "olmo2": {},
    "granite": {},
    "starcoder2": {},
    "smollm3": {},
}
# More families, checked in-process (tests/unit/test_more_families.py) to keep the server
# matrix above at the 18 of the architectures issue.
MORE_FAMILIES: dict[str, dict[str, Any]] = {
    "cohere": {},
    "stablelm": {},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "gpt_oss": {
        "head_dim": 16,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": WINDOW,
    },
    "exaone4": {"head_dim": 16, "sliding_window": WINDOW},
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "falcon": {"new_decoder_architecture": True, "num_kv_heads": 2},
}


def make_family_model(
    family: str, path: Path, tokenizer: Any, *, seed: int = 0, scale: float = 3.0, **overrides: Any
) -> Path:
    """Save a tiny random ``family`` model with ``tokenizer`` into ``path`` (``overrides``
    replace config arguments)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    common: dict[str, Any] = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.eos_token_id,
    }
    extra = FAMILIES[family] if family in FAMILIES else MORE_FAMILIES[family]
    config = AutoConfig.for_model(family, **{**common, **extra, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.mul_(scale)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def reference_model(path: Path, adapter: Path | None = None, *, device: str = "cpu") -> Any:
    """The transformers model in fp32 on ``device``; with ``adapter``, peft's
    ``merge_and_unload`` of it."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()
    return model.to(device)


def reference_logprobs(
    path: Path, tokens: list[int], *, adapter: Path | None = None, device: str = "cpu"
) -> Any:
    """Row ``p``: the reference model's fp32 log_softmax for the token after position ``p``
    (on the CPU, whatever ``device`` computed it)."""
    import torch

    with torch.inference_mode():
        model = reference_model(path, adapter, device=device)
        logits = model(torch.tensor([tokens], device=device)).logits[0]
        return torch.log_softmax(logits.float(), dim=-1).cpu()


def reference_greedy(
    path: Path,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    adapter: Path | None = None,
    device: str = "cpu",
) -> list[list[int]]:
    """transformers ``generate(do_sample=False)`` in fp32 on ``device``, one prompt at a
    time, EOS ignored; with ``adapter``, on peft's ``merge_and_unload`` of it."""
    import torch

    model = reference_model(path, adapter, device=device)
    out = []
    with torch.inference_mode():
        for ids in prompts:
            gen = model.generate(
                torch.tensor([ids], device=device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
            )
            out.append(gen[0, len(ids) :].tolist())
    return out
