"""Start-up that cannot succeed ends: adapters named at start that cannot be served, a
`/readyz` that never blocks, SIGTERM while starting, and no worker outliving `start`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import (
    free_port,
    make_adapter,
    make_tiny_model,
    run_cli,
    run_server,
    start_until_exit,
)

pytestmark = pytest.mark.e2e


def _added_tokens_adapter(base: Path, out: Path) -> Path:
    """A real peft adapter trained after adding two tokens to the vocabulary (resized
    embeddings and head, saved with modules_to_save), which needs its own tokenizer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.resize_token_embeddings(model.config.vocab_size + 2)
    config = LoraConfig(
        r=4,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["lm_head", "embed_tokens"],
        task_type="CAUSAL_LM",
    )
    get_peft_model(model, config).save_pretrained(str(out))
    return out


@pytest.mark.parametrize("kind", ["tokens", "shape", "rank", "missing"])
def test_start_exits_on_an_adapter_it_cannot_serve(
    kind: str,
    tiny_model_dir: Path,
    tiny_adapters: dict[str, Path],
    tokenizer: Any,
    tmp_path: Path,
) -> None:
    """One of each refusal the server has: an adapter trained with added tokens, an
    adapter of another base model's shapes, a rank over --max-adapter-rank, a folder that
    is not there."""
    extra: list[str] = []
    if kind == "tokens":
        source = _added_tokens_adapter(tiny_model_dir, tmp_path / "tokens")
        reason = "added to the vocabulary"
    elif kind == "shape":
        other = make_tiny_model(tmp_path / "wider", tokenizer, hidden=128)
        source = make_adapter(other, tmp_path / "wider-adapter", seed=1, targets=["q_proj"])
        reason = "do not fit the base model's"
    elif kind == "rank":
        source, reason = tiny_adapters["alpha"], "exceeds the server's limit 4"
        extra = ["--max-adapter-rank", "4"]
    else:
        source, reason = tmp_path / "nowhere", "does not exist"
    code, output, seconds = start_until_exit(
        [str(tiny_model_dir), "--dtype", "float32", "--adapter-id", f"bad={source}", *extra]
    )
    assert code == 1, output
    line = next(x for x in output.splitlines() if x.startswith("error: "))
    assert f"adapter 'bad' ({source}) cannot be served" in line and reason in line, line
    assert "--lenient-adapters" in line
    assert "Traceback" not in output
    assert seconds < 60, f"took {seconds:.0f} s to refuse"


def test_lenient_start_serves_without_the_adapter_and_readyz_never_blocks(
    tiny_model_dir: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    """--lenient-adapters: the base model and the good adapters (LoRA, DoRA) are served,
    the refused adapter is listed as failed with its reason, and a request for it gets
    that reason as a 422. /readyz answers (503 with a JSON reason, then 200) at every probe of the start
    from the moment the worker's server is up; none waits."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    args = [
        str(tiny_model_dir),
        "--dtype",
        "float32",
        "--lenient-adapters",
        "--adapter-id",
        f"tokens={_added_tokens_adapter(tiny_model_dir, tmp_path / 'tokens')}",
        "--adapter-id",
        f"alpha={tiny_adapters['alpha']}",
        "--adapter-id",
        f"dora={make_adapter(tiny_model_dir, tmp_path / 'dora', seed=6, rank=4, dora=True)}",
    ]
    cmd = [sys.executable, "-m", "openllm_clone", "start", *args, "--port", str(port)]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    probes: list[int | None] = []
    reasons: set[str] = set()
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                reply = httpx.get(f"{url}/readyz", timeout=5)
            except httpx.ConnectError:  # the port is not bound yet
                time.sleep(0.1)
                continue
            except httpx.TimeoutException:
                probes.append(None)  # bound, but nobody answered: what this test forbids
                continue
            probes.append(reply.status_code)
            if reply.status_code == 200:
                break
            assert reply.status_code == 503
            assert reply.headers["content-type"] == "application/json"
            reasons.add(reply.json()["error"]["message"])
            time.sleep(0.1)
        assert probes and probes[-1] == 200, (probes, log.read_text()[-3000:])
        # Until the worker's server accepts, a probe waits in the socket's backlog (the
        # worker's interpreter is still importing); from its first answer on, none waits.
        first = next(i for i, p in enumerate(probes) if p is not None)
        assert None not in probes[first:], probes
        assert reasons <= {
            "the server is starting: loading the model",
            "the server is starting: loading the start-up adapters",
        }, reasons
        listed = {a["name"]: a for a in httpx.get(f"{url}/v1/adapters", timeout=30).json()["data"]}
        assert listed["alpha"]["state"] == "ready" and listed["alpha"]["error"] is None
        assert listed["alpha"]["kind"] == "lora" and listed["tokens"]["kind"] is None
        assert listed["dora"]["kind"] == "dora" and listed["dora"]["state"] == "ready"
        assert listed["dora"]["size_bytes"] > 0
        assert listed["tokens"]["state"] == "failed"
        assert "added to the vocabulary" in listed["tokens"]["error"]
        body = {"prompt": "hi", "max_tokens": 2}
        refused = httpx.post(f"{url}/v1/completions", json={**body, "model": "tokens"}, timeout=60)
        assert refused.status_code == 422
        assert "own tokenizer" in refused.json()["error"]["message"]
        for model in ("tiny-llama", "alpha", "dora"):
            served = httpx.post(f"{url}/v1/completions", json={**body, "model": model}, timeout=60)
            assert served.status_code == 200, served.text
            assert served.json()["usage"]["completion_tokens"] == 2
        assert "ERROR openllm_clone.llm: adapter 'tokens'" in log.read_text()
        listing = run_cli("adapters", "list", "--endpoint", url)
        assert listing.returncode == 0, listing.stderr
        rows = {line.split("│")[1].strip(): line for line in listing.stdout.splitlines()[3:-1]}
        assert "failed: the adapter's" in rows["tokens"]
        assert "lora" in rows["alpha"] and "ready" in rows["alpha"]
        assert "dora" in rows["dora"] and "ready" in rows["dora"]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(pids: list[int]) -> list[int]:
    """The processes of ``pids`` still running (a zombie waiting for init is not)."""
    import psutil

    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_sigterm_while_the_model_loads_ends_start(tiny_model_dir: Path, tmp_path: Path) -> None:
    """SIGTERM to a server whose worker is still loading its model ends it, workers and
    all, in bounded time (20 s; well under a second here)."""
    port = free_port()
    cmd = [sys.executable, "-m", "openllm_clone", "start", str(tiny_model_dir)]
    proc = subprocess.Popen(
        [*cmd, "--dtype", "float32", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        status = None
        while status != 503 and time.monotonic() < deadline and proc.poll() is None:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code
            except httpx.HTTPError:
                time.sleep(0.05)
        assert status == 503, "never saw the worker loading"
        workers = _descendants(proc.pid)
        assert workers
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        time.sleep(0.5)
        assert not _alive(workers)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_no_worker_outlives_a_killed_start(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`start` killed with SIGKILL (an OOM kill): its worker goes with it, and the port is
    free again."""
    with run_server(
        [str(tiny_model_dir), "--dtype", "float32", "--kv-cache-mb", "16"],
        {},
        tmp_path / "server.log",
    ) as server:
        workers = _descendants(server.proc.pid)
        assert workers
        server.proc.kill()
        server.proc.wait(timeout=10)
        deadline = time.monotonic() + 20
        while _alive(workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(workers), f"left running: {_alive(workers)}"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{server.url}/readyz", timeout=2)
