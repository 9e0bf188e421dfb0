"""What the CLI draws, on an injected console of fixed width."""

from __future__ import annotations

import io
import re
from typing import Any

from rich.console import Console

from chatvault_cli import render


def console(color: bool = False, width: int = 100) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(
        file=buffer, width=width, force_terminal=color, color_system="standard" if color else None
    ), buffer


HEALTH: dict[str, Any] = {
    "status": "degraded",
    "timestamp": 1.0,
    "version": "0.1.0",
    "components": {
        "database": {
            "status": "healthy",
            "message": "reads and writes work (0.4 ms)",
            "latency_ms": 0.4,
            "queue_depth": 3,
            "request_rows": 1200,
        },
        "configuration": {"status": "healthy", "message": "valid; 2 model entries"},
        "authentication": {
            "status": "healthy",
            "message": "4 active keys",
            "active_keys": 4,
            "admin_key_source": "state_file",
        },
        "metrics": {"status": "healthy", "message": "120 series", "series": 120},
        "tracing": {
            "status": "degraded",
            "message": "spans are not reaching the collector",
            "enabled": True,
            "spans_exported": 10,
            "export_failures": 2,
            "spans_dropped": 0,
            "queue_size": 5,
            "queue_capacity": 2048,
        },
        "external_apis": {
            "status": "degraded",
            "message": "unreachable: ollama localhost:11434",
            "upstreams": {"a": {"reachable": True, "latency_ms": 12.0}, "b": {"reachable": False}},
        },
        "models": {
            "status": "degraded",
            "message": "unavailable: llama3.2",
            "models": {"mock": {"available": True}, "llama3.2": {"available": False}},
        },
    },
    "performance": {"memory_usage_mb": 61.4, "cpu_percent": 1.8, "uptime_seconds": 3725},
}


def test_health_view_shows_components_figures_and_summary() -> None:
    c, buffer = console()
    c.print(render.health_view(HEALTH, "http://gw:8000", detailed=True))
    text = buffer.getvalue()
    for expected in (
        "database",
        "queue 3",
        "1,200 rows",
        "4 keys",
        "failed 2",
        "queue 5/2048",
        "1/2 reachable",
        "max 12 ms",
        "1/2 available",
        "up 1h02m",
        "rss 61.4 MB",
        "v0.1.0",
    ):
        assert expected in text, expected
    assert "\x1b[" not in text
    assert "admin key" not in text.split("overall")[1]  # no hint in the detailed view


def test_health_view_colours_statuses_on_a_terminal() -> None:
    c, buffer = console(color=True)
    c.print(render.status_text("unhealthy"), render.status_text("healthy"))
    text = buffer.getvalue()
    assert "\x1b[1;31m" in text and "\x1b[1;32m" in text


def test_public_health_view_says_how_to_see_more() -> None:
    c, buffer = console()
    public = {
        "status": "healthy",
        "timestamp": 1.0,
        "components": {n: {"status": "healthy"} for n in HEALTH["components"]},
    }
    c.print(render.health_view(public, "http://gw:8000", detailed=False))
    assert "pass the admin key" in buffer.getvalue()


def test_top_view_rows_and_header() -> None:
    c, buffer = console(width=120)
    row = {
        "model": "gpt-4o-mini",
        "requests_per_s": 12.5,
        "tokens_in_per_s": 1200.0,
        "tokens_out_per_s": 340.0,
        "cost_per_hour_usd": 0.0123,
        "error_rate": 0.02,
        "p50_latency_s": 0.42,
        "p95_latency_s": 1.8,
        "p50_ttft_s": 0.12,
        "requests_total": 12345,
        "tokens_total": 987654,
        "cost_total_usd": 1.234,
    }
    c.print(
        render.top_view(
            [row],
            "model",
            {
                "url": "http://gw",
                "health": "healthy",
                "uptime_seconds": 60,
                "in_flight": 3,
                "tracing": "ok (5 exported, 0 dropped)",
            },
            2,
        )
    )
    text = buffer.getvalue()
    for expected in (
        "gpt-4o-mini",
        "12.50",
        "1,200/340",
        "0.0123",
        "2.0",
        "420ms",
        "1.80s",
        "120ms",
        "12,345",
        "$1.23",
        "in flight 3",
        "up 1m00s",
        "every 2s",
    ):
        assert expected in text, expected


def test_top_view_without_traffic() -> None:
    c, buffer = console()
    c.print(render.top_view([], "provider", {"url": "http://gw"}, 1))
    assert "no model requests yet" in buffer.getvalue()


def test_traces_panel_failing_and_disabled() -> None:
    c, buffer = console()
    status = {
        "enabled": True,
        "endpoint": "http://collector:4317",
        "protocol": "grpc",
        "spans_exported": 100,
        "export_failures": 3,
        "spans_failed": 40,
        "spans_dropped": 7,
        "queue_size": 512,
        "queue_capacity": 2048,
        "last_success": 1000.0,
        "last_failure": 1090.0,
        "last_error": "StatusCode.UNAVAILABLE",
    }
    c.print(render.traces_panel(status, now=1100.0))
    text = buffer.getvalue()
    for expected in (
        "failing",
        "http://collector:4317",
        "3 exports (40 spans)",
        "7 spans",
        "512/2048 (25%)",
        "1m40s ago",
        "UNAVAILABLE",
    ):
        assert expected in text, expected
    c, buffer = console()
    c.print(render.traces_panel({"enabled": False}, now=0))
    assert "disabled" in buffer.getvalue()


