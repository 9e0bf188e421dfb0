"""The commands that talk HTTP to a running daemon: ``health``, ``metrics top``,
``traces status`` and ``smoke``. They import neither the daemon nor OpenTelemetry nor
litellm, so they start fast."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from chatvault_cli import render
from chatvault_cli.common import (
    DEGRADED,
    NOT_AUTHORIZED,
    OK,
    UNHEALTHY,
    UNREACHABLE,
    AdminKeyOption,
    ConfigOption,
    InsecureOption,
    JsonOption,
    TimeoutOption,
    UrlOption,
    err,
    out,
    print_json,
)

metrics_app = typer.Typer(help="Live figures from the daemon's /metrics.")
traces_app = typer.Typer(help="The daemon's trace export.")


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


@contextlib.contextmanager
def _daemon_refusals() -> Iterator[None]:
    """A daemon that refuses the admin key exits 4; one that is not there, or is not a
    ChatVault, exits 3. Either way one line on stderr."""
    from chatvault_cli.client import NotChatVault, Unreachable

    try:
        yield
    except PermissionError as exc:
        render.error(err, str(exc))
        raise typer.Exit(NOT_AUTHORIZED) from None
    except (Unreachable, NotChatVault) as exc:
        render.error(err, str(exc))
        raise typer.Exit(UNREACHABLE) from None


def health_exit_code(status: str, fail_on: str) -> int:
    if status == "unhealthy":
        return UNHEALTHY
    if status == "degraded" and fail_on == "degraded":
        return DEGRADED
    return OK


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
    """The daemon's health: exit 0 healthy (or degraded below --fail-on), 1 degraded, 2 unhealthy, 3 unreachable, 4 a key it will not send."""
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
            print_json(
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

    with _daemon_refusals():
        try:
            previous = scrape()
            if once:
                _time.sleep(interval)
                payload = snapshot_payload(previous, scrape())
                if json_out:
                    print_json(payload)
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

    client = _client(url, admin_key, config, timeout, insecure)
    with _daemon_refusals():
        status = client.traces_status()
    if json_out:
        print_json(
            {
                "enabled": status.get("enabled", False),
                **{k: status.get(k) for k in TRACE_STATUS_KEYS},
            }
        )
    else:
        out.print(render.traces_panel(status, _time.time()))


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
