"""What the CLI's commands share: their options, exit codes, consoles, JSON output and
the one config loader."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from chatvault_cli import defaults, render
from chatvault_cli.locate import default_config_path

# Exit codes of the commands that talk to a daemon (documented in the README).
OK, DEGRADED, UNHEALTHY, UNREACHABLE, NOT_AUTHORIZED = 0, 1, 2, 3, 4

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="Config file [default: $CHATVAULT_CONFIG or ./config.yaml]"
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url", help="Daemon URL [default: $CHATVAULT_URL, else the config's host and port]"
    ),
]
AdminKeyOption = Annotated[
    str | None,
    typer.Option(
        "--admin-key", help="[default: $CHATVAULT_ADMIN_KEY, else the daemon's state file]"
    ),
]
TimeoutOption = Annotated[
    float, typer.Option("--timeout", min=0.1, help="Seconds to wait for the daemon")
]
InsecureOption = Annotated[
    bool,
    typer.Option(
        "--insecure",
        help="Allow sending keys over plain HTTP to a host that is not this machine",
    ),
]

out = render.make_console()
err = render.make_console(stderr=True)


def print_json(payload: Any) -> None:
    from chatvault_cli.safety import redact  # a server may echo the key it was sent

    sys.stdout.write(redact(json.dumps(payload, indent=2, sort_keys=False)) + "\n")


def load_settings(config: Path | None) -> Any:
    """Load and validate the config, or exit 2 with the bad key's path."""
    from daemon.config import ConfigError, load_config

    if defaults.uses_builtin(config, os.environ):
        return defaults.builtin_settings(os.environ)
    path = config or default_config_path(os.environ)
    try:
        return load_config(path)
    except ConfigError as exc:
        render.error(
            err, str(exc), hint="chatvault config check --config PATH explains every problem"
        )
        raise typer.Exit(2) from None


def check_cache_backend(settings: Any) -> None:
    """A response cache on a Redis that cannot be reached is a configuration error (at
    run time the cache only degrades); raises ConfigError with the key's path."""
    if not settings.cache.enabled or settings.cache.backend != "redis":
        return
    from daemon.cache import check_backend
    from daemon.config import ConfigError

    problem = check_backend(settings)
    if problem is not None:
        raise ConfigError(problem)
