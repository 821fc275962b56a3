"""``openllm-clone keys add|list|revoke``: edit a keys file (tenants, scopes, limits).

The server re-reads the file when it changes: no restart. A new key is printed once and
only its salted hash is written.
"""

from __future__ import annotations

import json

import typer

from openllm_clone.errors import OpenLLMCloneError
from openllm_clone.tenants import KeyEntry, hash_key, load_keys, new_key, save_keys

from ._common import console, fail, out

app = typer.Typer(help="Manage tenants' API keys in a keys file (see --keys-file of start).")

FILE_OPTION = typer.Option(
    ...,
    "--keys-file",
    "-f",
    envvar="OPENLLM_CLONE_KEYS_FILE",
    help="The keys file (TOML, or YAML by its .yaml/.yml extension).",
)


def _load(path: str) -> list[KeyEntry]:
    try:
        return load_keys(path)
    except OpenLLMCloneError as exc:
        fail(exc.message)


@app.command("add")
def add(
    tenant: str = typer.Argument(..., help="Tenant name (the unit of limits and usage)."),
    keys_file: str = FILE_OPTION,
    adapter: list[str] = typer.Option(
        [], "--adapter", "-a", help="Adapter name or glob pattern the key may use (repeat)."
    ),
    no_base_model: bool = typer.Option(
        False, "--no-base-model", help="The key may use only its adapters."
    ),
    admin: bool = typer.Option(False, "--admin", help="May manage adapters and read usage."),
    requests_per_minute: int | None = typer.Option(None, "--rpm", min=1),
    tokens_per_minute: int | None = typer.Option(None, "--tpm", min=1),
    max_concurrent: int | None = typer.Option(None, "--max-concurrent", min=1),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1, help="Per request."),
    weight: float = typer.Option(1.0, "--weight", min=0.001, help="Fair-share weight."),
) -> None:
    """Add a key for TENANT and print it (once: only its hash is stored)."""
    entries = _load(keys_file)
    key_id, key = new_key()
    try:
        entry = KeyEntry(
            tenant=tenant,
            key_id=key_id,
            key_hash=hash_key(key),
            adapters=list(adapter),
            base_model=not no_base_model,
            admin=admin,
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
            max_concurrent=max_concurrent,
            max_tokens=max_tokens,
            weight=weight,
        )
    except ValueError as exc:
        fail(str(exc), 2)
    save_keys(keys_file, [*entries, entry])
    console.print(f"added key {key_id} for tenant {tenant!r}; it is shown only now:")
    out.print(key, highlight=False, soft_wrap=True)


@app.command("list")
def list_keys(
    keys_file: str = FILE_OPTION,
    as_json: bool = typer.Option(False, "--json", help="One JSON object per key."),
) -> None:
    """List the keys (never the keys themselves: id, tenant, scope, limits)."""
    entries = _load(keys_file)
    if as_json:
        for e in entries:
            out.print(json.dumps(e.public()), highlight=False, soft_wrap=True)
        return
    from rich.table import Table

    table = Table(
        "key id", "tenant", "adapters", "base", "admin", "rpm", "tpm", "conc", "max tok", "weight"
    )
    for e in entries:
        table.add_row(
            e.key_id,
            e.tenant,
            ", ".join(e.adapters) or "-",
            "yes" if e.base_model else "no",
            "yes" if e.admin else "no",
            *(
                str(v) if v is not None else "-"
                for v in (
                    e.requests_per_minute,
                    e.tokens_per_minute,
                    e.max_concurrent,
                    e.max_tokens,
                )
            ),
            f"{e.weight:g}",
        )
    out.print(table)


@app.command("revoke")
def revoke(
    key_id: str = typer.Argument(..., help="The key's id (from `keys list`), or a whole key."),
    keys_file: str = FILE_OPTION,
) -> None:
    """Remove a key; a running server refuses it from its next request on."""
    entries = _load(keys_file)
    wanted = key_id.split("-")[1] if key_id.startswith("oc-") and key_id.count("-") >= 2 else key_id
    kept = [e for e in entries if e.key_id != wanted]
    if len(kept) == len(entries):
        fail(f"no key {wanted!r} in {keys_file}")
    save_keys(keys_file, kept)
    console.print(f"revoked key {wanted}")
