"""Everything the CLI shows a person. The only module that imports rich.

Each function takes the ``Console`` to draw on, so tests pass one of fixed width that
writes to a buffer. Without a terminal (or with ``NO_COLOR``) rich writes no ANSI codes.
Whatever the server sent goes through ``safety.clean`` (rich keeps ESC sequences in
``Text``), and every message through ``safety.redact`` (no key is ever printed).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.measure import Measurement
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from chatvault_cli.safety import clean, redact, scrub


def make_console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, no_color="NO_COLOR" in os.environ, highlight=False)


def live(console: Console, screen: bool = False) -> Live:
    """A region redrawn in place (``--watch``, ``metrics top``)."""
    return Live(console=console, auto_refresh=False, screen=screen)


def safe(message: str) -> Text:
    """A message for the terminal: no escape sequences, no keys."""
    return Text(clean(redact(message)))


def unreachable(message: str) -> Text:
    return Text(f"✖ unreachable: {clean(redact(message))}", style="bold red")


def error(console: Console, message: str, hint: str | None = None) -> None:
    # soft_wrap: one message, one line, whatever the width (logs and pipes grep it).
    console.print(Text("error: ", style="bold red") + safe(message), soft_wrap=True)
    if hint:
        console.print(Text("hint: ", style="yellow") + safe(hint), soft_wrap=True)


def success(console: Console, message: str) -> None:
    console.print(Text("✓ ", style="bold green") + safe(message))


def warning(console: Console, message: str) -> None:
    console.print(Text("! ", style="bold yellow") + safe(message))


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M")


def _money(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "$0"
    if value < 0.01:
        return f"${value:.6f}"
    return f"${value:,.4f}" if value < 1 else f"${value:,.2f}"


def new_key(console: Console, key: dict[str, Any]) -> None:
    body = Text()
    body.append(key["key"], style="bold")
    body.append("\n\nid ", style="dim")
    body.append(key["id"])
    body.append("   name ", style="dim")
    body.append(key["name"])
    body.append("   user type ", style="dim")
    body.append(key["user_type"])
    limits = ", ".join(
        f"{label} {value}"
        for label, value in (
            ("rpm", key.get("rpm")),
            ("tpm", key.get("tpm")),
            (
                "budget",
                _money(key.get("budget_usd")) if key.get("budget_usd") is not None else None,
            ),
            ("models", ",".join(key["models"]) if key.get("models") else None),
        )
        if value is not None
    )
    if limits:
        body.append("\nlimits ", style="dim")
        body.append(limits)
    console.print(Panel(body, title="New API key", border_style="green", expand=False))
    warning(console, "This is the only time the key is shown. Store it now.")


def keys_table(console: Console, keys: Sequence[dict[str, Any]]) -> None:
    if not keys:
        console.print("No keys yet. Create one with: chatvault keys create --name NAME")
        return
    table = Table(title="API keys", title_justify="left")
    table.add_column("id", no_wrap=True)
    table.add_column("name")
    table.add_column("key", no_wrap=True)
    table.add_column("type")
    table.add_column("limits")
    table.add_column("spent", justify="right")
    table.add_column("models")
    table.add_column("created", no_wrap=True)
    for k in keys:
        revoked = k.get("revoked_at") is not None
        limits = [
            f"{label} {value}"
            for label, value in (("rpm", k.get("rpm")), ("tpm", k.get("tpm")))
            if value is not None
        ]
        if k.get("budget_usd") is not None:
            limits.append(f"budget {_money(k['budget_usd'])}")
        table.add_row(
            Text(k["id"], style="dim red strike" if revoked else ""),
            Text(k["name"]),
            Text(k["prefix"]),
            Text(k["user_type"]),
            Text(", ".join(limits) or "none"),
            _money(k.get("spend_usd")),
            Text(",".join(k["models"]) if k.get("models") else "all"),
            _when(k.get("created_at")),
        )
    console.print(table)


def usage_table(console: Console, by: str, rows: Sequence[dict[str, Any]], since: str) -> None:
    """The table; by day or hour, with a bar chart beside it (below it when too narrow)."""
    if not rows:
        console.print(Text(f"No requests in the ledger since {since}."))
        return
    table = _usage_table(by, rows, since)
    if by not in ("day", "hour"):
        console.print(table)
        return
    chart = usage_chart(by, rows)
    gap = 3
    widths = [Measurement.get(console, console.options, r).maximum for r in (table, chart)]
    if sum(widths) + gap <= console.width:
        side = Table.grid(padding=(0, gap))
        side.add_column(vertical="top")
        side.add_column(vertical="top")
        side.add_row(table, chart)
        console.print(side)
    else:
        console.print(table)
        console.print(chart)


def _usage_table(by: str, rows: Sequence[dict[str, Any]], since: str) -> Table:
    table = Table(title=Text(f"Usage since {since}, by {by}"), title_justify="left")
    table.add_column(by, no_wrap=by in ("day", "hour"))
    for column in ("requests", "errors", "input tokens", "output tokens", "cost"):
        table.add_column(column, justify="right")
    totals = [0, 0, 0, 0, 0.0]
    for r in rows:
        table.add_row(
            Text(clean(str(r[by]))),
            f"{r['requests']:,}",
            f"{r['errors']:,}",
            f"{r['input_tokens']:,}",
            f"{r['output_tokens']:,}",
            _money(r["cost_usd"]),
        )
        for i, name in enumerate(
            ("requests", "errors", "input_tokens", "output_tokens", "cost_usd")
        ):
            totals[i] += r[name]
    table.add_section()
    table.add_row(
        Text("total", style="bold"),
        f"{int(totals[0]):,}",
        f"{int(totals[1]):,}",
        f"{int(totals[2]):,}",
        f"{int(totals[3]):,}",
        _money(float(totals[4])),
    )
    return table


BAR_WIDTH = 20
CHART_PERIODS = 48  # the most recent periods drawn; the table has them all
_EIGHTHS = " ▏▎▍▌▋▊▉"
_PERIOD_FORMAT = {"day": "%Y-%m-%d", "hour": "%Y-%m-%d %H:00"}


def bar(value: float, peak: float, width: int = BAR_WIDTH) -> str:
    """A horizontal bar of ``value`` against ``peak`` in eighths of a cell."""
    if value <= 0 or peak <= 0:
        return ""
    eighths = round(min(value / peak, 1.0) * width * 8)
    full, rest = divmod(eighths, 8)
    return ("█" * full + (_EIGHTHS[rest] if rest else "")) or "▏"  # any traffic shows


def _fill_periods(by: str, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows in time order with the quiet periods between them added as zeros."""
    fmt = _PERIOD_FORMAT[by]
    step = dt.timedelta(days=1) if by == "day" else dt.timedelta(hours=1)
    try:
        known = {dt.datetime.strptime(str(r[by]), fmt): r for r in rows}
    except ValueError:  # not the ledger's own period labels: draw what is there
        return list(rows)
    if not known:
        return []
    out = []
    at, last = min(known), max(known)
    while at <= last:
        out.append(known.get(at) or {by: at.strftime(fmt), "cost_usd": 0.0, "tokens": 0})
        at += step
    return out


