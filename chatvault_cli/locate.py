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
    environ = os.environ if environ is None else environ
    path = config_path or default_config_path(environ)
    url = url or environ.get("CHATVAULT_URL")
    if url and (admin_key or environ.get("CHATVAULT_ADMIN_KEY")) and config_path is None:
        # Everything is known already: skip reading the config (it costs a YAML import).
        given = admin_key or environ["CHATVAULT_ADMIN_KEY"]
        return Target(url.rstrip("/"), given, "flag" if admin_key else "environment")
    raw = _read_yaml(path) if path.exists() else {}
    resolved_url = url or _url_from_config(raw, environ)
    resolved_url = (resolved_url or DEFAULT_URL).rstrip("/")
    if admin_key:
        return Target(resolved_url, admin_key, "flag")
    auth = raw.get("auth") if isinstance(raw.get("auth"), dict) else {}
    env_name = str((auth or {}).get("admin_key_env") or "CHATVAULT_ADMIN_KEY")
    if environ.get(env_name):
        return Target(resolved_url, environ[env_name], "environment")
    state_file = _state_file(path, raw)
    key: object = None
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        key = state.get("admin_key") if isinstance(state, dict) else None
    except (OSError, ValueError):
        pass
    if isinstance(key, str) and key:
        return Target(resolved_url, key, "state file")
    return Target(resolved_url, None, "none")
