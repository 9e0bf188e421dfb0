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

from chatvault_cli import defaults, render
from chatvault_cli.db import db_app
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
metrics_app = typer.Typer(help="Live figures from the daemon's /metrics.")
traces_app = typer.Typer(help="The daemon's trace export.")
app.add_typer(keys_app, name="keys")
app.add_typer(config_app, name="config")
app.add_typer(metrics_app, name="metrics")
app.add_typer(traces_app, name="traces")
app.add_typer(db_app, name="db")
app.command("init")(defaults.init)

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


def _print_json(payload: Any) -> None:
    from chatvault_cli.safety import redact  # a server may echo the key it was sent

    sys.stdout.write(redact(json.dumps(payload, indent=2, sort_keys=False)) + "\n")


def _settings(config: Path | None) -> Any:
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


def _check_cache_backend(settings: Any) -> None:
    """A response cache on a Redis that cannot be reached is a configuration error (at
    run time the cache only degrades); raises ConfigError with the key's path."""
    if not settings.cache.enabled or settings.cache.backend != "redis":
        return
    from daemon.cache import check_backend
    from daemon.config import ConfigError

    problem = check_backend(settings)
    if problem is not None:
        raise ConfigError(problem)


# -- serve -----------------------------------------------------------------------


@app.command()
def serve(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="Listen address [default: server.host]")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port [default: server.port]")] = None,
    workers: Annotated[int | None, typer.Option(min=1, max=64, help="Worker processes")] = None,
) -> None:
    """Run the gateway in the foreground until SIGTERM or Ctrl-C."""
    from daemon.config import ConfigError

    settings = _settings(config)
    try:
        _check_cache_backend(settings)
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


# -- config ----------------------------------------------------------------------


@config_app.command("check")
def config_check(config: ConfigOption = None, json_out: JsonOption = False) -> None:
    """Validate the config; exit 1 with the path of each bad key."""
    from chatvault_cli.offline import config_summary
    from daemon.config import ConfigError, load_config

    path = config or default_config_path(os.environ)
    try:
        settings = load_config(path)
        _check_cache_backend(settings)
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


# -- commands that talk to a running daemon ------------------------------------------


def _client(
    url: str | None,
    admin_key: str | None,
    config: Path | None,
    timeout: float,
    insecure: bool,
    api_key: str | None = None,
) -> Any:
    """The daemon's client; exit 4 for a malformed key or keys bound for plain HTTP (not
    2, which ``health`` means as unhealthy), 3 for a bad URL."""
    from chatvault_cli.client import DaemonClient, Unreachable, exposes_keys, insecure_message
    from chatvault_cli.locate import find_target
    from chatvault_cli.safety import BadKey

    try:
        target = find_target(url=url, admin_key=admin_key, config_path=config)
    except BadKey as exc:
        render.error(err, str(exc))
        raise typer.Exit(NOT_AUTHORIZED) from None
    try:
        client = DaemonClient(
            target.url, admin_key=target.admin_key, timeout=timeout, insecure=insecure
        )
    except Unreachable as exc:
        render.error(err, str(exc))
        raise typer.Exit(UNREACHABLE) from None
    keys = [
        k for k, held in (("the admin key", target.admin_key), ("the API key", api_key)) if held
    ]
    if keys and not insecure and exposes_keys(client.url):
        render.error(err, insecure_message(client.url, " and ".join(keys)))
        raise typer.Exit(NOT_AUTHORIZED)
    return client


def health_exit_code(status: str, fail_on: str) -> int:
    if status == "unhealthy":
        return UNHEALTHY
    if status == "degraded" and fail_on == "degraded":
        return DEGRADED
    return OK