def test_names_from_clients_are_shown_verbatim_not_as_markup() -> None:
    c, buffer = console()
    row = {
        "model": "[/]",
        "requests": 1,
        "errors": 0,
        "input_tokens": 1,
        "output_tokens": 1,
        "cost_usd": 0.0,
    }
    render.usage_table(c, "model", [row], "[bold]24h")
    render.keys_table(
        c,
        [
            {
                "id": "key_1",
                "name": "[red]x[/]",
                "prefix": "cv-ab…",
                "user_type": "standard",
                "models": None,
            }
        ],
    )
    text = buffer.getvalue()
    assert "[/]" in text and "[bold]24h" in text and "[red]x[/]" in text


def test_smoke_results() -> None:
    c, buffer = console()
    render.smoke_results(
        c, "http://gw", [("health", True, "healthy"), ("completion", False, "HTTP 404: nope")]
    )
    text = buffer.getvalue()
    assert "✓ health" in text and "✗ completion" in text and "FAIL: 1/2" in text


# -- pictures: usage bar chart and top sparklines (recording console, fixed width) -------


def recording(width: int) -> Console:
    return Console(record=True, width=width, file=io.StringIO(), color_system=None)


def usage_row(period: str, cost: float, tokens_in: int, tokens_out: int) -> dict[str, Any]:
    return {
        "day" if len(period) == 10 else "hour": period,
        "requests": 3,
        "errors": 0,
        "input_tokens": tokens_in,
        "output_tokens": tokens_out,
        "cost_usd": cost,
    }


DAYS = [
    usage_row("2026-01-01", 1.0, 8000, 2000),
    usage_row("2026-01-03", 0.5, 4000, 1000),  # 2026-01-02 had no traffic
    usage_row("2026-01-04", 0.001, 10, 0),
]


def test_usage_by_day_draws_bars_beside_the_table_when_wide() -> None:
    c = recording(170)
    render.usage_table(c, "day", DAYS, "7d")
    text = c.export_text()
    assert any("Usage since 7d" in x and "Cost and tokens per day" in x for x in text.splitlines())
    assert re.search(rf"(?<!█)█{{{render.BAR_WIDTH}}}\s+\$1\.00 ", text)  # the busiest day
    assert re.search(rf"(?<!█)█{{{render.BAR_WIDTH // 2}}}\s+\$0\.5000 ", text)  # half
    assert "10.0k" in text and "5,000" in text  # tokens: in + out
    # The quiet day is drawn, empty, between the others, in time order.
    chart = text[text.index("Cost and tokens") :]
    assert chart.index("2026-01-01") < chart.index("2026-01-02") < chart.index("2026-01-03")
    assert "▏" in text  # a tiny day still shows


def test_usage_chart_goes_below_the_table_when_narrow() -> None:
    c = recording(80)
    render.usage_table(c, "day", DAYS, "7d")
    text = c.export_text()
    lines = text.splitlines()
    assert not any("Usage since" in x and "Cost and tokens" in x for x in lines)
    assert text.index("total") < text.index("Cost and tokens per day")
    assert max(len(x) for x in lines) <= 80


def test_usage_by_hour_and_by_model() -> None:
    c = recording(170)
    hours = [
        usage_row("2026-01-01 10:00", 0.2, 100, 100),
        usage_row("2026-01-01 13:00", 0.4, 100, 300),
    ]
    render.usage_table(c, "hour", hours, "24h")
    text = c.export_text()
    assert "Cost and tokens per hour" in text
    for hour in ("10:00", "11:00", "12:00", "13:00"):
        assert f"2026-01-01 {hour}" in text, hour
    c = recording(170)
    render.usage_table(c, "model", [usage_row("2026-01-01", 0.2, 1, 1) | {"model": "m"}], "24h")
    assert "Cost and tokens" not in c.export_text()  # no time axis, no chart


def test_bar_lengths() -> None:
    assert render.bar(1, 1, 8) == "█" * 8
    assert render.bar(1, 2, 8) == "█" * 4
    assert render.bar(1, 16, 1) == "▏" and render.bar(1, 1000, 8) == "▏"
    assert render.bar(0, 1) == "" and render.bar(1, 0) == ""


def test_sparkline_scales_from_zero_to_the_peak() -> None:
    assert render.sparkline([0, 1, 2, 4], 6) == "  ▁▃▅█"
    assert render.sparkline([0, 0], 3) == " ▁▁"
    assert render.sparkline(list(range(40)), 4) == "▇███"  # only the last width values


def test_top_view_draws_trends_over_the_watch_window() -> None:
    from chatvault_cli.top import Trends

    trends = Trends("model", size=8)
    base = {
        "tokens_in_per_s": 1.0,
        "tokens_out_per_s": 1.0,
        "error_rate": 0.0,
        "p50_latency_s": 0.01,
        "p95_latency_s": 0.02,
        "p50_ttft_s": None,
        "requests_total": 10,
        "cost_total_usd": 0.1,
    }
    for rate in (1.0, 2.0, 4.0, 8.0):
        rows = [
            {**base, "model": "busy", "requests_per_s": rate, "cost_per_hour_usd": rate / 10},
            {**base, "model": "idle", "requests_per_s": 0.0, "cost_per_hour_usd": 0.0},
        ]
        trends.add(rows)
    c = recording(140)
    c.print(render.top_view(rows, "model", {"url": "http://gw"}, 2, trends.view(), trend_width=8))
    text = c.export_text()
    assert "req/s trend" in text and "$/h trend" in text
    (busy,) = [x for x in text.splitlines() if "busy" in x]
    (idle,) = [x for x in text.splitlines() if "idle" in x]
    assert busy.count("    ▂▃▅█") == 2  # req/s and $/h, right-aligned in the window
    assert idle.count("    ▁▁▁▁") == 2
    c = recording(140)
    c.print(render.top_view(rows, "model", {"url": "http://gw"}, 2))
    assert "trend" not in c.export_text()  # --once: one interval, nothing to draw
