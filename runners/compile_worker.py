"""Compile a model's decode step into the compile cache, in a process of its own.

``--compile auto`` starts this (see :class:`~.compiled.BackgroundCompile`) when the
cache has no package for the model yet, so the server can answer requests eagerly
meanwhile::

    python -m openllm_clone.runners.compile_worker --model DIR --dtype float32 \\
        --max-batch-size 16 --max-model-len 8192 --cache-dir DIR --stages 1 --threads 2

It runs at a lower CPU priority than the server and exits when the server does.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
import time
from pathlib import Path


def _exit_with_parent() -> None:
    """Exit when the process that started us is gone (we are re-parented)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="openllm_clone.runners.compile_worker")
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--dtype", required=True, choices=["float32", "bfloat16"])
    parser.add_argument("--max-batch-size", required=True, type=int)
    parser.add_argument("--max-model-len", required=True, type=int)
    parser.add_argument("--cache-dir", required=True, type=Path)
    parser.add_argument("--stages", default=1, type=int)
    parser.add_argument("--threads", required=True, type=int)
    args = parser.parse_args(argv)
    _exit_with_parent()
    with contextlib.suppress(OSError):
        os.nice(10)  # the server's requests come first
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch
    from transformers import AutoModelForCausalLM

    from .torch_runner import TorchRunner

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=getattr(torch, args.dtype))
    runner = TorchRunner(
        model,
        model_id=args.model.name,
        kv_cache_bytes=1,  # the smallest pool: the compile only writes its scratch slot
        max_model_len=args.max_model_len,
        compile="on",
        max_batch_size=args.max_batch_size,
        compile_cache=lambda: args.cache_dir,
        stages=args.stages,
    )
    runner.compile_step()
    stats = runner.compiled_stats() or {}
    logging.getLogger(__name__).info(
        "decode step %s in %.1f s: %s",
        stats.get("source"),
        stats.get("seconds", 0.0),
        args.cache_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
