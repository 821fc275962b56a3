"""``openllm-clone usage LOG``: requests and tokens per day, tenant and adapter, from the
usage log a server writes with ``--usage-log``."""

from __future__ import annotations

import json
import os

import typer

from openllm_clone.limits import summarize_usage

from ._common import fail, out

app = typer.Typer()


@app.command("usage")
def usage(
    log: str = typer.Argument(..., help="The usage log (start --usage-log)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per row."),
) -> None:
    """Sum a usage log per day (UTC), tenant and adapter."""
    if not os.path.isfile(log):
        fail(f"no usage log at {log}")
    rows = summarize_usage(log)
    if as_json:
        for row in rows:
            out.print(json.dumps(row), highlight=False, soft_wrap=True)
        return
    from rich.table import Table

    table = Table(
        "day", "tenant", "adapter", "requests", "errors", "cancelled", "prompt", "completion"
    )
    for r in rows:
        table.add_row(
            r["day"],
            r["tenant"],
            r["adapter"] or "(base)",
            *(
                str(r[k])
                for k in (
                    "requests",
                    "errors",
                    "cancelled",
                    "prompt_tokens",
                    "completion_tokens",
                )
            ),
        )
    out.print(table)
