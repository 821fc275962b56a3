"""Scale-out benchmark on SmolLM2: BentoML workers, Ray Serve replicas, adapter routing.

Measures, over the real HTTP server, with the same seeded workload each time:

1. throughput with 1 vs 2 BentoML workers (``--workers``);
2. throughput with 1 Ray replica (all CPUs) vs 2 replicas (half each);
3. the adapter cache hit rate on 2 Ray replicas holding at most 8 adapters each, for
   requests spread over 16 adapters, with adapter-aware routing (Ray Serve
   multiplexing) against random routing (the baseline), after one warm-up pass.

Ray listens on every interface, so the script re-runs itself inside a loopback-only
network namespace (``unshare --net``, needs root) unless ``--no-netns`` is given.

    python bench/distributed.py [--requests 48] [--new-tokens 64] [--skip-ray]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import table, workload  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
NETNS_MARK = "OPENLLM_CLONE_BENCH_NETNS"


def _reexec_in_netns() -> None:
    if os.environ.get(NETNS_MARK) or "--no-netns" in sys.argv:
        return
    if os.geteuid() != 0 or not shutil.which("unshare"):
        sys.exit(
            "Ray needs a loopback-only network namespace here: run as root, or pass --no-netns "
            "on a machine where Ray may listen on every interface"
        )
    inner = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    os.execvp(
        "unshare",
        ["unshare", "--net", "bash", "-c", f"ip link set lo up && {NETNS_MARK}=1 exec {inner}"],
    )


async def drive(
    url: str, jobs: list[tuple[str, int, str | None]], concurrency: int
) -> dict[str, float]:
    """Send ``jobs`` (prompt, max tokens, adapter) with ``concurrency`` in flight."""
    from openllm_clone.client import AsyncHTTPClient

    sem = asyncio.Semaphore(concurrency)
    tokens = 0
    async with AsyncHTTPClient(url, timeout=600) as client:

        async def one(prompt: str, n: int, adapter: str | None) -> None:
            nonlocal tokens
            async with sem:
                r = await client.generate(
                    prompt, adapter_name=adapter, max_new_tokens=n, ignore_eos=True
                )
                tokens += sum(len(o.token_ids) for o in r.outputs)

        started = time.perf_counter()
        await asyncio.gather(*(one(*job) for job in jobs))
        elapsed = time.perf_counter() - started
    return {"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed}


def serve_and_drive(
    args: list[str],
    jobs: list[tuple[str, int, str | None]],
    concurrency: int,
    log: Path,
    warmup: list[tuple[str, int, str | None]] | None = None,
) -> tuple[dict[str, float], dict | None, dict | None]:
    from openllm_clone.client import HTTPClient
    from openllm_clone.testing import run_server

    with run_server(args, {}, log, ready_timeout=600) as server:
        asyncio.run(
            drive(server.url, [(p, 4, None) for p, _, _ in jobs[:2]], 2)
        )  # first-call costs
        before = None
        if warmup:
            for job in warmup:  # one after another: each adapter loaded once
                asyncio.run(drive(server.url, [job], 1))
            time.sleep(1.0)
            with HTTPClient(server.url) as client:
                before = client.metadata().get("routing")
        result = asyncio.run(drive(server.url, jobs, concurrency))
        with HTTPClient(server.url) as client:
            after = client.metadata().get("routing")
    return result, before, after


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--adapter-requests", type=int, default=96)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--no-netns", action="store_true")
    args = ap.parse_args()
    if not args.skip_ray:
        _reexec_in_netns()

    from bench.adapters import make_adapters
    from openllm_clone.store import resolve_model

    resolved = resolve_model(args.model)
    model = resolved.tag or str(resolved.path)
    base = [model, "--dtype", "bfloat16", "--kv-cache-mb", "256", "--compile", "off"]
    jobs = [(p, args.new_tokens, None) for p, _ in workload(args.requests, seed=1)]
    OUT.mkdir(exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    rows: list[list[object]] = []
    cpus = os.cpu_count() or 1

    for workers in (1, 2):
        r, _, _ = serve_and_drive(
            [*base, "--workers", str(workers)],
            jobs,
            args.concurrency,
            logs / f"workers{workers}.log",
        )
        rows.append([f"BentoML, {workers} worker(s)", f"{r['tok_s']:.0f}", f"{r['seconds']:.1f}"])
        print(rows[-1], flush=True)
    base_tok = float(rows[0][1])
    rows[1].append(f"{float(rows[1][1]) / base_tok:.2f}x")
    rows[0].append("1.00x")

    hit_rows: list[list[object]] = []
    if not args.skip_ray:
        ray_base = [*base, "--backend", "ray"]
        r, _, _ = serve_and_drive(
            [*ray_base, "--replicas", "1", "--cpus-per-replica", str(cpus)],
            jobs,
            args.concurrency,
            logs / "ray1.log",
        )
        rows.append(
            [f"Ray, 1 replica x {cpus} CPU", f"{r['tok_s']:.0f}", f"{r['seconds']:.1f}", "1.00x"]
        )
        ray_one = r["tok_s"]
        print(rows[-1], flush=True)
        r, _, _ = serve_and_drive(
            [*ray_base, "--replicas", "2", "--cpus-per-replica", str(cpus / 2)],
            jobs,
            args.concurrency,
            logs / "ray2.log",
        )
        rows.append(
            [
                f"Ray, 2 replicas x {cpus / 2:g} CPU",
                f"{r['tok_s']:.0f}",
                f"{r['seconds']:.1f}",
                f"{r['tok_s'] / ray_one:.2f}x",
            ]
        )
        print(rows[-1], flush=True)

        # Adapter cache hit rate: 16 adapters, 2 replicas x 8 slots.
        with tempfile.TemporaryDirectory() as tmp:
            paths = make_adapters(str(resolved.path), Path(tmp), 16)
            names = [f"a{i}" for i in range(16)]
            rng = random.Random(7)
            prompts = [p for p, _ in workload(args.adapter_requests, seed=3)]
            adapter_jobs = [(p, 16, rng.choice(names)) for p in prompts]
            warmup = [(prompts[0], 2, n) for n in names]
            for routing in ("affinity", "random"):
                cmd = [
                    *ray_base,
                    "--replicas",
                    "2",
                    "--cpus-per-replica",
                    str(cpus / 2),
                    "--max-adapters",
                    "8",
                    "--routing",
                    routing,
                ]
                for n, p in zip(names, paths):
                    cmd += ["--adapter-id", f"{n}={p}"]
                r, before, after = serve_and_drive(
                    cmd, adapter_jobs, args.concurrency, logs / f"ray-{routing}.log", warmup=warmup
                )
                assert before is not None and after is not None
                hits = after["adapter_cache_hits"] - before["adapter_cache_hits"]
                misses = after["adapter_cache_misses"] - before["adapter_cache_misses"]
                spread = sorted(len(v) for v in after["adapter_loads"].values())
                hit_rows.append(
                    [
                        routing,
                        hits,
                        misses,
                        f"{hits / max(1, hits + misses):.3f}",
                        f"{r['tok_s']:.0f}",
                        f"{spread[0]}-{spread[-1]}",
                    ]
                )
                print(hit_rows[-1], flush=True)

    print(
        f"\nThroughput, SmolLM2 bf16, {args.requests} requests x {args.new_tokens} tokens, "
        f"{args.concurrency} in flight, {cpus} CPUs"
    )
    print(table(["setup", "tok/s", "seconds", "vs 1"], rows))
    if hit_rows:
        print(
            f"\nAdapter cache, 16 adapters over 2 replicas x 8 slots, {args.adapter_requests} requests "
            "after a warm-up pass (ratio: affinity hit rate vs random routing in this run)"
        )
        print(
            table(
                ["routing", "hits", "misses", "hit rate", "tok/s", "replicas that loaded each"],
                hit_rows,
            )
        )
        rate = [float(r[3]) for r in hit_rows]
        print(
            f"affinity / random hit rate: {rate[0]:.3f} / {rate[1]:.3f} = "
            f"{rate[0] / max(rate[1], 1e-9):.2f}x"
        )
    print(f"logs: {logs}")


if __name__ == "__main__":
    main()
