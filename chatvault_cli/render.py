"""Everything the CLI shows a person. The only module that imports rich.

Each function takes the ``Console`` to draw on, so tests pass one of fixed width that
writes to a buffer. Without a terminal (or with ``NO_COLOR``) rich writes no ANSI codes.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text


def make_console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, no_color="NO_COLOR" in os.environ, highlight=False)


def error(console: Console, message: str, hint: str | None = None) -> None:
    console.print(Text("error: ", style="bold red") + Text(message))
    if hint:
        console.print(Text("hint: ", style="yellow") + Text(hint))


def success(console: Console, message: str) -> None:
    console.print(Text("✓ ", style="bold green") + Text(message))


def warning(console: Console, message: str) -> None:
    console.print(Text("! ", style="bold yellow") + Text(message))


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M")


def _money(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "$0"
    if value < 0.01:
        return f"${value:.6f}"
    return f"${value:,.4f}" if value < 1 else f"${value:,.2f}"


def new_key(console: Console, key: dict[str, Any]) -> None:
    body = Text()
    body.append(key["key"], style="bold")
    body.append("\n\nid ", style="dim")
    body.append(key["id"])
    body.append("   name ", style="dim")
    body.append(key["name"])
    body.append("   user type ", style="dim")
    body.append(key["user_type"])
    limits = ", ".join(
        f"{label} {value}"
        for label, value in (
            ("rpm", key.get("rpm")),
            ("tpm", key.get("tpm")),
            (
                "budget",
                _money(key.get("budget_usd")) if key.get("budget_usd") is not None else None,
            ),
            ("models", ",".join(key["models"]) if key.get("models") else None),
        )
        if value is not None
    )
    if limits:
        body.append("\nlimits ", style="dim")
        body.append(limits)
    console.print(Panel(body, title="New API key", border_style="green", expand=False))
    warning(console, "This is the only time the key is shown. Store it now.")


def keys_table(console: Console, keys: Sequence[dict[str, Any]]) -> None:
    if not keys:
        console.print("No keys yet. Create one with: chatvault keys create --name NAME")
        return
    table = Table(title="API keys", title_justify="left")
    table.add_column("id", no_wrap=True)
    table.add_column("name")
    table.add_column("key", no_wrap=True)
    table.add_column("type")
    table.add_column("limits")
    table.add_column("spent", justify="right")
    table.add_column("models")
    table.add_column("created", no_wrap=True)
    for k in keys:
        revoked = k.get("revoked_at") is not None
        limits = [
            f"{label} {value}"
            for label, value in (("rpm", k.get("rpm")), ("tpm", k.get("tpm")))
            if value is not None
        ]
        if k.get("budget_usd") is not None:
            limits.append(f"budget {_money(k['budget_usd'])}")
        table.add_row(
            Text(k["id"], style="dim red strike" if revoked else ""),
            k["name"],
            k["prefix"],
            k["user_type"],
            ", ".join(limits) or "none",
            _money(k.get("spend_usd")),
            ",".join(k["models"]) if k.get("models") else "all",
            _when(k.get("created_at")),
        )
    console.print(table)


def usage_table(console: Console, by: str, rows: Sequence[dict[str, Any]], since: str) -> None:
    if not rows:
        console.print(f"No requests in the ledger since {since}.")
        return
    table = Table(title=f"Usage since {since}, by {by}", title_justify="left")
    table.add_column(by)
    for column in ("requests", "errors", "input tokens", "output tokens", "cost"):
        table.add_column(column, justify="right")
    totals = [0, 0, 0, 0, 0.0]
    for r in rows:
        table.add_row(
            r[by],
            f"{r['requests']:,}",
            f"{r['errors']:,}",
            f"{r['input_tokens']:,}",
            f"{r['output_tokens']:,}",
            _money(r["cost_usd"]),
        )
        for i, name in enumerate(
            ("requests", "errors", "input_tokens", "output_tokens", "cost_usd")
        ):
            totals[i] += r[name]
    table.add_section()
    table.add_row(
        Text("total", style="bold"),
        f"{int(totals[0]):,}",
        f"{int(totals[1]):,}",
        f"{int(totals[2]):,}",
        f"{int(totals[3]):,}",
        _money(float(totals[4])),
    )
    console.print(table)


def config_ok(
    console: Console, path: str, models: Iterable[tuple[str, str, str]], warnings: Sequence[str]
) -> None:
    success(console, f"{path} is valid")
    table = Table(box=None, show_header=True, pad_edge=False)
    table.add_column("model")
    table.add_column("provider")
    table.add_column("price", justify="right")
    for name, provider, price in models:
        table.add_row(name, provider, price)
    console.print(table)
    for message in warnings:
        warning(console, message)


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()
