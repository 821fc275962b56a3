"""Cost of constrained decoding: time per token with and without a JSON-schema grammar.

Same prompts, same engine, one run: unconstrained greedy decoding against decoding
constrained by a JSON schema (xgrammar token masks, per row), at batch 1 and 16.

    python bench/structured.py
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import QUESTIONS, table  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "topic": {"type": "string"},
        "summary": {"type": "string"},
        "facts": {"type": "array", "items": {"type": "string"}},
        "confidence": {"type": "number"},
    },
    "required": ["topic", "summary", "facts", "confidence"],
}


async def per_token(llm, prompts, constraint, new_tokens: int, repeats: int = 3) -> float:
    from openllm_clone.protocol import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        results = await asyncio.gather(
            *(llm.complete(p, params, constraint=constraint) for p in prompts)
        )
        elapsed = time.perf_counter() - t
        tokens = max(len(r.token_ids[0]) for r in results)  # steps taken
        times.append(elapsed / tokens)
    return statistics.median(times)


def main() -> None:
    from openllm_clone.llm import LLM
    from openllm_clone.settings import Settings

    llm = LLM.from_settings(Settings(dtype="bfloat16", max_batch_size=16))
    constraint = llm.constraint_for({"type": "json_schema", "json_schema": {"schema": SCHEMA}})
    rows = []
    for batch in (1, 16):
        prompts = [
            llm.tokenize(llm.chat_prompt_text(q + " Reply as JSON."))
            for q in (QUESTIONS * 2)[:batch]
        ]
        asyncio.run(per_token(llm, prompts[:1], constraint, 8, 1))  # warm-up
        free = asyncio.run(per_token(llm, prompts, None, 64))
        constrained = asyncio.run(per_token(llm, prompts, constraint, 64))
        rows.append([batch, free * 1000, constrained * 1000, f"{constrained / free:.2f}x"])
    print("\nSmolLM2 bf16, 64 new tokens, time per decode step (medians of 3)")
    print(table(["batch", "unconstrained ms/token", "JSON schema ms/token", "ratio"], rows))
    llm.shutdown()


if __name__ == "__main__":
    main()