def usage_chart(by: str, rows: Sequence[dict[str, Any]]) -> Table:
    """Cost and tokens per period as bars, each scaled to its own busiest period."""
    filled = [
        {**r, "tokens": int(r.get("input_tokens", 0)) + int(r.get("output_tokens", 0))}
        if "tokens" not in r
        else r
        for r in _fill_periods(by, rows)
    ]
    shown = filled[-CHART_PERIODS:]
    title = f"Cost and tokens per {by}"
    if len(shown) < len(filled):
        title += f" (the last {len(shown)} of {len(filled)})"
    chart = Table(
        title=Text(title), title_justify="left", box=None, pad_edge=False, show_header=True
    )
    chart.add_column(by, no_wrap=True)
    chart.add_column("cost", no_wrap=True, min_width=BAR_WIDTH)
    chart.add_column("", justify="right", no_wrap=True)
    chart.add_column("tokens", no_wrap=True, min_width=BAR_WIDTH)
    chart.add_column("", justify="right", no_wrap=True)
    peak_cost = max((float(r["cost_usd"]) for r in shown), default=0.0)
    peak_tokens = max((float(r["tokens"]) for r in shown), default=0.0)
    for r in shown:
        chart.add_row(
            Text(clean(str(r[by]))),
            Text(bar(float(r["cost_usd"]), peak_cost), style="green"),
            _money(float(r["cost_usd"])),
            Text(bar(float(r["tokens"]), peak_tokens), style="cyan"),
            _tokens(int(r["tokens"])),
        )
    return chart


def _tokens(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1_000_000:.1f}M"
    return f"{n / 1000:.1f}k" if n >= 10_000 else f"{n:,}"


def config_ok(
    console: Console, path: str, models: Iterable[tuple[str, str, str]], warnings: Sequence[str]
) -> None:
    success(console, f"{path} is valid")
    table = Table(box=None, show_header=True, pad_edge=False)
    table.add_column("model")
    table.add_column("provider")
    table.add_column("price", justify="right")
    for name, provider, price in models:
        table.add_row(Text(name), Text(provider), Text(price))
    console.print(table)
    for message in warnings:
        warning(console, message)


# -- health --------------------------------------------------------------------------

STATUS_STYLE = {"healthy": "bold green", "degraded": "bold yellow", "unhealthy": "bold red"}
STATUS_MARK = {"healthy": "●", "degraded": "▲", "unhealthy": "✖"}


