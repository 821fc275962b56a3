"""Serving benchmark: the real HTTP server against HF transformers (and CTranslate2).

Drives ``openllm-clone start`` over HTTP like vLLM's serving benchmark (seeded
prompts and output lengths, concurrency sweep, streaming), and runs the baselines in
the same run on the same weights and dtype:

- HF ``generate`` one request at a time (batch-1 decode tok/s);
- HF static padded batch (all prompts padded together, run to the longest output);
- CTranslate2 int8, when ``ctranslate2`` is installed.

Prints one table with ratios to the baselines, the KV memory that 64 short
concurrent requests took against reserving the maximum length for each, and writes
``bench/out/serving.png`` when matplotlib is installed.

    python bench/serving.py                       # SmolLM2, bf16, --compile
    python bench/serving.py --no-compile          # the eager decode step
    python bench/serving.py --dtype float32 --concurrency 1,4,16,32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import median, pct, rss_peak_mb, table, workload  # noqa: E402
from openllm_clone.testing import run_server  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


# --- the server side -----------------------------------------------------------------


async def one_request(
    client: httpx.AsyncClient,
    url: str,
    prompt: str,
    max_tokens: int,
    adapter: str | None = None,
    system: str | None = None,
    logprobs: int | None = None,
) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    body: dict[str, Any] = {
        "model": adapter or "",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    if logprobs is not None:
        body.update(logprobs=True, top_logprobs=logprobs)
    start = time.perf_counter()
    stamps: list[float] = []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices"):
                stamps.append(time.perf_counter())
    end = time.perf_counter()
    return {"start": start, "end": end, "stamps": stamps, "tokens": max_tokens}


async def run_load(
    url: str,
    requests: list[tuple[str, int]],
    concurrency: int,
    adapters: list[str] | None = None,
    systems: list[str] | None = None,
    logprobs: int | None = None,
) -> dict[str, float]:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def go(i: int, prompt: str, n: int) -> dict[str, Any]:
            async with sem:
                adapter = adapters[i % len(adapters)] if adapters else None
                system = systems[i % len(systems)] if systems else None
                return await one_request(client, url, prompt, n, adapter, system, logprobs)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(go(i, p, n) for i, (p, n) in enumerate(requests)))
        wall = time.perf_counter() - t0
    ttft = [r["stamps"][0] - r["start"] for r in results if r["stamps"]]
    tpot = [
        (r["stamps"][-1] - r["stamps"][0]) / max(1, len(r["stamps"]) - 1)
        for r in results
        if len(r["stamps"]) > 1
    ]
    tokens = sum(r["tokens"] for r in results)
    return {
        "throughput": tokens / wall,
        "wall": wall,
        "ttft_p50": pct(ttft, 50),
        "ttft_p99": pct(ttft, 99),
        "tpot_med": median(tpot),
        "decode_tok_s": 1 / median(tpot) if tpot else float("nan"),
    }


SYSTEM_TOKENS = 400


def system_prompt(seed: int) -> str:
    """A ~400-token system prompt; different seeds share no leading block."""
    import random

    rng = random.Random(seed)
    words = [
        "policy",
        "customer",
        "answer",
        "briefly",
        "order",
        "refund",
        "shipping",
        "account",
        "polite",
        "escalate",
        "invoice",
        "product",
        "warranty",
        "delivery",
        "support",
        "team",
    ]
    body = " ".join(rng.choice(words) for _ in range(SYSTEM_TOKENS - 20))
    return f"Agent {seed}: you are the support assistant of shop number {seed}. Rules: {body}."


# --- baselines -------------------------------------------------------------------------


def hf_baselines(
    model_dir: str, dtype: str, prompts: list[str], new_tokens: int, batch: int, sequential: int
) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_grad_enabled(False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    chats = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]

    def gen(texts: list[str], n: int) -> float:
        enc = tok(texts, return_tensors="pt", padding=True)
        t = time.perf_counter()
        model.generate(
            **enc,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=tok.eos_token_id,
        )
        return time.perf_counter() - t

    gen(chats[:1], 4)  # warm-up
    seq_times = []
    for text in chats[:sequential]:
        t1 = gen([text], 1)
        tn = gen([text], new_tokens)
        seq_times.append((tn, (new_tokens - 1) / max(tn - t1, 1e-9)))
    out = {
        "hf_seq_decode_tok_s": median([d for _, d in seq_times]),
        "hf_seq_throughput": new_tokens / median([t for t, _ in seq_times]),
    }
    t = gen(chats[:batch], new_tokens)
    out["hf_static_throughput"] = batch * new_tokens / t
    return out


def hf_static_mixed(
    model_dir: str, dtype: str, requests: list[tuple[str, int]], batch: int
) -> float:
    """Static batching with mixed output lengths: each batch runs to its longest output."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    useful = 0
    t = time.perf_counter()
    for i in range(0, len(requests), batch):
        chunk = requests[i : i + batch]
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p, _ in chunk
        ]
        longest = max(n for _, n in chunk)
        enc = tok(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            model.generate(
                **enc,
                max_new_tokens=longest,
                min_new_tokens=longest,
                do_sample=False,
                pad_token_id=tok.eos_token_id,
            )
        useful += sum(n for _, n in chunk)
    return useful / (time.perf_counter() - t)


def ct2_baseline(
    model_dir: str, prompts: list[str], new_tokens: int, batch: int
) -> dict[str, float]:
    try:
        import ctranslate2
    except ImportError:
        return {}
    import subprocess
    import tempfile

    from transformers import AutoTokenizer

    out_dir = Path(tempfile.mkdtemp()) / "ct2"
    # The converter sits next to this interpreter (a venv's bin/ need not be on PATH).
    converter = Path(sys.executable).parent / "ct2-transformers-converter"
    subprocess.run(
        [
            str(converter) if converter.exists() else "ct2-transformers-converter",
            "--model",
            model_dir,
            "--output_dir",
            str(out_dir),
            "--quantization",
            "int8",
        ],
        check=True,
        capture_output=True,
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    gen = ctranslate2.Generator(
        str(out_dir), device="cpu", compute_type="int8", intra_threads=os.cpu_count() or 2
    )
    toks = [
        tok.convert_ids_to_tokens(
            tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)[
                "input_ids"
            ]
        )
        for p in prompts
    ]
    kw = {
        "max_length": new_tokens,
        "min_length": new_tokens,
        "include_prompt_in_result": False,
        "sampling_topk": 1,
    }
    gen.generate_batch(toks[:1], max_length=4, include_prompt_in_result=False)
    t = time.perf_counter()
    gen.generate_batch(toks[:1], **kw)
    one = time.perf_counter() - t
    t = time.perf_counter()
    gen.generate_batch(toks[:batch], **kw)
    many = time.perf_counter() - t
    return {"ct2_b1_tok_s": new_tokens / one, "ct2_batch_throughput": batch * new_tokens / many}


# --- main ------------------------------------------------------------------------------


def logprobs_row(
    url: str, requests: list[tuple[str, int]], concurrency: int, rounds: int = 3
) -> dict[str, float]:
    """The same batch with and without ``top_logprobs=5``, alternating rounds (this machine's
    speed drifts between runs); prints the ratio of the medians."""
    plain, with_lp = [], []
    asyncio.run(run_load(url, requests[:2], 2, logprobs=5))  # warm-up
    for _ in range(rounds):
        plain.append(asyncio.run(run_load(url, requests, concurrency))["throughput"])
        with_lp.append(asyncio.run(run_load(url, requests, concurrency, logprobs=5))["throughput"])
    a, b = median(plain), median(with_lp)
    print(
        f"logprobs: {concurrency} concurrent, top_logprobs=5: {b:.0f} tok/s vs {a:.0f} tok/s "
        f"without (medians of {rounds} alternating rounds): {b / a:.2f}x "
        f"(rounds: {', '.join(f'{x:.0f}' for x in plain)} / {', '.join(f'{x:.0f}' for x in with_lp)})"
    )
    return {"plain": a, "logprobs5": b, "ratio": b / a}


async def embed_load(
    url: str, texts: list[str], concurrency: int, stop: asyncio.Event | None = None
) -> dict[str, float]:
    """``concurrency`` clients each sending one text at a time to /v1/embeddings, through
    ``texts`` (or, with ``stop``, round and round until it is set); inputs per second."""
    limits = httpx.Limits(max_connections=concurrency + 4)
    done = 0
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def worker(k: int) -> None:
            nonlocal done
            i = k
            while (stop is None and i < len(texts)) or (stop is not None and not stop.is_set()):
                body = {"model": "", "input": texts[i % len(texts)]}
                r = await client.post(f"{url}/v1/embeddings", json=body)
                r.raise_for_status()
                done += 1
                i += concurrency

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"inputs_per_s": done / wall, "inputs": done}


