"""Working without a config file: the built-in default, and ``chatvault init``.

With no ``config.yaml`` (and no ``--config`` or ``CHATVAULT_CONFIG``), the offline
commands and ``chatvault serve`` use the built-in default: the mock model and the
SQLite ledger under the user's data folder, per the XDG convention
(``$XDG_DATA_HOME/chatvault``, else ``~/.local/share/chatvault``). ``chatvault init``
writes the commented config the repository ships (packaged as
``default_config.yaml``) to start from instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer

from chatvault_cli import render


def user_data_dir(environ: Mapping[str, str]) -> Path:
    """Where the built-in default keeps its ledger and state file."""
    base = environ.get("XDG_DATA_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "share"
    return root / "chatvault"


def uses_builtin(config: Path | None, environ: Mapping[str, str]) -> bool:
    """True when nothing names a config and ./config.yaml does not exist."""
    return (
        config is None and not environ.get("CHATVAULT_CONFIG") and not Path("config.yaml").exists()
    )


def builtin_settings(environ: Mapping[str, str]) -> Any:
    from daemon.config import builtin_config

    return builtin_config(user_data_dir(environ), environ)


def announce(settings: Any, environ: Mapping[str, str]) -> None:
    """Tell the operator what they are running and where its data and admin key are."""
    console = render.make_console(stderr=True)
    env_name = settings.auth.admin_key_env
    key = f"${env_name}" if environ.get(env_name, "").strip() else str(settings.state_file)
    for line in (
        "no config.yaml here: serving the built-in default (the mock model)",
        f"  data:      {settings.data_dir}",
        f"  admin key: {key}",
        "  `chatvault init` writes a commented config.yaml to start from",
    ):
        console.print(render.safe(line), soft_wrap=True)


def default_config_text() -> str:
    return resources.files("chatvault_cli").joinpath("default_config.yaml").read_text("utf-8")


def init(
    path: Annotated[
        Path,
        typer.Argument(help="File to write; a folder gets config.yaml inside it"),
    ] = Path("config.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file")] = False,
) -> None:
    """Write a commented config.yaml to start from (never over an existing file without --force)."""
    target = path / "config.yaml" if path.is_dir() else path
    err = render.make_console(stderr=True)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # "x" refuses an existing file atomically: no window between a check and the write.
        with target.open("w" if force else "x", encoding="utf-8") as f:
            f.write(default_config_text())
    except FileExistsError:
        render.error(err, f"{target} already exists", hint="--force overwrites it")
        raise typer.Exit(1) from None
    except OSError as exc:
        render.error(err, f"{target}: {exc.strerror or exc}")
        raise typer.Exit(1) from None
    render.success(
        render.make_console(),
        f"wrote {target}; check it with `chatvault config check --config {target}`, "
        f"run it with `chatvault serve --config {target}`",
    )