def status_text(status: str) -> Text:
    return Text(f"{STATUS_MARK.get(status, '?')} {status}", style=STATUS_STYLE.get(status, "bold"))


def _ms(value: Any) -> str | None:
    return f"{value:g} ms" if isinstance(value, int | float) else None


def key_figures(name: str, c: dict[str, Any]) -> str:
    """The one or two numbers an operator looks for in each component."""
    parts: list[str | None] = []
    if name == "database":
        parts = [
            _ms(c.get("latency_ms")),
            f"queue {c['queue_depth']}" if "queue_depth" in c else None,
            f"{c['request_rows']:,} rows" if isinstance(c.get("request_rows"), int) else None,
        ]
    elif name == "authentication":
        parts = [
            f"{c['active_keys']} keys" if "active_keys" in c else None,
            f"admin key: {c['admin_key_source']}" if c.get("admin_key_source") else None,
        ]
    elif name == "metrics":
        parts = [f"{c['series']} series" if "series" in c else None]
    elif name == "tracing" and c.get("enabled"):
        parts = [
            f"exported {c.get('spans_exported', 0)}",
            f"failed {c.get('export_failures', 0)}",
            f"dropped {c.get('spans_dropped', 0)}",
            f"queue {c.get('queue_size', 0)}/{c.get('queue_capacity', 0)}",
        ]
    elif name == "external_apis":
        ups = c.get("upstreams") or {}
        up = sum(1 for u in ups.values() if u.get("reachable"))
        latencies = [
            u["latency_ms"]
            for u in ups.values()
            if u.get("reachable") and u.get("latency_ms") is not None
        ]
        parts = [
            f"{up}/{len(ups)} reachable" if ups else None,
            f"max {max(latencies):g} ms" if latencies else None,
            "response cache unreachable"
            if (c.get("response_cache") or {}).get("reachable") is False
            else None,
        ]
    elif name == "models":
        models = c.get("models") or {}
        opened = [
            d.get("deployment", "?")
            for m in models.values()
            for d in m.get("deployments") or ()
            if (d.get("circuit") or {}).get("state") in ("open", "half_open")
        ]
        parts = [
            f"{sum(1 for m in models.values() if m.get('available'))}/{len(models)} available"
            if models
            else None,
            f"circuit open: {', '.join(opened)}" if opened else None,
        ]
    return ", ".join(p for p in parts if p)


def health_view(body: dict[str, Any], url: str, detailed: bool) -> Group:
    body = scrub(body)
    table = Table(title=Text(f"ChatVault health · {url}"), title_justify="left", expand=False)
    table.add_column("component", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("message", overflow="fold")
    table.add_column("figures", overflow="fold")
    for name, c in body.get("components", {}).items():
        if not isinstance(c, dict):
            c = {"status": "?", "message": str(c)}
        table.add_row(
            Text(name),
            status_text(c.get("status", "?")),
            Text(str(c.get("message", ""))),
            Text(key_figures(name, c)),
        )
    summary = Text()
    summary.append("overall ", style="dim")
    summary.append_text(status_text(body["status"]))
    perf = body.get("performance")
    if perf:
        summary.append(f"   up {_duration(perf.get('uptime_seconds'))}", style="dim")
        summary.append(
            f"   rss {perf.get('memory_usage_mb')} MB   cpu {perf.get('cpu_percent')}%", style="dim"
        )
    if body.get("version"):
        summary.append(f"   v{body['version']}", style="dim")
    lines: list[Any] = [table, summary]
    if not detailed:
        lines.append(
            Text(
                "statuses only: pass the admin key (--admin-key or CHATVAULT_ADMIN_KEY) for details",
                style="dim",
            )
        )
    return Group(*lines)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


# -- metrics top --------------------------------------------------------------------------


def _num(value: Any, fmt: str = "{:,.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def _seconds(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"


_SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float], width: int) -> str:
    """The last ``width`` values as block heights from zero to their peak, right-aligned."""
    values = [max(float(v), 0.0) for v in values[-width:]]
    peak = max(values, default=0.0)
    if peak <= 0:
        return (_SPARKS[0] * len(values)).rjust(width)
    top = len(_SPARKS) - 1
    return "".join(_SPARKS[round(v / peak * top)] for v in values).rjust(width)


