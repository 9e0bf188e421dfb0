"""The ``chatvault`` command.

Commands that only talk HTTP to a running daemon (health, metrics, traces, smoke)
import neither the daemon nor OpenTelemetry nor litellm, so they start fast. The
offline admin commands (serve, keys, usage, config) import the daemon lazily.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from chatvault_cli import render
from chatvault_cli.locate import default_config_path

app = typer.Typer(
    name="chatvault",
    help="ChatVault: an observable, OpenAI-compatible LLM gateway.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="Create, list and revoke API keys (against the ledger database).")
config_app = typer.Typer(help="Check the configuration.")
app.add_typer(keys_app, name="keys")
app.add_typer(config_app, name="config")

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="Config file [default: $CHATVAULT_CONFIG or ./config.yaml]"
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]

out = render.make_console()
err = render.make_console(stderr=True)


def _print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def _settings(config: Path | None) -> Any:
    """Load and validate the config, or exit 2 with the bad key's path."""
    from daemon.config import ConfigError, load_config

    path = config or default_config_path(os.environ)
    try:
        return load_config(path)
    except ConfigError as exc:
        render.error(
            err, str(exc), hint="chatvault config check --config PATH explains every problem"
        )
        raise typer.Exit(2) from None


# -- serve -----------------------------------------------------------------------


@app.command()
def serve(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="Listen address [default: server.host]")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port [default: server.port]")] = None,
    workers: Annotated[int | None, typer.Option(min=1, max=64, help="Worker processes")] = None,
) -> None:
    """Run the gateway in the foreground until SIGTERM or Ctrl-C."""
    settings = _settings(config)
    # The daemon manages prometheus_client's multiprocess directory itself (one per
    # daemon, for --workers > 1); an inherited one would mix other processes' values.
    # It must go before prometheus_client is imported.
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    from daemon.server import StartupError
    from daemon.server import serve as run

    overrides = {
        k: v for k, v in (("host", host), ("port", port), ("workers", workers)) if v is not None
    }
    if overrides:
        settings = settings.model_copy(
            update={"server": settings.server.model_copy(update=overrides)}
        )
    try:
        status = run(settings)
    except StartupError as exc:
        render.error(err, str(exc))
        raise typer.Exit(3) from None
    raise typer.Exit(status)


# -- config ----------------------------------------------------------------------


@config_app.command("check")
def config_check(config: ConfigOption = None, json_out: JsonOption = False) -> None:
    """Validate the config; exit 1 with the path of each bad key."""
    from chatvault_cli.offline import config_summary
    from daemon.config import ConfigError, load_config

    path = config or default_config_path(os.environ)
    try:
        settings = load_config(path)
    except ConfigError as exc:
        if json_out:
            _print_json({"valid": False, "path": str(path), "errors": str(exc).splitlines()})
        else:
            render.error(err, str(exc))
        raise typer.Exit(1) from None
    models, warnings = config_summary(settings, dict(os.environ))
    if json_out:
        _print_json(
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

    settings = _settings(config)
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
        _print_json(key)
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

    keys = offline.keys_list(_settings(config), include_revoked)
    if json_out:
        _print_json(keys)
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

    record = offline.keys_revoke(_settings(config), key)
    if record is None:
        render.error(err, f"no active key with id or name {key!r}", hint="chatvault keys list")
        raise typer.Exit(1)
    if json_out:
        _print_json(record)
    else:
        render.success(out, f"revoked {record['id']} ({record['name']})")


# -- usage -----------------------------------------------------------------------


@app.command()
def usage(
    since: Annotated[str, typer.Option(help="How far back: 24h, 7d, 30m, or a date")] = "24h",
    by: Annotated[str, typer.Option(help="model | key | day")] = "model",
    fmt: Annotated[str, typer.Option("--format", help="table | json | csv")] = "table",
    config: ConfigOption = None,
) -> None:
    """Requests, tokens and cost from the ledger."""
    import time

    from chatvault_cli import offline

    if by not in ("model", "key", "day"):
        render.error(err, f"--by {by!r}: use model, key or day")
        raise typer.Exit(2)
    if fmt not in ("table", "json", "csv"):
        render.error(err, f"--format {fmt!r}: use table, json or csv")
        raise typer.Exit(2)
    try:
        start = offline.parse_since(since, time.time())
    except ValueError as exc:
        render.error(err, str(exc))
        raise typer.Exit(2) from None
    rows = offline.usage(_settings(config), start, by)  # type: ignore[arg-type]
    if fmt == "json":
        _print_json(rows)
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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
