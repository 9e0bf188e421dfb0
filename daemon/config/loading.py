"""Reading config.yaml: YAML, environment overrides, relative paths, and errors that name
the bad key's path."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from daemon.config.sections import LedgerConfig
from daemon.config.settings import Settings


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the bad key."""


def _format_location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _format_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        loc = _format_location(tuple(p for p in item["loc"] if p not in ("function-after",)))
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "required"
        # A model-level validator names the key itself ("model: required ...").
        if ": " in message and item["type"] == "value_error" and not message.startswith("not "):
            key, _, rest = message.partition(": ")
            if key.isidentifier():
                loc = f"{loc}.{key}" if loc else key
                message = rest
        lines.append(f"{loc}: {message}" if loc else message)
    return "\n".join(lines)


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    data_dir = Path(raw.get("data_dir") or "data")
    raw["data_dir"] = data_dir if data_dir.is_absolute() else base / data_dir
    ledger = raw.setdefault("ledger", {})
    if isinstance(ledger, dict):
        ledger.setdefault("url", LedgerConfig.model_fields["url"].default)
    if isinstance(ledger, dict) and isinstance(ledger.get("url"), str):
        url: str = ledger["url"]
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            ledger["url"] = "sqlite:///" + str(base / url.removeprefix("sqlite:///"))
        _resolve_journal_dir(ledger, base, raw["data_dir"])


def _resolve_journal_dir(ledger: dict[str, Any], base: Path, data_dir: Path) -> None:
    journal = ledger.get("journal_dir")
    if isinstance(journal, str | Path) and str(journal):
        path = Path(journal)
        ledger["journal_dir"] = path if path.is_absolute() else base / path
        return
    url = str(ledger["url"])
    if url.startswith("sqlite:") and "mode=ro" not in url:
        file = "/" + url.removeprefix("sqlite:").partition("?")[0].lstrip("/")
        ledger["journal_dir"] = Path(file + ".journal")
    else:
        ledger["journal_dir"] = data_dir / "ledger-journal"


def parse_config(raw: object, *, base: Path, source: Path | None = None) -> Settings:
    """Validate an already-parsed config mapping. Raises ConfigError."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("the top level must be a mapping of keys")
    raw = dict(raw)
    _resolve_paths(raw, base)
    if source is not None:
        raw["source"] = source
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate a config file. Raises ConfigError with the bad key's path.

    ``environ`` supplies overrides: CHATVAULT_HOST, CHATVAULT_PORT, CHATVAULT_LEDGER_URL,
    CHATVAULT_REDIS_URL.
    """
    environ = os.environ if environ is None else environ
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} not valid YAML") from None
    if isinstance(raw, dict):
        _apply_environ(raw, environ)
    try:
        return parse_config(raw, base=path.resolve().parent, source=path.resolve())
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def builtin_config(data_dir: Path, environ: Mapping[str, str] | None = None) -> Settings:
    """The settings used when there is no config file: the mock model, the SQLite ledger
    in ``data_dir`` (absolute), no tracing (no collector can be assumed). The same
    environment overrides apply as for a file."""
    raw: dict[str, Any] = {
        "data_dir": str(data_dir),
        "ledger": {"url": "sqlite:///" + str(data_dir / "chatvault.db")},
        "models": [
            {
                "name": "mock",
                "provider": "mock",
                "pricing": {"input_per_million": 0.15, "output_per_million": 0.60},
            }
        ],
        "monitoring": {"tracing": {"enabled": False}},
    }
    _apply_environ(raw, os.environ if environ is None else environ)
    return parse_config(raw, base=data_dir)


def _apply_environ(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    server = raw.setdefault("server", {}) if isinstance(raw.get("server", {}), dict) else None
    if server is not None:
        if "CHATVAULT_HOST" in environ:
            server["host"] = environ["CHATVAULT_HOST"]
        if "CHATVAULT_PORT" in environ:
            server["port"] = environ["CHATVAULT_PORT"]
    if "CHATVAULT_LEDGER_URL" in environ:
        ledger = raw.setdefault("ledger", {})
        if isinstance(ledger, dict):
            ledger["url"] = environ["CHATVAULT_LEDGER_URL"]
    if "CHATVAULT_REDIS_URL" in environ:
        limits = raw.setdefault("limits", {})
        if isinstance(limits, dict):
            limits["redis_url"] = environ["CHATVAULT_REDIS_URL"]
