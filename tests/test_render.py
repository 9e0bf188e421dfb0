"""What the CLI draws, on an injected console of fixed width."""

from __future__ import annotations

import io
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