def embeddings_row(url: str, requests: list[tuple[str, int]], concurrency: int) -> dict[str, Any]:
    """Embeddings at ``concurrency`` alone (inputs/s), generation alone, then both at once
    (generation's tok/s beside embeddings over its tok/s alone: same run, same server)."""
    texts = [p for p, _ in requests] * 4
    alone = asyncio.run(embed_load(url, texts, concurrency))
    gen_alone = asyncio.run(run_load(url, requests, concurrency))

    async def both() -> tuple[dict[str, float], dict[str, float]]:
        stop = asyncio.Event()
        embedding = asyncio.create_task(embed_load(url, texts, concurrency, stop))
        generation = await run_load(url, requests, concurrency)
        stop.set()
        return generation, await embedding

    gen_beside, emb_beside = asyncio.run(both())
    out = {
        "embed_inputs_per_s": alone["inputs_per_s"],
        "gen_alone_tok_s": gen_alone["throughput"],
        "gen_beside_tok_s": gen_beside["throughput"],
        "embed_beside_inputs_per_s": emb_beside["inputs_per_s"],
    }
    print(
        table(
            ["embeddings row", "value"],
            [
                [f"embeddings alone, {concurrency} concurrent (inputs/s)", alone["inputs_per_s"]],
                [f"generation alone, {concurrency} streams (tok/s)", gen_alone["throughput"]],
                [
                    f"generation beside {concurrency} embedding clients (tok/s)",
                    gen_beside["throughput"],
                ],
                ["embeddings meanwhile (inputs/s)", emb_beside["inputs_per_s"]],
                [
                    "generation beside embeddings / alone",
                    f"{gen_beside['throughput'] / gen_alone['throughput']:.2f}x",
                ],
            ],
        )
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--sequential", type=int, default=3, help="HF one-at-a-time requests to time")
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument(
        "--compile",
        default="on",
        choices=["auto", "on", "off"],
        help="the server's --compile (on: compiled before the first request)",
    )
    ap.add_argument(
        "--no-compile",
        dest="compile",
        action="store_const",
        const="off",
        help="the eager decode step (--compile off)",
    )
    ap.add_argument(
        "--logprobs-only",
        action="store_true",
        help="only the logprobs row: batch-wide requests with and without top_logprobs=5",
    )
    ap.add_argument(
        "--embeddings-only",
        action="store_true",
        help="only the embeddings row: /v1/embeddings at --batch concurrent, alone and beside "
        "as many generation streams",
    )
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)

    from openllm_clone.store import resolve_model

    model_dir = str(resolve_model(args.model).path)
    levels = [int(c) for c in args.concurrency.split(",")]
    fixed = workload(
        max(args.batch, max(levels)), seed=0, out_min=args.new_tokens, out_max=args.new_tokens
    )
    mixed = workload(args.batch * 2, seed=1, out_min=16, out_max=256)

    rows: list[list[object]] = []
    server_results: dict[str, Any] = {}
    log = OUT / "serving-server.log"
    serve_args = [args.model, "--dtype", args.dtype, "--max-batch-size", str(max(64, args.batch))]
    serve_args += ["--compile", args.compile]
    # Compiling the decode step takes minutes on 2 cores the first time.
    with run_server(serve_args, {}, log, ready_timeout=900) as server:
        url = server.url
        if args.logprobs_only:
            logprobs_row(url, fixed[: args.batch], args.batch)
            return
        if args.embeddings_only:
            embeddings_row(url, fixed[: args.batch], args.batch)
            return
        # KV memory first, while the block peak is fresh: 64 short requests at once.
        short = workload(64, seed=2, out_min=32, out_max=32)
        asyncio.run(run_load(url, short, 64))
        meta = httpx.get(f"{url}/v1/metadata", timeout=30).json()
        eng = meta["engine"]
        kv_used = eng["kv_blocks_peak"] * eng["block_size"] * eng["kv_bytes_per_token"]
        kv_reserved = 64 * meta["max_model_len"] * eng["kv_bytes_per_token"]
        asyncio.run(run_load(url, fixed[:2], 2))  # warm-up
        for c in levels:
            n = max(c, min(len(fixed), 2 * c)) if c > 1 else 2
            server_results[f"c{c}"] = asyncio.run(run_load(url, fixed[:n], c))
        server_results["mixed"] = asyncio.run(run_load(url, mixed, args.batch))
        # Automatic prefix caching: 16 questions after one long system prompt, against
        # 16 after system prompts of the same length that share nothing.
        questions = [(p, 16) for p, _ in workload(16, seed=3, out_min=16, out_max=16)]
        shared = [system_prompt(0)]
        distinct = [system_prompt(i + 1) for i in range(len(questions))]
        before = httpx.get(f"{url}/v1/metadata", timeout=30).json()["engine"]
        server_results["prefix_shared"] = asyncio.run(run_load(url, questions, 4, systems=shared))
        after = httpx.get(f"{url}/v1/metadata", timeout=30).json()["engine"]
        server_results["prefix_distinct"] = asyncio.run(
            run_load(url, questions, 4, systems=distinct)
        )
        server_results["prefix_hit_blocks"] = (
            after["prefix_cache_hits"] - before["prefix_cache_hits"]
        )
        server_results["logprobs"] = logprobs_row(url, fixed[: args.batch], args.batch)
        server_results["embeddings"] = embeddings_row(url, fixed[: args.batch], args.batch)
        peak_rss = rss_peak_mb(server.proc.pid)

    base: dict[str, float] = {}
    if not args.skip_baselines:
        prompts = [p for p, _ in fixed]
        base.update(
            hf_baselines(
                model_dir, args.dtype, prompts, args.new_tokens, args.batch, args.sequential
            )
        )
        base["hf_static_mixed"] = hf_static_mixed(model_dir, args.dtype, mixed, args.batch)
        base.update(ct2_baseline(model_dir, prompts, args.new_tokens, args.batch))

    def ratio(x: float, key: str) -> str:
        return f"{x / base[key]:.2f}x" if key in base and base[key] else "-"

    for c in levels:
        r = server_results[f"c{c}"]
        rows.append(
            [
                f"openllm-clone, {c} concurrent",
                r["throughput"],
                r["decode_tok_s"],
                r["ttft_p50"] * 1000,
                r["ttft_p99"] * 1000,
                r["tpot_med"] * 1000,
                ratio(r["decode_tok_s"], "hf_seq_decode_tok_s")
                if c == 1
                else ratio(r["throughput"], "hf_static_throughput"),
                ratio(r["throughput"], "ct2_batch_throughput") if c == args.batch else "-",
            ]
        )
    m = server_results["mixed"]
    rows.append(
        [
            f"openllm-clone, mixed 16-256, {args.batch} concurrent",
            m["throughput"],
            m["decode_tok_s"],
            m["ttft_p50"] * 1000,
            m["ttft_p99"] * 1000,
            m["tpot_med"] * 1000,
            ratio(m["throughput"], "hf_static_mixed"),
            "-",
        ]
    )
    for key, label in [
        ("hf_seq_decode_tok_s", "HF generate, one at a time (decode tok/s)"),
        ("hf_static_throughput", f"HF static padded batch {args.batch}"),
        ("hf_static_mixed", f"HF static batch {args.batch}, mixed 16-256"),
        ("ct2_b1_tok_s", "CTranslate2 int8, batch 1"),
        ("ct2_batch_throughput", f"CTranslate2 int8, batch {args.batch}"),
    ]:
        if key in base:
            rows.append([label, base[key], "", "", "", "", "baseline", ""])
    print(
        f"\nmodel {args.model}, dtype {args.dtype}, {args.new_tokens} new tokens, greedy, "
        f"{os.cpu_count()} cores, --compile {args.compile}"
    )
    print(
        table(
            [
                "system",
                "tok/s",
                "decode tok/s (1 stream)",
                "TTFT p50 ms",
                "TTFT p99 ms",
                "TPOT ms",
                "vs HF",
                "vs CT2",
            ],
            rows,
        )
    )
    print(
        f"\nKV cache for 64 concurrent short requests: {kv_used / 2**20:.1f} MiB used at peak vs "
        f"{kv_reserved / 2**20:.0f} MiB reserving max length ({meta['max_model_len']}) for each: "
        f"{kv_used / kv_reserved:.3f}x"
    )
    ps, pd = server_results["prefix_shared"], server_results["prefix_distinct"]
    print(
        f"prefix caching, 16 questions 4 at a time after a ~{SYSTEM_TOKENS}-token system prompt: "
        f"TTFT p50 {ps['ttft_p50'] * 1000:.0f} ms shared vs {pd['ttft_p50'] * 1000:.0f} ms with "
        f"distinct system prompts ({pd['ttft_p50'] / ps['ttft_p50']:.2f}x); throughput "
        f"{ps['throughput']:.0f} vs {pd['throughput']:.0f} tok/s; "
        f"{server_results['prefix_hit_blocks']} KV blocks reused"
    )
    print(f"server peak RSS: {peak_rss:.0f} MiB")
    (OUT / "serving.json").write_text(
        json.dumps(
            {
                "server": server_results,
                "baselines": base,
                "kv_used": kv_used,
                "kv_reserved": kv_reserved,
            },
            indent=2,
        )
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.plot(
            levels,
            [server_results[f"c{c}"]["throughput"] for c in levels],
            "o-",
            label="openllm-clone",
        )
        if "hf_static_throughput" in base:
            plt.axhline(base["hf_static_throughput"], ls="--", label="HF static batch")
        plt.xlabel("concurrent requests")
        plt.ylabel("tokens/s")
        plt.legend()
        plt.savefig(OUT / "serving.png", dpi=100)
        print(f"plot: {OUT / 'serving.png'}")
    except ImportError:
        print("(matplotlib not installed: no plot)")


if __name__ == "__main__":
    main()