def top_view(
    rows: Sequence[dict[str, Any]],
    by: str,
    header: dict[str, Any],
    interval: float,
    trends: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    trend_width: int = 16,
) -> Group:
    """``trends``: each row's past req/s and $/h over the watch window, drawn as sparklines."""
    rows, header = scrub(rows), scrub(header)
    head = Text()
    head.append("ChatVault top", style="bold")
    head.append(f" · {header['url']} · every {interval:g}s", style="dim")
    status = header.get("health")
    line = Text()
    if status:
        line.append("health ", style="dim")
        line.append_text(status_text(status))
    if header.get("uptime_seconds") is not None:
        line.append(f"   up {_duration(header['uptime_seconds'])}", style="dim")
    line.append(f"   in flight {int(header.get('in_flight', 0))}", style="dim")
    tracing = header.get("tracing")
    if tracing:
        line.append("   traces ", style="dim")
        line.append(tracing, style="green" if tracing.startswith("ok") else "yellow")
    table = Table(
        expand=False,
        header_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1),
        collapse_padding=True,
    )
    table.add_column(by, no_wrap=True, overflow="ellipsis", max_width=24)
    columns: tuple[str, ...] = ("req/s", "tok/s i/o", "$/h", "err%", "p50", "p95", "ttft")
    if trends is not None:
        columns = ("req/s", "req/s trend", "tok/s i/o", "$/h", "$/h trend", *columns[3:])
    columns = (*columns, "reqs", "$ total")
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    for r in rows:
        err = r.get("error_rate")
        rates: list[Any] = [
            _num(r["requests_per_s"], "{:,.2f}"),
            f"{_num(r['tokens_in_per_s'], '{:,.0f}')}/{_num(r['tokens_out_per_s'], '{:,.0f}')}",
            _num(r["cost_per_hour_usd"], "{:,.4f}"),
        ]
        if trends is not None:
            req_history, cost_history = trends.get(str(r[by]), ((), ()))
            rates.insert(1, Text(sparkline(req_history, trend_width), style="cyan"))
            rates.insert(4, Text(sparkline(cost_history, trend_width), style="green"))
        table.add_row(
            Text(str(r[by])),
            *rates,
            Text(_num(None if err is None else err * 100), style="red" if err else ""),
            _seconds(r["p50_latency_s"]),
            _seconds(r["p95_latency_s"]),
            _seconds(r["p50_ttft_s"]),
            f"{r['requests_total']:,}",
            _money(r["cost_total_usd"]),
        )
    if not rows:
        table.add_row("(no model requests yet)", *[""] * len(columns))
    return Group(head, line, table)


# -- traces status ------------------------------------------------------------------------


def _age(ts: Any, now: float) -> str:
    if not isinstance(ts, int | float):
        return "never"
    return f"{_duration(max(now - ts, 0))} ago"


def traces_panel(status: dict[str, Any], now: float) -> Panel:
    status = scrub(status)
    if not status.get("enabled"):
        return Panel(
            Text("tracing is disabled (monitoring.tracing.enabled or OTEL_SDK_DISABLED)"),
            title="Trace export",
            expand=False,
        )
    body = Table.grid(padding=(0, 2))
    body.add_column(style="dim")
    body.add_column()
    failing = (
        status.get("last_failure") is not None
        and (status.get("last_success") or 0) < status["last_failure"]
    )
    state = Text("failing", style="bold red") if failing else Text("ok", style="bold green")
    capacity = status.get("queue_capacity") or 0
    fill = f"{status.get('queue_size', 0)}/{capacity}" + (
        f" ({status.get('queue_size', 0) / capacity:.0%})" if capacity else ""
    )
    for label, value in (
        ("state", state),
        ("endpoint", status.get("endpoint")),
        ("protocol", status.get("protocol")),
        ("exported", f"{status.get('spans_exported', 0):,} spans"),
        (
            "failed",
            f"{status.get('export_failures', 0):,} exports ({status.get('spans_failed', 0):,} spans)",
        ),
        ("dropped", f"{status.get('spans_dropped', 0):,} spans"),
        ("queue", fill),
        ("last success", _age(status.get("last_success"), now)),
        ("last error", status.get("last_error") or "-"),
    ):
        body.add_row(label, value if isinstance(value, Text) else Text(str(value)))
    return Panel(
        body, title="Trace export", expand=False, border_style="red" if failing else "green"
    )


# -- smoke ------------------------------------------------------------------------------


def smoke_results(console: Console, url: str, checks: Sequence[tuple[str, bool, str]]) -> None:
    console.print(Text(f"ChatVault smoke check · {url}", style="bold"))
    for name, ok, detail in checks:
        line = Text("  ✓ " if ok else "  ✗ ", style="bold green" if ok else "bold red")
        line.append(clean(name))
        if detail:
            line.append(f"  {clean(redact(detail))}", style="dim")
        console.print(line)
    passed = sum(1 for _, ok, _ in checks if ok)
    verdict = "PASS" if passed == len(checks) else "FAIL"
    console.print(
        Text(
            f"{verdict}: {passed}/{len(checks)} checks passed",
            style="bold green" if verdict == "PASS" else "bold red",
        )
    )
