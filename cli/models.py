"""``openllm-clone import`` and ``openllm-clone models``: the model store."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from openllm_clone.errors import OpenLLMCloneError
from openllm_clone.settings import Settings

from ._common import console, fail, human_bytes, out, settings_or_fail

app = typer.Typer()


@app.command("import")
def import_(
    source: str = typer.Argument("smollm2", help="smollm2, a local folder, or a hub id."),
    name: str | None = typer.Option(None, help="Name in the store."),
    adapter: bool = typer.Option(False, "--adapter", help="SOURCE is a peft LoRA adapter folder."),
    compile: bool = typer.Option(
        False,
        "--compile",
        help="Also compile the decode step into the compile cache now, so that "
        "`start --compile` with the same --dtype, --max-batch-size, --max-model-len and "
        "--step-stages loads it in seconds.",
    ),
    dtype: str = typer.Option("auto", help="With --compile: the dtype `start` will use."),
    max_batch_size: int = typer.Option(
        Settings.model_fields["max_batch_size"].default,
        help="With --compile: the --max-batch-size `start` will use.",
    ),
    max_model_len: int | None = typer.Option(
        None, help="With --compile: the --max-model-len `start` will use."
    ),
    step_stages: int | None = typer.Option(
        None,
        help="With --compile: the --step-stages `start` will use (its default: 4 under fair "
        "scheduling, which a --keys-file turns on, else 1).",
    ),
    compile_cache: str | None = typer.Option(
        None, help=Settings.model_fields["compile_cache"].description
    ),
) -> None:
    """Put a model (or, with --adapter, a LoRA adapter) into the BentoML model store."""
    from openllm_clone.store import import_adapter, import_model

    if compile and adapter:
        fail("--compile compiles a base model; it does not apply to --adapter")
    # Checked before the import: a bad --dtype must not leave a model behind half done.
    ahead = (
        settings_or_fail(
            dict(
                model=source,
                dtype=dtype,
                compile=True,
                max_batch_size=max_batch_size,
                max_model_len=max_model_len,
                step_stages=step_stages,
                compile_cache=compile_cache,
            )
        )
        if compile
        else None
    )

    try:
        with console.status(f"importing {source}"):
            if adapter:
                tag = import_adapter(source, name=name or _default_name(source))
            else:
                tag = import_model(source, name=name)
    except OpenLLMCloneError as exc:
        fail(exc.message)
    if not adapter:
        _warn_if_unservable(tag)
    if ahead is not None:
        _compile_ahead(tag, ahead.model_copy(update={"model": tag}))
    out.print(tag)


def _compile_ahead(tag: str, settings: Settings) -> None:
    """Load the model as `start --compile` would, which compiles its decode step into
    the compile cache (or finds it there), then let it go."""
    from openllm_clone.runners.loader import load_runner

    from openllm_clone.store import resolve_model

    try:
        with console.status(f"compiling the decode step of {tag} (~1-2 min)"):
            runner, _ = load_runner(resolve_model(tag).path, settings, model_id=tag)
    except OpenLLMCloneError as exc:
        fail(exc.message)
    stats = runner.compiled_stats() or {}
    console.print(
        f"decode step {'found' if stats.get('source') == 'disk' else 'compiled'} "
        f"in {stats.get('seconds', 0):.1f} s: {stats.get('package')}",
        soft_wrap=True,
    )


def _warn_if_unservable(tag: str) -> None:
    """``import`` accepts any model folder; say at once when no runner can serve it."""
    import bentoml

    meta: dict[str, Any] = dict(bentoml.models.get(tag).info.metadata)
    if meta.get("runner") == "none":
        console.print(f"[bold yellow]warning:[/] {meta.get('runner_reason')}", soft_wrap=True)


@app.command("quantize")
def quantize(
    model: str = typer.Argument("smollm2", help="Model store tag or local folder."),
    method: str = typer.Option(
        "gptq",
        help="gptq, or nf4/fp4 (bitsandbytes 4-bit, unquantized layers chosen by "
        "measured sensitivity). int8 and torchao-int8 quantize at load time.",
    ),
    bits: int = typer.Option(4, help="GPTQ bits per weight: 2, 3, 4 or 8."),
    group_size: int | None = typer.Option(
        None,
        help="GPTQ columns sharing one scale; default 128, or 32 for models narrower than "
        "1024 (SmolLM2), falling back to 64/32/16 to divide every width; -1: one per row.",
    ),
    keep_edge_layers: bool | None = typer.Option(
        None,
        "--keep-edge-layers/--no-keep-edge-layers",
        help="GPTQ: keep the first and last decoder layers in full precision (default: at <= 4 bits).",
    ),
    keep_layers: int | None = typer.Option(
        None,
        help="nf4/fp4: how many of the most sensitive decoder layers stay unquantized "
        "(default: an eighth of the layers, rounded up).",
    ),
    calibration: str = typer.Option(
        "builtin", help="builtin, or a text file (paragraphs) or .jsonl."
    ),
    seqlen: int = typer.Option(512, help="Longest calibration sequence in tokens."),
    name: str | None = typer.Option(
        None, help="Name in the store (default MODEL-gptq-4bit, MODEL-nf4, ...)."
    ),
) -> None:
    """Quantize MODEL offline into the model store (GPTQ, or calibrated nf4/fp4); serve it
    with `start TAG`."""
    from openllm_clone.store import quantize_model

    what = f"GPTQ {bits}-bit" if method == "gptq" else method
    try:
        with console.status(f"{what}: {model}") as status:
            tag = quantize_model(
                model,
                method=method,
                bits=bits,
                group_size=group_size,
                calibration=calibration,
                name=name,
                seqlen=seqlen,
                keep_edge_layers=keep_edge_layers,
                keep_layers=keep_layers,
                progress=lambda msg: status.update(f"{what}: {msg}"),
            )
    except OpenLLMCloneError as exc:
        fail(exc.message)
    _say_what_was_done(tag)
    out.print(tag)


def _say_what_was_done(tag: str) -> None:
    """One line on stderr: the time taken and the layers left unquantized."""
    import bentoml

    meta: dict[str, Any] = dict(bentoml.models.get(tag).info.metadata)
    facts = meta.get("gptq") or meta.get("bitsandbytes") or {}
    kept = facts.get("full_precision_layers")
    console.print(
        f"{tag}: {meta.get('quantization')} in {facts.get('seconds', '?')} s; decoder layers "
        f"kept in full precision: {kept if kept else 'none'}",
        soft_wrap=True,
    )


def _default_name(source: str) -> str:
    from pathlib import Path

    return Path(source).resolve().name.lower().replace("_", "-") or "adapter"


@app.command("models")
def models() -> None:
    """List models and adapters in the store (tag, architecture, the runner that serves it,
    parameters, size, dtype, quantization)."""
    from openllm_clone.store import list_models

    table = Table(
        "tag",
        "kind",
        "architecture",
        "runner",
        "parameters",
        "size",
        "dtype",
        "quantization",
        "source",
    )
    for m in list_models():
        params = f"{m.parameters / 1e6:.1f} M" if m.parameters else "-"
        quant = "-" if m.kind == "adapter" else m.quantization
        table.add_row(
            m.tag,
            m.kind,
            m.architecture,
            m.runner,
            params,
            human_bytes(m.size_bytes),
            m.dtype,
            quant,
            m.source,
        )
    out.print(table)
