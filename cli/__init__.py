"""The ``openllm-clone`` command line: one Typer app per command group."""

from __future__ import annotations

import typer

from . import adapters_cmd, build, check, keys, models, query, serve, usage

__all__ = ["app", "main"]

app = typer.Typer(
    name="openllm-clone",
    help="Serve one base model with many LoRA adapters (BentoML, OpenAI-compatible API).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(serve.app)
app.add_typer(query.app)
app.add_typer(models.app)
app.add_typer(build.app)
app.add_typer(check.app)
app.add_typer(usage.app)
app.add_typer(adapters_cmd.app, name="adapters")
app.add_typer(keys.app, name="keys")


def main() -> None:
    """Console-script entry point."""
    app()
