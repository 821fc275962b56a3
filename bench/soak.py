"""Soak: mixed traffic against the real server for a long time, watching for leaks.

Concurrency 32 (default) over the base model and 8 adapters: streamed and whole answers,
10 % of requests cancelled after their first token, 10 % invalid (each must get its 4xx),
and an adapter loaded and unloaded at run time every minute. Every 10 s it samples the
server's process group (RSS, open file descriptors, threads); per window it prints
requests, p50/p99 latency of valid whole requests, RSS, fds and threads, and at the end
the lost requests (a valid request that did not end with its answer, or any 5xx) and the
targets: after the warm-up, RSS within 10 % and fds/threads flat; p99 of the last window
within 20 % of the first. Exits 1 when a request was lost.

    python bench/soak.py                                  # SmolLM2, 30 minutes
    python bench/soak.py --minutes 2 --warmup 0.5 --window 0.5 --model DIR --adapter-dir DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import median, pct, table  # noqa: E402
from openllm_clone.testing import run_server  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


def tree_stats(root: int) -> dict[str, float]:
    """RSS (MB), open fds and threads summed over ``root`` and all its descendants (the
    CLI process, BentoML's workers: each in a process group of its own)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parents[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    rss = fds = threads = 0.0
    per_process: dict[str, float] = {}
    for pid in tree:
        try:
            with open(f"/proc/{pid}/status") as fh:
                status = dict(line.split(":", 1) for line in fh if ":" in line)
            mb = int(status["VmRSS"].split()[0]) / 1024
            threads += int(status["Threads"])
            fds += len(os.listdir(f"/proc/{pid}/fd"))
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                words = fh.read().decode(errors="replace").split("\0")
        except (OSError, KeyError, ValueError):
            continue  # a process that ended meanwhile
        rss += mb
        per_process[f"{pid} {_short(words)}"] = mb
    return {"rss_mb": rss, "fds": fds, "threads": threads, "processes": len(tree)} | {
        f"rss {name}": mb for name, mb in per_process.items()
    }


def _short(words: list[str]) -> str:
    """A process's role from its command line: the module or script it runs."""
    if "-m" in words[:-1]:
        return words[words.index("-m") + 1]
    return next((Path(w).name for w in words[1:] if w.endswith(".py")), Path(words[0]).name)


def _drift(values: list[float]) -> float:
    """Median of the last third minus the median of the first third: a trend, not the
    momentary swing of open connections between two samples."""
    third = max(1, len(values) // 3)
    return median(values[-third:]) - median(values[:third])


class Soak:
    def __init__(self, url: str, models: list[str], args: argparse.Namespace) -> None:
        self.url, self.models, self.args = url, models, args
        self.rng = random.Random(args.seed)
        self.t0 = time.monotonic()
        self.done: list[tuple[float, float]] = []  # (end time, latency) of valid whole requests
        self.counts: dict[str, int] = {}
        self.lost: list[str] = []

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    async def one(self, client: httpx.AsyncClient) -> None:
        roll = self.rng.random()
        model = self.rng.choice(self.models)
        body: dict[str, Any] = {
            "model": model,
            "prompt": f"Request {self.rng.randrange(10**6)}: tell me about",
            "max_tokens": self.rng.randint(4, self.args.max_tokens),
            "temperature": 0,
        }
        start = time.monotonic()
        if roll < 0.1:  # invalid: must be a 4xx
            body[self.rng.choice(["max_tokens", "temperature", "model"])] = self.rng.choice(
                [-5, "x", 10**9]
            )
            r = await client.post("/v1/completions", json=body)
            self.count("invalid")
            if not 400 <= r.status_code < 500:
                self.lost.append(f"invalid request answered {r.status_code}: {r.text[:200]}")
            return
        if roll < 0.2:  # cancelled after the first token
            body["stream"] = True
            async with client.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break
            self.count("cancelled")
            if r.status_code >= 500:
                self.lost.append(f"cancelled stream answered {r.status_code}")
            return
        stream = roll < 0.6
        try:
            if stream:
                body["stream"] = True
                ended = False
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        ended = ended or line == "data: [DONE]"
                        if line.startswith("data: {") and '"error"' in line:
                            raise RuntimeError(line[:200])
                ok = r.status_code == 200 and ended
            else:
                r = await client.post("/v1/completions", json=body)
                ok = r.status_code == 200 and bool(r.json()["choices"][0]["finish_reason"])
            if not ok:
                raise RuntimeError(f"status {r.status_code}")
        except Exception as exc:  # noqa: BLE001 - every failure of a valid request counts
            self.lost.append(f"{'stream' if stream else 'request'} for {model}: {exc}")
            return
        self.count("stream" if stream else "whole")
        if not stream:
            self.done.append((time.monotonic() - self.t0, time.monotonic() - start))

    async def worker(self, client: httpx.AsyncClient, deadline: float) -> None:
        while time.monotonic() < deadline:
            await self.one(client)

    async def hot_adapter(self, client: httpx.AsyncClient, deadline: float, source: str) -> None:
        """Load and unload an adapter at run time every minute (``--hot-every``)."""
        if self.args.hot_every <= 0:
            return
        while time.monotonic() < deadline:
            for call in ("load", "unload"):
                if call == "load":
                    r = await client.post(
                        "/v1/adapters", json={"name": "hot", "source": source, "force": True}
                    )
                else:
                    r = await client.delete("/v1/adapters/hot")
                self.count(f"adapter_{call}")
                if r.status_code != 200:
                    self.lost.append(f"adapter {call} answered {r.status_code}: {r.text[:200]}")
                pause = self.args.hot_every / 2
                await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))

    async def sampler(
        self, client: httpx.AsyncClient, root: int, deadline: float, out: list[dict[str, float]]
    ) -> None:
        while time.monotonic() < deadline:
            out.append({"t": time.monotonic() - self.t0, **tree_stats(root)})
            out[-1]["stack_mb"] = await self.stack_mb(client)
            await asyncio.sleep(self.args.sample_every)

    async def stack_mb(self, client: httpx.AsyncClient) -> float:
        """The LoRA bank's cached float32 stacks (MB): bounded memory that RSS includes."""
        try:
            meta = (await client.get("/v1/metadata")).json()
            return float(meta["adapter_cache"].get("stack_bytes", 0)) / 2**20
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return float("nan")

    async def run(self, root: int, hot_source: str) -> list[dict[str, float]]:
        deadline = self.t0 + 60 * self.args.minutes
        samples: list[dict[str, float]] = []
        limits = httpx.Limits(max_connections=self.args.concurrency + 8)
        async with httpx.AsyncClient(base_url=self.url, timeout=600, limits=limits) as client:
            await asyncio.gather(
                *(self.worker(client, deadline) for _ in range(self.args.concurrency)),
                self.hot_adapter(client, deadline, hot_source),
                self.sampler(client, root, deadline, samples),
            )
            samples.append({"t": time.monotonic() - self.t0, **tree_stats(root)})
            samples[-1]["stack_mb"] = await self.stack_mb(client)
        return samples