@app.command()
def health(
    url: UrlOption = None,
    admin_key: AdminKeyOption = None,
    config: ConfigOption = None,
    json_out: JsonOption = False,
    watch: Annotated[
        float | None, typer.Option("--watch", min=0.2, help="Redraw every N seconds until Ctrl-C")
    ] = None,
    fail_on: Annotated[
        str,
        typer.Option("--fail-on", help="degraded | unhealthy: the status that fails the command"),
    ] = "unhealthy",
    refresh: Annotated[
        bool, typer.Option("--refresh", help="Ask the daemon for a fresh check round first (admin)")
    ] = False,
    timeout: TimeoutOption = 5.0,
    insecure: InsecureOption = False,
) -> None:
    """The daemon's health: exit 0 healthy (or degraded below --fail-on), 1 degraded, 2 unhealthy, 3 unreachable."""
    from chatvault_cli.client import NotChatVault, Unreachable

    if fail_on not in ("degraded", "unhealthy"):
        render.error(err, f"--fail-on {fail_on!r}: use degraded or unhealthy")
        raise typer.Exit(2)
    client = _client(url, admin_key, config, timeout, insecure)
    detailed = client.admin_key is not None

    def check() -> tuple[int, Any]:
        try:
            _, body = client.health(refresh=refresh)
        except (Unreachable, NotChatVault) as exc:
            return UNREACHABLE, str(exc)
        return health_exit_code(body["status"], fail_on), body

    def show(code: int, result: Any) -> Any:
        if code == UNREACHABLE:
            return render.unreachable(result)
        return render.health_view(result, client.url, detailed=detailed)

    if watch is None:
        code, result = check()
        if json_out:
            _print_json(
                result
                if code != UNREACHABLE
                else {"status": "unreachable", "url": client.url, "error": result}
            )
        elif code == UNREACHABLE:
            render.error(err, result, hint="is the daemon running? chatvault serve, or pass --url")
        else:
            out.print(show(code, result))
            if result["status"] == "degraded" and code == OK:
                render.warning(
                    err,
                    "degraded: serving, but see the components above (--fail-on degraded makes this exit 1)",
                )
        raise typer.Exit(code)
    import time as _time

    code = OK
    try:
        with render.live(out) as live:
            while True:
                code, result = check()
                live.update(show(code, result), refresh=True)
                _time.sleep(watch)
    except KeyboardInterrupt:
        pass
    raise typer.Exit(code)


@metrics_app.command("top")
def metrics_top(
    url: UrlOption = None,
    admin_key: AdminKeyOption = None,
    config: ConfigOption = None,
    interval: Annotated[
        float, typer.Option("--interval", min=0.2, help="Seconds between scrapes")
    ] = 2.0,
    by: Annotated[str, typer.Option("--by", help="model | provider | user_type")] = "model",
    sort: Annotated[
        str, typer.Option("--sort", help="Column to sort by, largest first")
    ] = "requests_per_s",
    once: Annotated[
        bool, typer.Option("--once", help="Two scrapes --interval apart, one snapshot, exit")
    ] = False,
    json_out: JsonOption = False,
    timeout: TimeoutOption = 5.0,
    insecure: InsecureOption = False,
) -> None:
    """Live request, token, cost, error and latency rates, like top."""
    import time as _time

    from chatvault_cli import promtext, top
    from chatvault_cli.client import NotChatVault, Unreachable
    from chatvault_cli.safety import redact

    if by not in top.GROUPS:
        render.error(err, f"--by {by!r}: use {', '.join(top.GROUPS)}")
        raise typer.Exit(2)
    if sort not in top.SORTABLE:
        render.error(err, f"--sort {sort!r}: use one of {', '.join(top.SORTABLE)}")
        raise typer.Exit(2)
    client = _client(url, admin_key, config, timeout, insecure)
    trends = top.Trends(by)

    def scrape() -> Any:
        return top.reduce(promtext.parse(client.metrics_text()), by, _time.monotonic())

    def header(snapshot: Any) -> dict[str, Any]:
        info: dict[str, Any] = {"url": client.url, "in_flight": snapshot.in_flight}
        try:
            _, body = client.health()
            info["health"] = body["status"]
            info["uptime_seconds"] = (body.get("performance") or {}).get("uptime_seconds")
            tracing = client.traces_status()
            if not tracing.get("enabled"):
                info["tracing"] = "off"
            else:
                failing = (
                    tracing.get("last_failure") is not None
                    and (tracing.get("last_success") or 0) < tracing["last_failure"]
                )
                info["tracing"] = (
                    f"{'FAILING' if failing else 'ok'} ({tracing.get('spans_exported', 0):,} exported, {tracing.get('spans_dropped', 0):,} dropped)"
                )
        except (Unreachable, NotChatVault, PermissionError, *_BAD_ANSWER):
            pass  # the header is extra; the rates below are the point
        return info

    def snapshot_payload(first: Any, second: Any) -> dict[str, Any]:
        rows = top.sort_rows(top.rows(first, second, by), sort)
        return {
            "by": by,
            "interval_s": round(second.at - first.at, 3),
            **header(second),
            "rows": rows,
        }

    try:
        previous = scrape()
        if once:
            _time.sleep(interval)
            payload = snapshot_payload(previous, scrape())
            if json_out:
                _print_json(payload)
            else:
                out.print(render.top_view(payload["rows"], by, payload, interval))
            return
        if json_out:
            while True:
                _time.sleep(interval)
                current = scrape()
                line = json.dumps(snapshot_payload(previous, current))
                sys.stdout.write(redact(line) + "\n")
                sys.stdout.flush()
                previous = current
        with render.live(out, screen=out.is_terminal) as live:
            while True:
                _time.sleep(interval)
                current = scrape()
                payload = snapshot_payload(previous, current)
                trends.add(payload["rows"])
                view = render.top_view(payload["rows"], by, payload, interval, trends.view())
                live.update(view, refresh=True)
                previous = current
    except KeyboardInterrupt:
        return
    except PermissionError as exc:
        render.error(err, str(exc))
        raise typer.Exit(NOT_AUTHORIZED) from None
    except (Unreachable, NotChatVault) as exc:
        render.error(err, str(exc))
        raise typer.Exit(UNREACHABLE) from None
    except promtext.ParseError as exc:
        render.error(err, f"{client.url}/metrics is not valid Prometheus text: {exc}")
        raise typer.Exit(UNREACHABLE) from None


