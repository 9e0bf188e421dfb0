"""The offline admin commands, against the config and the ledger database: ``config
check``, ``keys create|list|revoke`` and ``usage``. They import the daemon lazily."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from chatvault_cli import render
from chatvault_cli.common import (
    ConfigOption,
    JsonOption,
    check_cache_backend,
    err,
    load_settings,
    out,
    print_json,
)
from chatvault_cli.locate import default_config_path

keys_app = typer.Typer(help="Create, list and revoke API keys (against the ledger database).")
config_app = typer.Typer(help="Check the configuration.")


# -- config ----------------------------------------------------------------------


@config_app.command("check")
def config_check(config: ConfigOption = None, json_out: JsonOption = False) -> None:
    """Validate the config; exit 1 with the path of each bad key."""
    from chatvault_cli.offline import config_summary
    from daemon.config import ConfigError, load_config

    path = config or default_config_path(os.environ)
    try:
        settings = load_config(path)
        check_cache_backend(settings)
    except ConfigError as exc:
        if json_out:
            print_json({"valid": False, "path": str(path), "errors": str(exc).splitlines()})
        else:
            render.error(err, str(exc))
        raise typer.Exit(1) from None
    models, warnings = config_summary(settings, dict(os.environ))
    if json_out:
        print_json(
            {
                "valid": True,
                "path": str(path),
                "models": [{"name": n, "provider": p, "price": pr} for n, p, pr in models],
                "warnings": warnings,
            }
        )
    else:
        render.config_ok(out, str(path), models, warnings)


# -- keys ------------------------------------------------------------------------


def _models_option(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(m.strip() for m in value.split(",") if m.strip())
    return names or None


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="A name to recognise the key by")],
    user_type: Annotated[
        str, typer.Option("--user-type", help="standard | service | admin")
    ] = "standard",
    rpm: Annotated[int | None, typer.Option(help="Requests per minute")] = None,
    tpm: Annotated[int | None, typer.Option(help="Tokens per minute")] = None,
    budget_usd: Annotated[
        float | None, typer.Option("--budget-usd", help="Total spend allowed, USD")
    ] = None,
    models: Annotated[
        str | None, typer.Option(help="Comma-separated models it may use [default: all]")
    ] = None,
    config: ConfigOption = None,
    json_out: JsonOption = False,
) -> None:
    """Create a key; it is printed once and stored only as a hash."""
    from chatvault_cli import offline
    from daemon.ledger.base import DuplicateKeyName

    settings = load_settings(config)
    try:
        key = offline.keys_create(
            settings,
            name=name,
            user_type=user_type,
            rpm=rpm,
            tpm=tpm,
            budget_usd=budget_usd,
            models=_models_option(models),
        )
    except ValueError as exc:
        render.error(err, str(exc))
        raise typer.Exit(2) from None
    except DuplicateKeyName:
        render.error(err, f"an active key is already named {name!r}", hint="pick another --name")
        raise typer.Exit(1) from None
    if json_out:
        print_json(key)
    else:
        render.new_key(out, key)


@keys_app.command("list")
def keys_list(
    include_revoked: Annotated[bool, typer.Option("--all", help="Include revoked keys")] = False,
    config: ConfigOption = None,
    json_out: JsonOption = False,
) -> None:
    """List keys (never the keys themselves: only their prefixes)."""
    from chatvault_cli import offline

    keys = offline.keys_list(load_settings(config), include_revoked)
    if json_out:
        print_json(keys)
    else:
        render.keys_table(out, keys)


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="The key's id or name")],
    config: ConfigOption = None,
    json_out: JsonOption = False,
) -> None:
    """Revoke a key; the running daemon stops accepting it within a second or two."""
    from chatvault_cli import offline

    record = offline.keys_revoke(load_settings(config), key)
    if record is None:
        render.error(err, f"no active key with id or name {key!r}", hint="chatvault keys list")
        raise typer.Exit(1)
    if json_out:
        print_json(record)
    else:
        render.success(out, f"revoked {record['id']} ({record['name']})")


# -- usage -----------------------------------------------------------------------


def usage(
    since: Annotated[str, typer.Option(help="How far back: 24h, 7d, 30m, or a date")] = "24h",
    by: Annotated[str, typer.Option(help="model | key | day | hour")] = "model",
    fmt: Annotated[str, typer.Option("--format", help="table | json | csv")] = "table",
    config: ConfigOption = None,
) -> None:
    """Requests, tokens and cost from the ledger."""
    import time

    from chatvault_cli import offline

    if by not in ("model", "key", "day", "hour"):
        render.error(err, f"--by {by!r}: use model, key, day or hour")
        raise typer.Exit(2)
    if fmt not in ("table", "json", "csv"):
        render.error(err, f"--format {fmt!r}: use table, json or csv")
        raise typer.Exit(2)
    try:
        start = offline.parse_since(since, time.time())
    except ValueError as exc:
        render.error(err, str(exc))
        raise typer.Exit(2) from None
    rows = offline.usage(load_settings(config), start, by)  # type: ignore[arg-type]
    if fmt == "json":
        print_json(rows)
    elif fmt == "csv":
        import csv

        writer = csv.DictWriter(
            sys.stdout,
            fieldnames=[by, "requests", "errors", "input_tokens", "output_tokens", "cost_usd"],
            lineterminator="\n",
        )
        writer.writeheader()
        writer.writerows(rows)
    else:
        render.usage_table(out, by, rows, since)
