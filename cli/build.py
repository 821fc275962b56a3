"""``openllm-clone build``, ``bentos`` and ``prune``: deployable bentos."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import typer
from rich.table import Table

from openllm_clone.errors import OpenLLMCloneError
from openllm_clone.settings import parse_adapter_spec

from ._common import console, fail, human_bytes, out, settings_or_fail

app = typer.Typer()


@app.command("build")
def build(
    model: str = typer.Argument("smollm2", help="Model store tag, local folder, or hub id."),
    adapter_id: list[str] = typer.Option([], "--adapter-id", help="NAME=PATH (repeatable)."),
    quantize: str | None = typer.Option(None, help="int8, int4, nf4, fp4, gptq, torchao-int8."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16, float16."),
    compile: str = typer.Option(
        "auto",
        "--compile",
        metavar="auto|on|off",
        help="Baked: the compiled decode step (see `start --help`).",
    ),
    flavour: str = typer.Option("cpu", help="cpu (PyTorch CPU wheels) or cuda."),
    bento_version: str | None = typer.Option(None, "--bento-version", help="Bento version."),
    max_batch_size: int = typer.Option(16, help="Baked serving setting."),
    max_adapters: int = typer.Option(8, help="Baked serving setting."),
    containerize: bool = typer.Option(False, help="Also build a container image (needs Docker)."),
    dockerfile_only: Path | None = typer.Option(
        None, "--dockerfile-only", help="Export the build context with its Dockerfile to DIR."
    ),
) -> None:
    """Build a self-contained bento: model, adapters, settings, pinned requirements."""
    from openllm_clone.bento import build_bento

    try:
        adapters = [parse_adapter_spec(a) for a in adapter_id]
    except ValueError as exc:
        fail(str(exc), 2)
    settings = settings_or_fail(
        dict(
            model=model,
            quantize=quantize,
            dtype=dtype,
            compile=compile,
            adapters=adapters,
            max_batch_size=max_batch_size,
            max_adapters=max_adapters,
        )
    )
    started = time.perf_counter()
    try:
        with console.status("building the bento"):
            bento = build_bento(settings, flavour=flavour, version=bento_version)
    except (OpenLLMCloneError, ValueError) as exc:
        fail(str(exc))
    out.print(
        f"[bold green]built[/] {bento.tag} ({human_bytes(bento.size_bytes)} with models) "
        f"in {time.perf_counter() - started:.1f} s"
    )
    out.print(
        f"  serve it:       bentoml serve {bento.tag}   (or: openllm-clone start {bento.tag})"
    )
    out.print(f"  containerize:   bentoml containerize {bento.tag}")
    out.print(f"  Dockerfile:     {bento.dockerfile}")
    if dockerfile_only is not None:
        from openllm_clone.bento import export_build_context

        export_build_context(bento.tag, dockerfile_only)
        out.print(
            f"  build context exported to {dockerfile_only} "
            f"(docker build -f {dockerfile_only}/env/docker/Dockerfile {dockerfile_only})"
        )
    if containerize:
        if (
            shutil.which("docker") is None
            or subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode != 0
        ):
            fail(
                "no Docker daemon is running here, so the image cannot be built; the bento is "
                f"built and its Dockerfile is {bento.dockerfile} (or use --dockerfile-only DIR "
                "with any builder: docker, buildah, kaniko)"
            )
        subprocess.run(["bentoml", "containerize", bento.tag], check=True)


@app.command("bentos")
def bentos() -> None:
    """List bentos built by openllm-clone."""
    from openllm_clone.bento import list_bentos

    table = Table("tag", "model", "adapters", "flavour", "quantize", "created")
    for b in list_bentos():
        labels = b.info.labels
        table.add_row(
            str(b.tag),
            labels.get("model", "?"),
            labels.get("adapters", ""),
            labels.get("flavour", ""),
            labels.get("quantize", ""),
            b.info.creation_time.strftime("%Y-%m-%d %H:%M"),
        )
    out.print(table)


@app.command("prune")
def prune(keep: int = typer.Option(1, help="Versions of each bento to keep.")) -> None:
    """Delete old bento versions, keeping the newest ones."""
    from openllm_clone.bento import prune_bentos

    for tag in prune_bentos(keep):
        out.print(f"deleted {tag}")
