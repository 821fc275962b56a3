"""``openllm-clone check``: does the server compute what the model computes?

Loads MODEL twice in float32, once through the runner the server would pick (or the
one named with ``--runner``) and once as a plain transformers model, and compares
greedy tokens for a few prompts: the engine's (alone, then all prompts in one batch)
against ``generate(do_sample=False)``. Prints one line per prompt and exits 1 on any
difference, so a user can see for themselves that their model is served exactly.
"""

from __future__ import annotations

import asyncio
from typing import Any

import typer

from openllm_clone.errors import OpenLLMCloneError

from ._common import console, fail, out

app = typer.Typer()

_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, there was",
    "The three primary colours are",
]


@app.command("check")
def check(
    model: str = typer.Argument("smollm2", help="Model store tag or local Hugging Face folder."),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="Prompt to compare (repeatable)."),
    max_new_tokens: int = typer.Option(24, min=1, max=512, help="Tokens generated per prompt."),
    runner: str = typer.Option("auto", help="auto, fast or generic."),
) -> None:
    """Compare the server's greedy fp32 output on MODEL with transformers' generate."""
    from openllm_clone.settings import Settings

    try:
        settings = Settings(
            model=model,
            dtype="float32",
            device="cpu",
            runner=runner,  # type: ignore[arg-type]
            kv_cache_mb=256,
            max_batch_size=max(4, len(prompt)),
        )
    except ValueError as exc:
        fail(str(exc), 2)
    try:
        results, tier = asyncio.run(_compare(settings, prompt or _PROMPTS, max_new_tokens))
    except OpenLLMCloneError as exc:
        fail(exc.message)
    bad = 0
    for text, want, alone, batched in results:
        same = alone == want and batched == want
        bad += not same
        where = (
            ""
            if same
            else f" (first difference at token {_first_difference(want, alone, batched)})"
        )
        out.print(f"{'same' if same else 'DIFFERENT'}: {text!r}{where}", soft_wrap=True)
    console.print(
        f"{len(results) - bad} of {len(results)} prompts equal transformers' generate "
        f"on the {tier} runner ({max_new_tokens} tokens, float32, greedy)"
    )
    if bad:
        raise typer.Exit(1)


def _first_difference(want: list[int], *got: list[int]) -> int:
    for i, token in enumerate(want):
        if any(i >= len(g) or g[i] != token for g in got):
            return i
    return len(want)


async def _compare(settings: Any, prompts: list[str], n: int) -> tuple[list[Any], str]:
    import torch
    from transformers import AutoModelForCausalLM

    from openllm_clone.llm import LLM
    from openllm_clone.protocol import SamplingParams
    from openllm_clone.store import resolve_model

    path = resolve_model(settings.model).path
    llm = LLM.from_settings(settings)
    try:
        await llm.start()
        ids = [llm.tokenize(p) for p in prompts]
        params = SamplingParams(max_new_tokens=n, ignore_eos=True)
        alone = [(await llm.complete(x, params)).token_ids[0] for x in ids]
        batched = [
            c.token_ids[0] for c in await asyncio.gather(*(llm.complete(x, params) for x in ids))
        ]
        tier = str(llm.info.extra.get("runner"))
    finally:
        llm.shutdown()
    reference = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    want = []
    with torch.inference_mode():
        for x in ids:
            gen = reference.generate(
                torch.tensor([x]),
                max_new_tokens=n,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                attention_mask=torch.ones(1, len(x), dtype=torch.long),
            )
            want.append(gen[0, len(x) :].tolist())
    return list(zip(prompts, want, alone, batched, strict=True)), tier
