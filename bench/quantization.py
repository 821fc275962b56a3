"""Quantization benchmark on SmolLM2: bytes, load time, speed and perplexity per mode.

For bf16 and every quantization that runs here (bitsandbytes int8/nf4/fp4 at load
time, torchao int8 weight-only, and checkpoints made by `openllm-clone quantize` with
the built-in calibration texts, timed: GPTQ 4-bit and 8-bit, calibrated nf4/fp4), in
one run: real weight bytes, load time, decode tokens/s at batch 1 and aggregate
tokens/s at batch 16 (engine in-process, warm-up, then the median of repeats), and
perplexity on a fixed built-in text, with ratios to bf16. Two more short texts
(different topics and registers) show how much one ~150-token text moves the figure,
and a larger held-out set gives the steadier figure: the long descriptions of 20
installed packages (technical prose, the first 512 tokens of each, ~10k tokens; it
moves with their versions, so compare within one run).

    python bench/quantization.py [--modes bf16,int8,nf4,fp4,torchao-int8,gptq4,gptq8,nf4-cal,fp4-cal]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import QUESTIONS, table  # noqa: E402

TEXT = (
    "The water cycle describes how water moves between the oceans, the air and the land. "
    "Heat from the sun evaporates water from seas and lakes; the vapour rises, cools and "
    "condenses into clouds. When droplets grow heavy enough they fall as rain or snow. "
    "Some of that water runs off into rivers and back to the sea, some soaks into the "
    "ground and feeds springs and wells, and some is taken up by plants, which release it "
    "again through their leaves. Over thousands of years the same water has passed through "
    "this cycle countless times, shaping valleys, carrying minerals and sustaining life. "
    "Scientists study the cycle to forecast weather, manage water supplies and understand "
    "how a warming climate changes droughts and floods around the world."
)
OTHER_TEXTS = (
    "My grandfather kept bees behind the orchard. Every spring he would open the hives, "
    "check the frames for eggs and honey, and talk quietly to the bees as he worked. He said "
    "they could tell when someone was nervous. In late summer we helped him carry the heavy "
    "frames to the shed, where the honey was spun out in a big metal drum and poured into jars. "
    "The kitchen smelled of wax for days, and neighbours came by to trade eggs and vegetables "
    "for a jar or two.",
    "To install the package, create a virtual environment and run pip install with the "
    "name of the project. The command line tool reads its settings from a file in your home "
    "directory; every option can also be given as a flag. If the server does not start, check "
    "that the port is free and that the model files are readable, then look at the log for the "
    "first error. Most problems come from an old version of a dependency, so upgrade it first.",
)


HELDOUT_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "bentoml",
    "fastapi",
    "pydantic",
    "typer",
    "rich",
    "accelerate",
    "tokenizers",
    "openai",
    "torchao",
    "optimum",
    "uvicorn",
    "huggingface-hub",
    "tqdm",
    "regex",
    "fsspec",
    "sympy",
    "attrs",
)


@functools.cache
def heldout_texts() -> tuple[str, ...]:
    """Prose from installed packages' long descriptions (code blocks, markup, links,
    tables and short lines dropped); none of it is calibration data."""
    import importlib.metadata as md
    import re

    out = []
    for name in HELDOUT_PACKAGES:
        try:
            meta = md.metadata(name)
        except md.PackageNotFoundError:
            continue
        body = meta.get_payload() or meta.get("Description") or ""
        body = re.sub(r"```.*?```", "", str(body), flags=re.S)
        body = re.sub(r"<[^>]+>|\[!\[.*?\)\]\(.*?\)|!\[.*?\]\(.*?\)|https?://\S+", "", body)
        lines = [
            line
            for line in body.splitlines()
            if len(line.split()) > 6 and not line.startswith(("|", "    ", "#", ">>>", "$"))
        ]
        text = " ".join(lines)
        if len(text) > 2500:
            out.append(text[:4000])
    return tuple(out)


def perplexity(model_dir: str, mode: str, dtype: str) -> list[float]:
    """Perplexity of TEXT, of each of OTHER_TEXTS, then of the held-out set (token-weighted)."""
    import torch
    from openllm_clone.runners.loader import pick_device
    from openllm_clone.runners.quantization import dispatch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device("cpu")
    kwargs: dict = {"dtype": getattr(torch, dtype)}
    if _prequantized(mode):  # model_dir is the quantized checkpoint
        kwargs["device_map"] = "cpu"
    elif mode != "bf16":
        from transformers import AutoConfig

        spec = dispatch(
            mode, dtype=kwargs["dtype"], device=device, config=AutoConfig.from_pretrained(model_dir)
        )
        assert spec is not None
        kwargs.update(spec.load_kwargs, quantization_config=spec.quantization_config)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()
    out = []
    for text in (TEXT, *OTHER_TEXTS):
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out.append(math.exp(model(ids, labels=ids).loss.float().item()))
    total, count = 0.0, 0
    for text in heldout_texts():
        ids = tok(text, return_tensors="pt")["input_ids"][:, :512]
        with torch.no_grad():
            total += model(ids, labels=ids).loss.float().item() * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    out.append(math.exp(total / count))
    return out


def _prequantized(mode: str) -> bool:
    return mode.startswith("gptq") or mode.endswith("-cal")


async def speed(llm, batch: int, new_tokens: int, repeats: int) -> float:
    from openllm_clone.protocol import SamplingParams

    prompts = [llm.tokenize(q) for q in (QUESTIONS * 2)[:batch]]
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    await asyncio.gather(
        *(llm.complete(p, params.model_copy(update={"max_new_tokens": 4})) for p in prompts)
    )
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        await asyncio.gather(*(llm.complete(p, params) for p in prompts))
        rates.append(batch * new_tokens / (time.perf_counter() - t))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--modes", default="bf16,int8,nf4,fp4,torchao-int8,gptq4,gptq8,nf4-cal,fp4-cal")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from openllm_clone.errors import OpenLLMCloneError
    from openllm_clone.llm import LLM
    from openllm_clone.settings import Settings
    from openllm_clone.store import resolve_model

    model_dir = str(resolve_model(args.model).path)
    results = {}
    for mode in args.modes.split(","):
        quantize = None if mode == "bf16" else mode
        model, mode_dir, made = args.model, model_dir, None
        try:
            if _prequantized(mode):
                from openllm_clone.store import quantize_model

                t = time.perf_counter()
                if mode.startswith("gptq"):
                    model = quantize_model(
                        args.model, bits=int(mode[4:] or 4), name=f"bench-{mode}"
                    )
                else:
                    model = quantize_model(
                        args.model, method=mode.removesuffix("-cal"), name=f"bench-{mode}"
                    )
                made = time.perf_counter() - t
                mode_dir, quantize = str(resolve_model(model).path), None
            t = time.perf_counter()
            llm = LLM.from_settings(
                Settings(
                    model=model,
                    dtype="bfloat16",
                    device=args.device,
                    quantize=quantize,
                    max_batch_size=16,
                )
            )
            load = time.perf_counter() - t
        except OpenLLMCloneError as exc:
            print(f"{mode}: skipped ({exc})")
            continue
        b1 = asyncio.run(speed(llm, 1, args.new_tokens, args.repeats))
        b16 = asyncio.run(speed(llm, 16, args.new_tokens, args.repeats))
        weight_bytes = llm.runner.info.weight_bytes
        embed = llm.runner.embed.weight
        embed_bytes = embed.numel() * embed.element_size()
        llm.shutdown()
        results[mode] = {
            "bytes": weight_bytes,
            "embed": embed_bytes,
            "load": load,
            "b1": b1,
            "b16": b16,
            "ppl": perplexity(mode_dir, mode, "bfloat16"),
        }
        if made is not None:
            print(
                f"{mode}: quantized in {made:.0f} s (openllm-clone quantize, builtin calibration)"
            )
    base = results.get("bf16")
    rows = []
    for mode, r in results.items():
        rows.append(
            [
                mode,
                f"{r['bytes'] / 2**20:.0f} MiB",
                f"{r['bytes'] / base['bytes']:.2f}x" if base else "-",
                f"{(r['bytes'] - r['embed']) / (base['bytes'] - base['embed']):.2f}x"
                if base
                else "-",
                f"{r['load']:.1f} s",
                r["b1"],
                r["b16"],
                r["ppl"][0],
                f"{100 * (r['ppl'][0] / base['ppl'][0] - 1):+.1f}%" if base else "-",
                " / ".join(
                    f"{100 * (p / b - 1):+.1f}%" for p, b in zip(r["ppl"][1:3], base["ppl"][1:3])
                )
                if base
                else "-",
                f"{100 * (r['ppl'][3] / base['ppl'][3] - 1):+.1f}%" if base else "-",
            ]
        )
    print(
        f"\nmodel {args.model} on {args.device}; {args.new_tokens} new tokens, greedy; medians of {args.repeats}"
    )
    print(
        table(
            [
                "mode",
                "weights",
                "vs bf16",
                "vs bf16 w/o tied embedding",
                "load",
                "tok/s b=1",
                "tok/s b=16",
                "perplexity",
                "ppl vs bf16",
                "2 short texts vs bf16",
                "held-out set vs bf16",
            ],
            rows,
        )
    )
    docs = heldout_texts()
    print(f"held-out set: {len(docs)} package descriptions, the first 512 tokens of each")
    if base:
        print(
            f"(the tied embedding / lm_head, {base['embed'] / 2**20:.0f} MiB in bf16, stays unquantized)"
        )


if __name__ == "__main__":
    main()
