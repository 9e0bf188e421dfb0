"""Finding the daemon and its admin key without being told, and without the daemon's code.

The URL comes from ``--url``, else ``CHATVAULT_URL``, else the config file's
``server.host``/``server.port``. The admin key comes from ``--admin-key``, else
``CHATVAULT_ADMIN_KEY``, else the daemon's state file in the config's data folder.
Reading the YAML here (rather than importing ``daemon.config``) keeps HTTP-only
commands light.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatvault_cli.safety import check_key, strip_key

DEFAULT_URL = "http://127.0.0.1:8000"


def default_config_path(environ: Mapping[str, str]) -> Path:
    return Path(environ.get("CHATVAULT_CONFIG") or "config.yaml")


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):  # `chatvault config check` is where that is reported
        return {}
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    admin_key: str | None
    admin_key_source: str  # flag | environment | state file | none


def _url_from_config(raw: dict[str, Any], environ: Mapping[str, str]) -> str | None:
    server = raw.get("server")
    host = environ.get("CHATVAULT_HOST")
    port = environ.get("CHATVAULT_PORT")
    if isinstance(server, dict):
        host = host or server.get("host")
        port = port or server.get("port")
    if host is None and port is None:
        return None
    host = str(host or "127.0.0.1")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"  # listening everywhere includes loopback
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port or 8000}"


def _state_file(config_path: Path, raw: dict[str, Any]) -> Path:
    data_dir = Path(str(raw.get("data_dir") or "data"))
    if not data_dir.is_absolute():
        data_dir = config_path.resolve().parent / data_dir
    return data_dir / "state.json"


def find_target(
    *,
    url: str | None,
    admin_key: str | None,
    config_path: Path | None,
    environ: Mapping[str, str] | None = None,
) -> Target:
    """Raises BadKey (naming where the key came from, never the key) for an unusable key."""
    environ = os.environ if environ is None else environ
    path = config_path or default_config_path(environ)
    url = url or environ.get("CHATVAULT_URL")
    # Surrounding whitespace is never part of a key: a secret mounted from a file or
    # pasted into a variable often ends in a newline.
    admin_key = strip_key(admin_key)
    if admin_key:
        check_key(admin_key, "--admin-key")
    from_env = strip_key(environ.get("CHATVAULT_ADMIN_KEY"))
    if url and (admin_key or from_env) and config_path is None:
        # Everything is known already: skip reading the config (it costs a YAML import).
        if admin_key:
            return Target(url.rstrip("/"), admin_key, "flag")
        assert from_env is not None
        return Target(url.rstrip("/"), check_key(from_env, "CHATVAULT_ADMIN_KEY"), "environment")
    raw = _read_yaml(path) if path.exists() else {}
    resolved_url = url or _url_from_config(raw, environ)
    resolved_url = (resolved_url or DEFAULT_URL).rstrip("/")
    if admin_key:
        return Target(resolved_url, admin_key, "flag")
    auth = raw.get("auth") if isinstance(raw.get("auth"), dict) else {}
    env_name = str((auth or {}).get("admin_key_env") or "CHATVAULT_ADMIN_KEY")
    given = strip_key(environ.get(env_name))
    if given:
        return Target(resolved_url, check_key(given, env_name), "environment")
    from chatvault_cli.defaults import user_data_dir, uses_builtin

    if uses_builtin(config_path, environ):  # no config: the built-in default's data folder
        state_file = user_data_dir(environ) / "state.json"
    else:
        state_file = _state_file(path, raw)
    key: object = None
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        key = state.get("admin_key") if isinstance(state, dict) else None
    except (OSError, ValueError):
        pass
    key = strip_key(key) if isinstance(key, str) else None
    if key:
        return Target(resolved_url, check_key(key, f"the state file {state_file}"), "state file")
    return Target(resolved_url, None, "none")
