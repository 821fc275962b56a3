"""``openllm-clone adapters list|load|unload``: manage adapters on a running server."""

from __future__ import annotations

import typer
from rich.table import Table

from openllm_clone.client import APIError, HTTPClient

from ._common import API_KEY_OPTION, ENDPOINT_OPTION, fail, human_bytes, out

app = typer.Typer(help="Manage LoRA adapters on a running server.", no_args_is_help=True)


@app.command("list")
def list_(endpoint: str = ENDPOINT_OPTION, api_key: str | None = API_KEY_OPTION) -> None:
    """List the server's adapters."""
    try:
        with HTTPClient(endpoint, api_key=api_key) as client:
            adapters = client.list_adapters()
    except APIError as exc:
        fail(str(exc))
    table = Table("name", "kind", "state", "rank", "targets", "size", "pinned", "served", "source")
    for a in adapters:
        state = a["state"]
        if a.get("error"):
            state = f"{state}: {a['error']}"
        table.add_row(
            a["name"],
            a.get("kind") or "-",
            state,
            str(a.get("rank") or "-"),
            ",".join(a.get("target_modules") or []) or "-",
            human_bytes(a["size_bytes"]) if a.get("size_bytes") else "-",
            "yes" if a["pinned"] else "",
            str(a["requests_served"]),
            a["source"],
        )
    out.print(table)


@app.command("load")
def load(
    name: str = typer.Argument(..., help="Name requests will use."),
    source: str = typer.Argument(..., help="Adapter folder (on the server) or store tag."),
    pinned: bool = typer.Option(False, help="Never evict it."),
    force: bool = typer.Option(False, help="Accept an adapter made for another base model."),
    endpoint: str = ENDPOINT_OPTION,
    api_key: str | None = API_KEY_OPTION,
) -> None:
    """Load an adapter into the running server."""
    try:
        with HTTPClient(endpoint, api_key=api_key) as client:
            info = client.load_adapter(name, source, pinned=pinned, force=force)
    except APIError as exc:
        fail(str(exc))
    out.print(f"{info['name']}: {info['state']} (rank {info.get('rank')})")


@app.command("unload")
def unload(
    name: str = typer.Argument(...),
    endpoint: str = ENDPOINT_OPTION,
    api_key: str | None = API_KEY_OPTION,
) -> None:
    """Unload an adapter once its in-flight requests finish."""
    try:
        with HTTPClient(endpoint, api_key=api_key) as client:
            client.unload_adapter(name)
    except APIError as exc:
        fail(str(exc))
    out.print(f"{name}: unloaded")
