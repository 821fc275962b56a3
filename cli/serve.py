"""``openllm-clone start``: serve a model through the BentoML service."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import typer

from openllm_clone.errors import OpenLLMCloneError
from openllm_clone.fatal import watch_for_fatal_errors
from openllm_clone.settings import Settings, parse_adapter_spec

from ._common import console, fail, settings_or_fail

app = typer.Typer()


# Flags, env vars, defaults and help texts all come from Settings (one source): the
# option of field ``f`` is ``--f`` (dashes), its env var ``OPENLLM_CLONE_F``, its default
# and help the field's. Where a flag reads better than the field's name, it is listed here
# (parameter name -> field); tests/unit/test_cli_settings.py checks every field has one.
PARAM_FIELDS = {
    "api_key": "api_keys",
    "admin_api_key": "admin_api_keys",
    "adapter_id": "adapters",
    "adapter_root": "adapter_roots",
}
# Env vars named after the flag (the client reads OPENLLM_CLONE_API_KEY too), and Ray's own.
ENV_VARS = {
    "api_keys": "OPENLLM_CLONE_API_KEY",
    "admin_api_keys": "OPENLLM_CLONE_ADMIN_API_KEY",
    "adapters": "OPENLLM_CLONE_ADAPTER_ID",
    "adapter_roots": "OPENLLM_CLONE_ADAPTER_ROOT",
    "ray_address": "RAY_ADDRESS",
}


def env_var(field: str) -> str:
    """The environment variable of a Settings field."""
    return ENV_VARS.get(field, f"OPENLLM_CLONE_{field.upper()}")


def _opt(field: str, *decls: str, default: Any = ..., **kwargs: Any) -> Any:
    info = Settings.model_fields[field]
    if default is ...:
        default = info.get_default(call_default_factory=True)
    return typer.Option(default, *decls, envvar=env_var(field), help=info.description, **kwargs)


@app.command("start")
def start(
    model: str = typer.Argument(
        Settings.model_fields["model"].default,
        envvar=env_var("model"),
        help=Settings.model_fields["model"].description,
    ),
    host: str = _opt("host"),
    port: int = _opt("port"),
    dtype: str = _opt("dtype"),
    device: str = _opt("device"),
    quantize: str | None = _opt("quantize"),
    runner: str = _opt("runner"),
    compile: str = _opt("compile", "--compile", metavar="auto|on|off"),
    compile_cache: str | None = _opt("compile_cache"),
    max_batch_size: int = _opt("max_batch_size"),
    max_prefill_tokens: int | None = _opt("max_prefill_tokens"),
    block_size: int = _opt("block_size"),
    prefix_caching: bool = _opt("prefix_caching", "--prefix-caching/--no-prefix-caching"),
    max_queue: int = _opt("max_queue"),
    timeout: float = _opt("timeout"),
    seed: int = _opt("seed"),
    workers: int = _opt("workers"),
    backend: str = _opt("backend"),
    replicas: int = _opt("replicas"),
    max_replicas: int | None = _opt("max_replicas"),
    cpus_per_replica: float = _opt("cpus_per_replica"),
    gpus_per_replica: float = _opt("gpus_per_replica"),
    ray_address: str | None = _opt("ray_address"),
    routing: str = _opt("routing"),
    api_key: list[str] = _opt("api_keys", "--api-key", default=[]),
    admin_api_key: list[str] = _opt("admin_api_keys", "--admin-api-key", default=[]),
    keys_file: str | None = _opt("keys_file"),
    scheduling: str = _opt("scheduling"),
    step_stages: int | None = _opt("step_stages"),
    usage_log: str | None = _opt("usage_log"),
    max_body_bytes: int = _opt("max_body_bytes"),
    adapter_id: list[str] = _opt("adapters", "--adapter-id", default=[]),
    max_adapters: int = _opt("max_adapters"),
    max_adapter_rank: int = _opt("max_adapter_rank"),
    adapter_registry: str | None = _opt("adapter_registry"),
    adapter_root: list[str] = _opt("adapter_roots", "--adapter-root", default=[]),
    allow_pickle_adapters: bool = _opt("allow_pickle_adapters"),
    lenient_adapters: bool = _opt("lenient_adapters"),
    max_adapter_mb: int = _opt("max_adapter_mb"),
    max_model_len: int | None = _opt("max_model_len"),
    kv_cache_mb: int = _opt("kv_cache_mb"),
    model_name: str | None = _opt("model_name"),
    log_level: str = _opt("log_level"),
    log_prompts: bool = _opt("log_prompts"),
) -> None:
    """Serve MODEL (default: the embedded SmolLM2) with its adapters on HOST:PORT.

    --api-key, --admin-api-key, --adapter-id and --adapter-root repeat; their environment
    variables take comma-separated lists. --adapter-id takes NAME=PATH or PATH.
    """

    def split(values: list[str]) -> list[str]:
        return [v for raw in values for v in raw.split(",") if v.strip()]

    try:
        adapters = [parse_adapter_spec(a) for a in split(adapter_id)]
    except ValueError as exc:
        fail(str(exc), 2)
    settings = settings_or_fail(
        dict(
            model=model,
            host=host,
            port=port,
            dtype=dtype,
            device=device,
            quantize=quantize,
            compile=compile,
            compile_cache=compile_cache,
            prefix_caching=prefix_caching,
            runner=runner,
            max_batch_size=max_batch_size,
            max_prefill_tokens=max_prefill_tokens,
            block_size=block_size,
            max_queue=max_queue,
            seed=seed,
            timeout=timeout,
            workers=workers,
            backend=backend,
            replicas=replicas,
            max_replicas=max_replicas,
            cpus_per_replica=cpus_per_replica,
            gpus_per_replica=gpus_per_replica,
            ray_address=ray_address,
            routing=routing,
            api_keys=split(api_key),
            admin_api_keys=split(admin_api_key),
            keys_file=keys_file,
            scheduling=scheduling,
            step_stages=step_stages,
            usage_log=usage_log,
            max_body_bytes=max_body_bytes,
            adapters=adapters,
            max_adapters=max_adapters,
            max_adapter_rank=max_adapter_rank,
            adapter_registry=adapter_registry,
            adapter_roots=split(adapter_root),
            allow_pickle_adapters=allow_pickle_adapters,
            lenient_adapters=lenient_adapters,
            max_adapter_mb=max_adapter_mb,
            max_model_len=max_model_len,
            kv_cache_mb=kv_cache_mb,
            model_name=model_name,
            log_level=log_level.upper(),
            log_prompts=log_prompts,
        )
    )
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

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    bento = _bento(settings.model)
    if bento is not None:
        # A built bento carries its own settings, adapters and code: serve it as is.
        console.print(
            f"[bold green]openllm-clone[/] serving bento {bento} on "
            f"http://{settings.host}:{settings.port}"
        )
        os.execvp(
            sys.executable,
            [
                sys.executable,
                "-m",
                "bentoml",
                "serve",
                bento,
                "--host",
                settings.host,
                "--port",
                str(settings.port),
            ],
        )
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
    if settings.keys_file:
        from openllm_clone.tenants import KeysFile

        try:
            keys = KeysFile(settings.keys_file).entries()
        except OpenLLMCloneError as exc:
            fail(exc.message)
        console.print(f"keys file {settings.keys_file}: {len(keys)} keys")
    os.environ.update(settings.to_env())
    url = f"http://{settings.host}:{settings.port}"
    if settings.backend == "ray":
        _serve_ray(settings, resolved.name, url)
        return

    from openllm_clone.service import LLMService

    LLMService.config["workers"] = settings.workers  # type: ignore[attr-defined]  # a bentoml.Service
    # A worker that cannot start ends the whole server with the reason (never a restart
    # loop): see openllm_clone.fatal.
    watch_for_fatal_errors()
    console.print(f"[bold green]openllm-clone[/] serving [bold]{resolved.name}[/] on {url}")
    console.print(
        f"  try: openllm-clone query --endpoint {url} 'What is the capital of France?'\n"
        f"  or:  curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
        f'-d \'{{"model": "{resolved.name}", "messages": [{{"role": "user", '
        f'"content": "Hello"}}]}}\''
    )
    try:
        LLMService.serve_http(host=settings.host, port=settings.port)  # type: ignore[attr-defined]
    except KeyboardInterrupt:
        console.print("stopped")


def _serve_ray(settings: Settings, name: str, url: str) -> None:
    try:
        from openllm_clone.integrations.ray_serve import run
    except OpenLLMCloneError as exc:
        fail(exc.message)
    where = settings.ray_address or "a local Ray instance"
    console.print(
        f"[bold green]openllm-clone[/] serving [bold]{name}[/] on {url} with "
        f"{settings.replicas} Ray Serve replica(s) on {where} ({settings.routing} routing)"
    )
    try:
        run(settings)
    except OpenLLMCloneError as exc:  # a replica that could not start: its reason
        fail(exc.message)
