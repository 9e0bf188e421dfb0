"""The ``chatvault`` command: the app, ``serve``, and the commands of the other modules.

Commands that only talk HTTP to a running daemon (``remote.py``: health, metrics,
traces, smoke) import neither the daemon nor OpenTelemetry nor litellm, so they start
fast. The offline admin commands (serve; ``admin.py``: keys, usage, config; ``db.py``)
import the daemon lazily.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from chatvault_cli import admin, defaults, remote, render
from chatvault_cli.common import ConfigOption, check_cache_backend, err, load_settings
from chatvault_cli.db import db_app

app = typer.Typer(
    name="chatvault",
    help="ChatVault: an observable, OpenAI-compatible LLM gateway.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def serve(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="Listen address [default: server.host]")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port [default: server.port]")] = None,
    workers: Annotated[int | None, typer.Option(min=1, max=64, help="Worker processes")] = None,
) -> None:
    """Run the gateway in the foreground until SIGTERM or Ctrl-C."""
    from daemon.config import ConfigError

    settings = load_settings(config)
    try:
        check_cache_backend(settings)
    except ConfigError as exc:
        render.error(err, str(exc))
        raise typer.Exit(2) from None
    if settings.source is None:  # the built-in default: say where its data and key are
        defaults.announce(settings, os.environ)
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


# In the order `chatvault --help` lists them: commands, then groups.
app.command()(serve)
app.command()(remote.health)
app.command()(remote.smoke)
app.command()(admin.usage)
app.command("init")(defaults.init)
app.add_typer(remote.metrics_app, name="metrics")
app.add_typer(remote.traces_app, name="traces")
app.add_typer(admin.keys_app, name="keys")
app.add_typer(admin.config_app, name="config")
app.add_typer(db_app, name="db")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        from chatvault_cli.safety import REDACTED, redact

        if REDACTED in redact(str(exc)):
            # A traceback would print the key in the exception's message: one line instead.
            render.error(err, f"{type(exc).__name__}: {exc}")
            sys.exit(1)
        from chatvault_cli.offline import LedgerUnavailable  # only reached by offline commands

        if not isinstance(exc, LedgerUnavailable):
            raise
        render.error(err, str(exc), hint="check ledger.url in the config, or CHATVAULT_LEDGER_URL")
        sys.exit(1)
