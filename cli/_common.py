"""Helpers shared by the CLI commands."""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import typer
from rich.console import Console

from openllm_clone.settings import Settings

console = Console(stderr=True)
out = Console()

ENDPOINT_OPTION = typer.Option(
    "http://127.0.0.1:3000",
    "--endpoint",
    "-e",
    envvar="OPENLLM_CLONE_ENDPOINT",
    help="Server address.",
)
API_KEY_OPTION = typer.Option(
    None, "--api-key", envvar="OPENLLM_CLONE_API_KEY", help="Bearer key for the server."
)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print an error and exit."""
    console.print(f"[bold red]error:[/] {message}")
    sys.exit(code)


def settings_or_fail(fields: dict[str, Any]) -> Settings:
    """Settings from command-line values, or exit 2 with pydantic's reason."""
    try:
        return Settings.model_validate(fields)
    except ValueError as exc:
        fail(str(exc), 2)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
