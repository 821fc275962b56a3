"""Fair scheduling across tenants: a flood from one tenant against one request a second
from another, under FIFO and under fair admission, against the real server.

Tenant A keeps ``--flood`` long requests in flight (each of its clients sends the next
as soon as one ends); tenant B sends one short request per second. Printed per mode:
B's time to first token with A idle and with A flooding (p50, p99, pooled over the
rounds), and the aggregate tokens/s streamed during the flood (median of the rounds), with
the ratios the issue asks for (B's loaded p99 over its idle p99; fair's aggregate
throughput, both tenants' tokens, over FIFO's, and each fair round's over the fifo round
before it). Each round starts a server per mode, alternating fifo and fair.

    python bench/fairness.py                        # SmolLM2, float32, 64 x 128 tokens
    python bench/fairness.py --dtype bfloat16 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import median, pct, table  # noqa: E402
from openllm_clone.tenants import KeyEntry, hash_key, new_key, save_keys  # noqa: E402
from openllm_clone.testing import run_server  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


async def stream_one(
    client: httpx.AsyncClient, key: str, prompt: str, max_tokens: int, counter: list[int]
) -> float | None:
    """One streamed completion; returns its time to first token, counts its tokens."""
    body = {
        "model": "",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    start = time.perf_counter()
    first = None
    async with client.stream(
        "POST", "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as r:
        if r.status_code != 200:
            await r.aread()
            raise RuntimeError(f"{r.status_code}: {r.text}")
        async for line in r.aiter_lines():
            if line.startswith("data: {") and json.loads(line[6:]).get("choices"):
                if first is None:
                    first = time.perf_counter() - start
                counter[0] += 1
    return first


async def b_arrivals(
    url: str, key: str, seconds: float, max_tokens: int, counter: list[int] | None = None
) -> list[float]:
    """One short request a second for ``seconds``; their TTFTs (their tokens are added to
    ``counter``)."""
    counter = [0] if counter is None else counter
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        tasks = []
        t0 = time.perf_counter()
        i = 0
        while time.perf_counter() - t0 < seconds:
            prompt = f"Question {i}: name a colour of the rainbow."
            tasks.append(asyncio.create_task(stream_one(client, key, prompt, max_tokens, counter)))
            i += 1
            await asyncio.sleep(max(0.0, t0 + i - time.perf_counter()))
        return [t for t in await asyncio.gather(*tasks) if t is not None]


async def flood_and_b(
    url: str, keys: dict[str, str], args: argparse.Namespace
) -> tuple[list[float], float]:
    """A keeps ``args.flood`` long requests in flight while B arrives once a second."""
    counter = [0]
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=args.flood + 8)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:

        async def a_client(j: int) -> None:
            n = 0
            while not stop.is_set():
                prompt = f"Story {j}.{n}: write a long tale about a lighthouse keeper."
                await stream_one(client, keys["a"], prompt, args.long_tokens, counter)
                n += 1

        flood = [asyncio.create_task(a_client(j)) for j in range(args.flood)]
        await asyncio.sleep(args.warmup)  # the queue fills and the batch runs full
        start_tokens, t0 = counter[0], time.perf_counter()
        # Aggregate throughput: A's tokens and B's (B's rows take batch slots from A).
        if args.without_b:  # A's flood alone: what scheduling costs it by itself
            ttfts: list[float] = []
            await asyncio.sleep(args.duration)
        else:
            ttfts = await b_arrivals(url, keys["b"], args.duration, args.short_tokens, counter)
        rate = (counter[0] - start_tokens) / (time.perf_counter() - t0)
        stop.set()
        for task in flood:
            task.cancel()
        await asyncio.gather(*flood, return_exceptions=True)
    return ttfts, rate


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--flood", type=int, default=64, help="A's requests kept in flight")
    ap.add_argument("--long-tokens", type=int, default=128)
    ap.add_argument("--short-tokens", type=int, default=8)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of B arrivals")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of B alone")
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="alternating fifo/fair rounds")
    ap.add_argument(
        "--without-b",
        action="store_true",
        help="A's flood alone, no B (throughput only: the TTFT columns print nan)",
    )
    ap.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=None,
        help="the server's prompt tokens per step (default: the server's for each mode, "
        "512 fifo, 64 fair)",
    )
    ap.add_argument(
        "--step-stages",
        type=int,
        default=None,
        help="the server's compiled step stages (default: the server's for each mode, "
        "1 fifo, 4 fair)",
    )
    ap.add_argument(
        "--compile",
        default="off",
        choices=["off", "on"],
        help="off: the eager step; on: the compiled step, compiled (or loaded from the "
        "compile cache) before the first round (never auto: no background compile mid-run)",
    )
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)

    keys: dict[str, str] = {}
    entries = []
    for tenant in ("a", "b"):
        key_id, keys[tenant] = new_key()
        entries.append(KeyEntry(tenant=tenant, key_id=key_id, key_hash=hash_key(keys[tenant])))
    keys_file = Path(tempfile.mkdtemp()) / "keys.toml"
    save_keys(str(keys_file), entries)

    results: dict[str, dict[str, Any]] = {
        m: {"idle": [], "loaded": [], "rates": []} for m in ("fifo", "fair")
    }
    # Alternating rounds (fifo, fair, fifo, fair...): this machine's speed drifts by 20 %
    # from minute to minute; TTFTs pool over the rounds, throughput is their median.
    for mode in [m for _ in range(args.rounds) for m in ("fifo", "fair")]:
        serve_args = [
            args.model,
            "--dtype",
            args.dtype,
            "--compile",
            args.compile,
            "--max-batch-size",
            str(args.max_batch_size),
            "--max-queue",
            str(args.flood * 2),
            "--keys-file",
            str(keys_file),
            "--scheduling",
            mode,
        ]
        if args.max_prefill_tokens is not None:
            serve_args += ["--max-prefill-tokens", str(args.max_prefill_tokens)]
        if args.step_stages is not None:
            serve_args += ["--step-stages", str(args.step_stages)]
        log = OUT / f"fairness-{mode}.log"
        with run_server(serve_args, {}, log, ready_timeout=900) as server:
            asyncio.run(b_arrivals(server.url, keys["b"], 2, args.short_tokens))  # warm-up
            idle = (
                []
                if args.without_b
                else asyncio.run(b_arrivals(server.url, keys["b"], args.idle, args.short_tokens))
            )
            loaded, rate = asyncio.run(flood_and_b(server.url, keys, args))
        results[mode]["idle"] += idle
        results[mode]["loaded"] += loaded
        results[mode]["rates"].append(rate)
        print(
            f"{mode}: B TTFT idle p99 {pct(idle, 99):.3f} s, loaded p99 "
            f"{pct(loaded, 99):.3f} s, {rate:.1f} tok/s",
            flush=True,
        )

    for r in results.values():
        r["rate"] = median(r["rates"])
    fifo_rate = results["fifo"]["rate"]
    # Each fair round over the fifo round just before it: the machine's drift between
    # rounds cancels in these more than in the ratio of the medians.
    paired = [b / a for a, b in zip(results["fifo"]["rates"], results["fair"]["rates"])]
    rows = []
    for mode, r in results.items():
        idle_p99, loaded_p99 = pct(r["idle"], 99), pct(r["loaded"], 99)
        rows.append(
            [
                mode,
                pct(r["idle"], 50),
                idle_p99,
                pct(r["loaded"], 50),
                loaded_p99,
                f"{loaded_p99 / idle_p99:.2f}x",
                f"{r['rate']:.1f} ({', '.join(f'{x:.0f}' for x in r['rates'])})",
                f"{r['rate'] / fifo_rate:.2f}x",
                "" if mode == "fifo" else ", ".join(f"{x:.2f}x" for x in paired),
            ]
        )
    b = (
        "no tenant B"
        if args.without_b
        else f"tenant B sends one {args.short_tokens}-token request a second"
    )
    print(
        f"\n{args.model} {args.dtype}, batch {args.max_batch_size}: tenant A keeps "
        f"{args.flood} x {args.long_tokens}-token requests in flight, {b} for "
        f"{args.duration:.0f} s; prefill budget {args.max_prefill_tokens or 'default'}, "
        f"step stages {args.step_stages or 'default'}\n"
    )
    print(
        table(
            [
                "scheduling",
                "B TTFT p50 idle (s)",
                "B TTFT p99 idle (s)",
                "B TTFT p50 flood (s)",
                "B TTFT p99 flood (s)",
                "p99 flood / idle",
                "tok/s during flood (rounds)",
                "x FIFO",
                "x FIFO by round",
            ],
            rows,
        )
    )
    print("\ntargets: fair p99 flood / idle <= 2x; fair tok/s >= 0.95x FIFO")
    (OUT / "fairness.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
