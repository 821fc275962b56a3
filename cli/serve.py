"""``openllm-clone start``: serve a model through the BentoML service."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

import typer

from openllm_clone.errors import OpenLLMCloneError
from openllm_clone.settings import FATAL_FILE_ENV, Settings, parse_adapter_spec

from ._common import console, fail

app = typer.Typer()


@app.command("start")
def start(
    model: str = typer.Argument(
        "smollm2", envvar="OPENLLM_CLONE_MODEL",
        help="Model store tag, local Hugging Face folder, or hub id.",
    ),
    host: str = typer.Option("127.0.0.1", envvar="OPENLLM_CLONE_HOST", help="Address to listen on."),
    port: int = typer.Option(3000, envvar="OPENLLM_CLONE_PORT", help="Port to listen on."),
    dtype: str = typer.Option("auto", envvar="OPENLLM_CLONE_DTYPE",
                              help="auto, float32, bfloat16 or float16."),
    device: str = typer.Option("auto", envvar="OPENLLM_CLONE_DEVICE", help="cpu, cuda or auto."),
    quantize: str | None = typer.Option(
        None, envvar="OPENLLM_CLONE_QUANTIZE",
        help="int8, int4, nf4, fp4 (bitsandbytes), gptq (a GPTQ checkpoint), torchao-int8.",
    ),
    runner: str = typer.Option("auto", envvar="OPENLLM_CLONE_RUNNER",
                               help="auto, fast (Llama family) or generic (any causal LM)."),
    compile: bool = typer.Option(False, "--compile", envvar="OPENLLM_CLONE_COMPILE",
                                 help="torch.compile the decode step (CPU; minutes at first start)."),
    max_batch_size: int = typer.Option(16, envvar="OPENLLM_CLONE_MAX_BATCH_SIZE",
                                       help="Most sequences in the running batch."),
    prefix_caching: bool = typer.Option(True, "--prefix-caching/--no-prefix-caching",
                                        envvar="OPENLLM_CLONE_PREFIX_CACHING",
                                        help="Reuse the KV of prompt prefixes seen before."),
    max_queue: int = typer.Option(256, envvar="OPENLLM_CLONE_MAX_QUEUE",
                                  help="Most waiting requests before 503."),
    timeout: float = typer.Option(600.0, envvar="OPENLLM_CLONE_TIMEOUT",
                                  help="Per-request timeout in seconds."),
    workers: int = typer.Option(1, envvar="OPENLLM_CLONE_WORKERS",
                                help="BentoML worker processes (backend bentoml)."),
    backend: str = typer.Option("bentoml", envvar="OPENLLM_CLONE_BACKEND",
                                help="bentoml (one server, --workers) or ray (Ray Serve replicas)."),
    replicas: int = typer.Option(1, envvar="OPENLLM_CLONE_REPLICAS", help="Ray Serve replicas."),
    max_replicas: int | None = typer.Option(
        None, envvar="OPENLLM_CLONE_MAX_REPLICAS",
        help="Autoscale Ray replicas up to this many on queue length."),
    cpus_per_replica: float = typer.Option(1.0, help="CPUs Ray reserves for each replica."),
    gpus_per_replica: float = typer.Option(0.0, help="GPUs Ray reserves for each replica."),
    ray_address: str | None = typer.Option(
        None, envvar="RAY_ADDRESS", help="Join this Ray cluster (auto or host:port); default: local."),
    routing: str = typer.Option("affinity", envvar="OPENLLM_CLONE_ROUTING",
                                help="Ray routing: affinity (by adapter) or random."),
    api_key: list[str] = typer.Option(
        [], "--api-key", envvar="OPENLLM_CLONE_API_KEY",
        help="Accepted bearer key (repeatable; the env var takes a comma-separated list).",
    ),
    admin_api_key: list[str] = typer.Option(
        [], "--admin-api-key", envvar="OPENLLM_CLONE_ADMIN_API_KEY",
        help="Key required to load/unload adapters (repeatable or comma-separated).",
    ),
    max_body_bytes: int = typer.Option(4 * 2**20, envvar="OPENLLM_CLONE_MAX_BODY_BYTES",
                                       help="Largest request body (413 beyond)."),
    adapter_id: list[str] = typer.Option(
        [], "--adapter-id", help="NAME=PATH or PATH of a peft LoRA adapter (repeatable)."
    ),
    max_adapters: int = typer.Option(8, envvar="OPENLLM_CLONE_MAX_ADAPTERS",
                                     help="Adapters held in memory at once (LRU)."),
    max_adapter_rank: int = typer.Option(64, envvar="OPENLLM_CLONE_MAX_ADAPTER_RANK",
                                         help="Highest LoRA rank accepted."),
    adapter_root: list[str] = typer.Option(
        [], "--adapter-root", help="Run-time adapter paths must lie under one of these."
    ),
    allow_pickle_adapters: bool = typer.Option(False, help="Accept pickled adapter_model.bin."),
    max_adapter_mb: int = typer.Option(1024, envvar="OPENLLM_CLONE_MAX_ADAPTER_MB",
                                       help="Largest adapter weights file, MiB."),
    max_model_len: int | None = typer.Option(None, envvar="OPENLLM_CLONE_MAX_MODEL_LEN",
                                             help="Context limit (default: the model's)."),
    kv_cache_mb: int = typer.Option(1024, envvar="OPENLLM_CLONE_KV_CACHE_MB",
                                    help="KV-cache pool in MiB."),
    model_name: str | None = typer.Option(None, help="Name to serve the base model under."),
    log_level: str = typer.Option("INFO", envvar="OPENLLM_CLONE_LOG_LEVEL",
                                  help="DEBUG, INFO, WARNING or ERROR."),
    log_prompts: bool = typer.Option(False, help="Log prompt text in the per-request line."),
) -> None:
    """Serve MODEL (default: the embedded SmolLM2) with its adapters on HOST:PORT."""
    keys = [k for raw in api_key for k in raw.split(",")]
    admin_keys = [k for raw in admin_api_key for k in raw.split(",")]
    try:
        settings = Settings(
            model=model, host=host, port=port, dtype=dtype,  # type: ignore[arg-type]
            device=device, quantize=quantize, compile=compile, prefix_caching=prefix_caching,
            runner=runner,  # type: ignore[arg-type]
            max_batch_size=max_batch_size, max_queue=max_queue,
            timeout=timeout, workers=workers, backend=backend,  # type: ignore[arg-type]
            replicas=replicas, max_replicas=max_replicas, cpus_per_replica=cpus_per_replica,
            gpus_per_replica=gpus_per_replica, ray_address=ray_address,
            routing=routing,  # type: ignore[arg-type]
            api_keys=keys, admin_api_keys=admin_keys,
            max_body_bytes=max_body_bytes,
            adapters=[parse_adapter_spec(a) for a in adapter_id],
            max_adapters=max_adapters, max_adapter_rank=max_adapter_rank,
            adapter_roots=adapter_root, allow_pickle_adapters=allow_pickle_adapters,
            max_adapter_mb=max_adapter_mb,
            max_model_len=max_model_len, kv_cache_mb=kv_cache_mb, model_name=model_name,
            log_level=log_level.upper(), log_prompts=log_prompts,  # type: ignore[arg-type]
        )
    except ValueError as exc:
        fail(str(exc), 2)
    serve(settings)


def _bento(ref: str) -> str | None:
    """The tag of a bento built by openllm-clone, if ``ref`` names one."""
    if ":" not in ref and "/" in ref:
        return None
    try:
        import bentoml

        from openllm_clone.bento import BENTO_LABEL

        bento = bentoml.bentos.get(ref)
    except Exception:  # not a bento tag
        return None
    return str(bento.tag) if bento.info.labels.get("kind") == BENTO_LABEL else None


def serve(settings: Settings) -> None:
    """Resolve the model once, then run the BentoML server in the foreground."""
    from openllm_clone.store import resolve_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bento = _bento(settings.model)
    if bento is not None:
        # A built bento carries its own settings, adapters and code: serve it as is.
        console.print(f"[bold green]openllm-clone[/] serving bento {bento} on "
                      f"http://{settings.host}:{settings.port}")
        os.execvp(sys.executable, [sys.executable, "-m", "bentoml", "serve", bento,
                                   "--host", settings.host, "--port", str(settings.port)])
    try:
        with console.status(f"resolving model {settings.model!r}"):
            resolved = resolve_model(settings.model)
    except OpenLLMCloneError as exc:
        fail(exc.message)
    if resolved.tag:
        settings = settings.model_copy(update={"model": resolved.tag})
    from openllm_clone.runners.support import check_model

    with console.status("checking that a runner can serve the model"):
        support = check_model(resolved.path, settings)
    if not support.ok:
        fail(support.line())
    os.environ.update(settings.to_env())
    url = f"http://{settings.host}:{settings.port}"
    if settings.backend == "ray":
        _serve_ray(settings, resolved.name, url)
        return

    from openllm_clone.service import LLMService

    LLMService.config["workers"] = settings.workers
    fatal_file = _exit_when_a_worker_cannot_load()
    console.print(f"[bold green]openllm-clone[/] serving [bold]{resolved.name}[/] on {url}")
    console.print(
        f"  try: openllm-clone query --endpoint {url} 'What is the capital of France?'\n"
        f"  or:  curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
        f"-d '{{\"model\": \"{resolved.name}\", \"messages\": [{{\"role\": \"user\", "
        f"\"content\": \"Hello\"}}]}}'"
    )
    try:
        LLMService.serve_http(host=settings.host, port=settings.port)
    except KeyboardInterrupt:
        console.print("stopped")
    finally:
        with contextlib.suppress(OSError):
            os.unlink(fatal_file)


def _serve_ray(settings: Settings, name: str, url: str) -> None:
    try:
        from openllm_clone.integrations.ray_serve import run
    except OpenLLMCloneError as exc:
        fail(exc.message)
    where = settings.ray_address or "a local Ray instance"
    console.print(f"[bold green]openllm-clone[/] serving [bold]{name}[/] on {url} with "
                  f"{settings.replicas} Ray Serve replica(s) on {where} ({settings.routing} routing)")
    run(settings)


def _exit_when_a_worker_cannot_load() -> str:
    """End the whole server, non-zero, when a worker's model load fails.

    BentoML restarts a worker whose ``__init__`` raised, again and again, and
    ``/readyz`` never answers 200. The service writes the reason to the file named by
    ``OPENLLM_CLONE_FATAL_FILE``; a thread here watches it, prints the reason, stops the
    workers and exits with status 1. Returns the file's path (the caller removes it).
    """
    import tempfile
    import threading
    import time

    fd, path = tempfile.mkstemp(prefix="openllm-clone-fatal-")
    os.close(fd)
    os.environ[FATAL_FILE_ENV] = path

    def watch() -> None:
        while True:
            time.sleep(0.2)
            try:
                with open(path) as fh:
                    reason = fh.read().strip()
            except OSError:
                continue
            if reason:
                break
        console.print(f"[bold red]error:[/] the model could not be loaded: {reason}", soft_wrap=True)
        _stop_children()
        with contextlib.suppress(OSError):
            os.unlink(path)
        os._exit(1)

    threading.Thread(target=watch, name="openllm-clone-fatal-watch", daemon=True).start()
    return path


def _stop_children() -> None:
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=10)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