# What a malformed answer from a server raises while it is picked apart.
_BAD_ANSWER = (ValueError, KeyError, TypeError, AttributeError, IndexError)

TRACE_STATUS_KEYS = (
    "endpoint",
    "protocol",
    "spans_exported",
    "export_failures",
    "spans_failed",
    "spans_dropped",
    "queue_size",
    "queue_capacity",
    "last_success",
    "last_failure",
    "last_error",
)


@traces_app.command("status")
def traces_status(
    url: UrlOption = None,
    admin_key: AdminKeyOption = None,
    config: ConfigOption = None,
    json_out: JsonOption = False,
    timeout: TimeoutOption = 5.0,
    insecure: InsecureOption = False,
) -> None:
    """Where spans go and whether they get there: exported, failed, dropped, queue, last error."""
    import time as _time

    from chatvault_cli.client import NotChatVault, Unreachable

    client = _client(url, admin_key, config, timeout, insecure)
    try:
        status = client.traces_status()
    except PermissionError as exc:
        render.error(err, str(exc))
        raise typer.Exit(NOT_AUTHORIZED) from None
    except (Unreachable, NotChatVault) as exc:
        render.error(err, str(exc))
        raise typer.Exit(UNREACHABLE) from None
    if json_out:
        _print_json(
            {
                "enabled": status.get("enabled", False),
                **{k: status.get(k) for k in TRACE_STATUS_KEYS},
            }
        )
    else:
        out.print(render.traces_panel(status, _time.time()))


@app.command()
def smoke(
    url: UrlOption = None,
    key: Annotated[
        str | None,
        typer.Option(
            "--key",
            help="API key for the test calls [default: $CHATVAULT_API_KEY; never the admin key]",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="Model to call [default: the first the key may use]"),
    ] = None,
    admin_key: AdminKeyOption = None,
    config: ConfigOption = None,
    fail_on: Annotated[str, typer.Option("--fail-on", help="degraded | unhealthy")] = "unhealthy",
    timeout: TimeoutOption = 30.0,
    insecure: InsecureOption = False,
) -> None:
    """CI smoke check after a deploy: health, a completion, a stream, and proof they were accounted."""
    from chatvault_cli.safety import BadKey, check_key, strip_key
    from chatvault_cli.smoke import run_smoke

    # Not the admin key: test calls should spend through a key limited to a cheap model,
    # and the admin key should travel to as few places as possible.
    flag, env = strip_key(key), strip_key(os.environ.get("CHATVAULT_API_KEY"))
    try:
        api_key = check_key(flag, "--key") if flag else env and check_key(env, "CHATVAULT_API_KEY")
    except BadKey as exc:
        render.error(err, str(exc))
        raise typer.Exit(NOT_AUTHORIZED) from None
    if not api_key:
        render.error(
            err,
            "smoke needs an API key for its test calls: pass --key or set CHATVAULT_API_KEY "
            "(it does not use the admin key)",
        )
        raise typer.Exit(NOT_AUTHORIZED)
    client = _client(url, admin_key, config, timeout, insecure, api_key)
    checks = run_smoke(client, api_key=api_key, model=model, fail_on=fail_on)
    render.smoke_results(out, client.url, checks)
    raise typer.Exit(OK if all(ok for _, ok, _ in checks) else 1)


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