def report(soak: Soak, samples: list[dict[str, float]], args: argparse.Namespace) -> dict[str, Any]:
    window = 60 * args.window
    n = max(1, round(args.minutes / args.window))
    rows, windows = [], []
    for w in range(n):
        lo, hi = w * window, (w + 1) * window
        lat = [latency for end, latency in soak.done if lo <= end < hi]
        inside = [s for s in samples if lo <= s["t"] < hi + 1] or samples[-1:]
        last = inside[-1]
        windows.append({"p50": pct(lat, 50), "p99": pct(lat, 99), **last, "requests": len(lat)})
        rows.append(
            [
                f"{lo / 60:.1f}-{hi / 60:.1f} min",
                len(lat),
                pct(lat, 50),
                pct(lat, 99),
                last["rss_mb"],
                last.get("stack_mb", float("nan")),
                int(last["fds"]),
                int(last["threads"]),
            ]
        )
    print(
        table(
            [
                "window",
                "whole requests",
                "p50 s",
                "p99 s",
                "RSS MB",
                "LoRA stacks MB",
                "fds",
                "threads",
            ],
            rows,
        )
    )
    after = [s for s in samples if s["t"] >= 60 * args.warmup] or samples
    rss = [s["rss_mb"] for s in after]
    fds = [s["fds"] for s in after]
    threads = [s["threads"] for s in after]
    checks = {
        "rss_within_10pct": max(rss) <= 1.1 * min(rss),
        "fds_flat": _drift(fds) <= 8,
        "threads_flat": _drift(threads) <= 4,
        "p99_last_within_20pct_of_first": windows[-1]["p99"] <= 1.2 * windows[0]["p99"],
        "no_lost_requests": not soak.lost,
    }
    # Which process grows: each one's RSS at the first and the last sample after warm-up.
    names = [k for k in after[-1] if k.startswith("rss ") and k in after[0]]
    print(
        table(
            ["process", "RSS MB after warm-up", "RSS MB at the end", "MB / min"],
            [
                [
                    k[4:],
                    after[0][k],
                    after[-1][k],
                    (after[-1][k] - after[0][k]) / max(1e-9, (after[-1]["t"] - after[0]["t"]) / 60),
                ]
                for k in names
            ],
        )
    )
    print(f"\ncounts: {json.dumps(soak.counts, sort_keys=True)}")
    print(f"lost: {len(soak.lost)}" + "".join(f"\n  {x}" for x in soak.lost[:20]))
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'} {name}")
    return {"windows": windows, "counts": soak.counts, "lost": soak.lost, "checks": checks}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--compile", default="off", choices=["auto", "on", "off"])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--warmup", type=float, default=5.0, help="minutes before the leak checks")
    ap.add_argument("--window", type=float, default=5.0, help="minutes per reported window")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--adapter-dir", action="append", default=[], help="use these adapters")
    ap.add_argument("--sample-every", type=float, default=10.0)
    ap.add_argument(
        "--hot-every", type=float, default=60.0, help="seconds per adapter load+unload (0: none)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the report here")
    ap.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for the server only (e.g. MALLOC_ARENA_MAX=2, or a tracemalloc hook)",
    )
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise

    from openllm_clone.store import resolve_model

    model_dir = str(resolve_model(args.model).path)
    dirs = [Path(d) for d in args.adapter_dir]
    if not dirs:
        from bench.adapters import make_adapters

        dirs = make_adapters(model_dir, Path(tempfile.mkdtemp()), args.adapters)
    names = [f"a{i}" for i in range(len(dirs))]
    serve = [args.model, "--dtype", args.dtype, "--max-batch-size", "16", "--compile", args.compile]
    serve += ["--max-adapters", str(len(dirs) + 2)]
    for name, path in zip(names, dirs, strict=True):
        serve += ["--adapter-id", f"{name}={path}"]
    serve += ["--adapter-registry", "none"]
    env = dict(item.split("=", 1) for item in args.server_env)
    with run_server(serve, env, OUT / "soak-server.log") as server:
        base = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]["id"]
        soak = Soak(server.url, [base, *names], args)
        samples = asyncio.run(soak.run(server.proc.pid, str(dirs[0])))
    result = report(soak, samples, args)
    if args.json:
        Path(args.json).write_text(json.dumps(result))
    sys.exit(1 if soak.lost else 0)


if __name__ == "__main__":
    main()
