"""The operator CLI against real daemons: exit codes, JSON shapes, discovery, lightness."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from bench.otlp import OTLPReceiver
from tests.helpers import (
    ADMIN_KEY,
    Daemon,
    ServerThread,
    base_config,
    cli,
    client_for,
    free_port,
    ledger_rows,
    row_cost,
    running,
    wait_for,
    write_config,
)

ENV = {"CHATVAULT_ADMIN_KEY": ADMIN_KEY}
QUICK_HEALTH = {
    "tracing": {"enabled": False},
    "health": {"probe_interval_s": 3600, "probe_timeout_s": 0.5},
}


def dead_model(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "provider": "openai",
        "model": "m",
        "api_base": f"http://127.0.0.1:{free_port()}/v1",
    }


def health_config(models: list[dict[str, Any]]) -> dict[str, Any]:
    c = base_config(monitoring=QUICK_HEALTH)
    c["models"] = models
    return c


def served(daemon: Daemon, route: str) -> int:
    """How many requests to ``route`` the daemon has answered, from its access log."""
    count = 0
    for line in daemon.log().splitlines():
        try:
            count += json.loads(line).get("route") == route
        except ValueError:
            continue
    return count


def refresh(daemon: Daemon) -> None:
    httpx.get(
        daemon.url + "/health?refresh=true",
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
        timeout=10,
    )


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with running(
        tmp_path_factory.mktemp("cli-healthy"),
        health_config(
            [
                {
                    "name": "mock",
                    "provider": "mock",
                    "pricing": {"input_per_million": 0.15, "output_per_million": 0.6},
                }
            ]
        ),
    ) as d:
        yield d


def test_health_healthy_exits_0_with_a_table_and_no_ansi(healthy: Daemon) -> None:
    result = cli("health", "--url", healthy.url, env=ENV)
    assert result.returncode == 0, result.stderr
    for name in (
        "database",
        "configuration",
        "authentication",
        "metrics",
        "tracing",
        "external_apis",
        "models",
    ):
        assert name in result.stdout
    assert "overall" in result.stdout and "healthy" in result.stdout
    assert "\x1b[" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_health_json_is_the_daemons_body(healthy: Daemon) -> None:
    result = cli("health", "--url", healthy.url, "--json", env=ENV)
    body = json.loads(result.stdout)
    assert body["status"] == "healthy" and set(body["performance"]) == {
        "memory_usage_mb",
        "cpu_percent",
        "uptime_seconds",
        "event_loop_lag",
    }
    assert len(body["components"]) == 7


def test_health_degraded_and_fail_on(tmp_path: Path) -> None:
    with running(
        tmp_path, health_config([{"name": "mock", "provider": "mock"}, dead_model("remote")])
    ) as daemon:
        refresh(daemon)
        default = cli("health", "--url", daemon.url, env=ENV)
        assert default.returncode == 0
        assert "degraded" in default.stdout and "degraded" in default.stderr  # the warning
        strict = cli("health", "--url", daemon.url, "--fail-on", "degraded", env=ENV)
        assert strict.returncode == 1


def test_health_unhealthy_exits_2(tmp_path: Path) -> None:
    with running(tmp_path, health_config([dead_model("a")])) as daemon:
        refresh(daemon)
        result = cli("health", "--url", daemon.url, env=ENV)
        assert result.returncode == 2
        assert "unhealthy" in result.stdout


def test_health_unreachable_or_not_chatvault_exits_3() -> None:
    result = cli("health", "--url", f"http://127.0.0.1:{free_port()}", env=ENV)
    assert result.returncode == 3
    assert "connection refused" in result.stderr and "Traceback" not in result.stderr
    assert (
        json.loads(
            cli("health", "--url", f"http://127.0.0.1:{free_port()}", "--json", env=ENV).stdout
        )["status"]
        == "unreachable"
    )

    bad = cli("health", "--url", "http://localhost:99999", env=ENV)
    assert bad.returncode == 3 and "not a usable" in bad.stderr and "Traceback" not in bad.stderr

    async def other(request: Any) -> JSONResponse:
        return JSONResponse({"ok": True})

    with ServerThread(Starlette(routes=[Route("/health", other)])) as impostor:
        result = cli("health", "--url", impostor.url, env=ENV)
    assert result.returncode == 3 and "did not answer like ChatVault" in result.stderr


def test_health_watch_redraws_until_interrupted(healthy: Daemon) -> None:
    before = served(healthy, "/health")
    process = subprocess.Popen(
        [sys.executable, "-m", "chatvault_cli", "health", "--url", healthy.url, "--watch", "0.2"],
        env={**__import__("os").environ, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: served(healthy, "/health") >= before + 2)  # drawn, and redrawn
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=10)
    assert process.returncode == 0, err
    assert "database" in out and "Traceback" not in err


def test_admin_key_is_found_in_the_state_file(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        health_config([{"name": "mock", "provider": "mock"}])
        | {"server": {"host": "127.0.0.1", "port": free_port()}},
    )
    with Daemon(path, env={"CHATVAULT_ADMIN_KEY": ""}):
        # Neither --url, --admin-key nor the variables: the config gives both.
        result = cli(
            "health",
            "--config",
            str(path),
            "--json",
            env={"CHATVAULT_ADMIN_KEY": "", "CHATVAULT_URL": ""},
        )
        body = json.loads(result.stdout)
        # The detailed view: the admin key was found. (serve's preflight generated it.)
        assert body["components"]["authentication"]["admin_key_source"] == "state_file"
        public = cli(
            "health",
            "--config",
            str(path),
            "--json",
            "--admin-key",
            "wrong",
            env={"CHATVAULT_URL": ""},
        )
        assert "message" not in json.loads(public.stdout)["components"]["database"]


def test_metrics_top_once_json_totals_equal_the_ledger(tmp_path: Path) -> None:
    config = health_config(
        [
            {
                "name": "mock",
                "provider": "mock",
                "pricing": {"input_per_million": 0.15, "output_per_million": 0.6},
            },
            {
                "name": "mock-b",
                "provider": "mock",
                "model": "b",
                "pricing": {"input_per_million": 2.0, "output_per_million": 8.0},
            },
        ]
    )
    prices = {m["name"]: m["pricing"] for m in config["models"]}
    with running(tmp_path, config) as daemon:
        client = client_for(daemon.url)
        for i in range(6):
            client.chat.completions.create(
                model="mock" if i % 3 else "mock-b",
                messages=[{"role": "user", "content": f"request number {i}"}],
            )
        for _ in client.chat.completions.create(
            model="mock-b", messages=[{"role": "user", "content": "streamed"}], stream=True
        ):
            pass
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(
                model="mock", messages=[{"role": "user", "content": "mock:fail"}]
            )
        rows = wait_for(lambda: (r := ledger_rows(daemon.ledger_path)) and len(r) == 8 and r)
        result = cli(
            "metrics", "top", "--url", daemon.url, "--once", "--json", "--interval", "0.5", env=ENV
        )
        assert result.returncode == 0, result.stderr
        payload = json.loads(result.stdout)
        ledger: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for row in rows:
            ledger[row["model"]]["requests"] += 1
            ledger[row["model"]]["errors"] += row["error_type"] is not None
            ledger[row["model"]]["tokens"] += row["input_tokens"] + row["output_tokens"]
            # At the configured prices, not the figure the gateway billed.
            ledger[row["model"]]["cost"] += row_cost(prices[row["model"]], row)
        assert all(expected["cost"] > 0 for expected in ledger.values())
        by_model = {r["model"]: r for r in payload["rows"]}
        assert set(by_model) == set(ledger)
        for model, expected in ledger.items():
            row = by_model[model]
            assert row["requests_total"] == expected["requests"]
            assert row["errors_total"] == expected["errors"]
            assert row["tokens_total"] == expected["tokens"]
            assert row["cost_total_usd"] == pytest.approx(expected["cost"], rel=1e-6)
            for key in (
                "requests_per_s",
                "tokens_per_s",
                "cost_per_hour_usd",
                "error_rate",
                "p50_latency_s",
                "p95_latency_s",
            ):
                assert key in row
        assert by_model["mock"]["error_rate"] == pytest.approx(
            1 / 5
        )  # no traffic in the interval: since start
        assert payload["health"] == "healthy" and payload["tracing"] == "off"
        by_user = json.loads(
            cli(
                "metrics",
                "top",
                "--url",
                daemon.url,
                "--once",
                "--json",
                "--interval",
                "0.2",
                "--by",
                "user_type",
                env=ENV,
            ).stdout
        )
        assert [r["user_type"] for r in by_user["rows"]] == ["admin"]
        assert by_user["rows"][0]["requests_total"] == 8
        table = cli("metrics", "top", "--url", daemon.url, "--once", "--interval", "0.2", env=ENV)
        assert table.returncode == 0 and "mock-b" in table.stdout and "\x1b[" not in table.stdout
        denied = cli(
            "metrics",
            "top",
            "--url",
            daemon.url,
            "--once",
            "--interval",
            "0.2",
            "--admin-key",
            "wrong",
            env=ENV,
        )
        assert denied.returncode == 4 and "admin key" in denied.stderr


def test_metrics_top_rates_follow_traffic_between_scrapes(healthy: Daemon) -> None:
    before = served(healthy, "/metrics")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chatvault_cli",
            "metrics",
            "top",
            "--url",
            healthy.url,
            "--once",
            "--json",
            "--interval",
            "2",
        ],
        env={**__import__("os").environ, **ENV},
        stdout=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: served(healthy, "/metrics") > before)  # the first scrape is done
    client = client_for(healthy.url)
    for _ in range(10):
        client.chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "rate me"}]
        )
    out, _ = process.communicate(timeout=20)
    (row,) = json.loads(out)["rows"]
    interval = json.loads(out)["interval_s"]
    assert row["requests_per_s"] * interval == pytest.approx(10, abs=0.01)
    assert row["p50_latency_s"] is not None and row["p50_latency_s"] > 0


def test_traces_status(tmp_path: Path) -> None:
    with OTLPReceiver() as receiver:
        config = base_config(
            monitoring={"tracing": {"enabled": True, "endpoint": receiver.endpoint}}
        )
        with running(tmp_path, config, env={"OTEL_BSP_SCHEDULE_DELAY": "50"}) as daemon:
            httpx.post(
                daemon.url + "/v1/chat/completions",
                json={"model": "mock", "messages": [{"role": "user", "content": "x"}]},
                headers={"authorization": f"Bearer {ADMIN_KEY}"},
            )
            receiver.wait_for(lambda s: s.name == "chat mock")
            status = wait_for(
                lambda: (
                    (
                        s := json.loads(
                            cli("traces", "status", "--url", daemon.url, "--json", env=ENV).stdout
                        )
                    )["spans_exported"]
                    >= 2
                    and s
                )
            )
            for key in (
                "endpoint",
                "protocol",
                "spans_exported",
                "export_failures",
                "spans_dropped",
                "queue_size",
                "last_success",
                "last_error",
            ):
                assert key in status
            assert status["endpoint"] == receiver.endpoint and status["protocol"] == "grpc"
            panel = cli("traces", "status", "--url", daemon.url, env=ENV)
            assert (
                "Trace export" in panel.stdout
                and receiver.endpoint in panel.stdout
                and "ago" in panel.stdout
            )


def test_smoke_passes_against_a_good_gateway(healthy: Daemon) -> None:
    # The way a CI job runs it: a key of its own, limited to a cheap model.
    created = cli(
        "keys", "create", "--name", "smoke", "--models", "mock", "--json",
        "--config", str(healthy.config_path),
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    api_key = json.loads(created.stdout)["key"]
    result = cli("smoke", "--url", healthy.url, env={**ENV, "CHATVAULT_API_KEY": api_key})
    assert result.returncode == 0, result.stdout + result.stderr
    for check in ("health", "completion", "streamed completion", "accounted in /metrics"):
        assert f"✓ {check}" in result.stdout
    assert "PASS: 4/4" in result.stdout


def test_smoke_fails_on_a_bad_model_or_an_unhealthy_gateway(
    healthy: Daemon, tmp_path: Path
) -> None:
    result = cli(
        "smoke", "--url", healthy.url, "--model", "no-such-model", "--key", ADMIN_KEY, env=ENV
    )
    assert result.returncode == 1 and "✗ completion" in result.stdout and "FAIL" in result.stdout
    with running(tmp_path, health_config([dead_model("a")])) as daemon:
        refresh(daemon)
        result = cli("smoke", "--url", daemon.url, "--key", ADMIN_KEY, env=ENV)
        assert result.returncode == 1 and "✗ health" in result.stdout


def test_http_commands_import_neither_daemon_nor_litellm_nor_opentelemetry(healthy: Daemon) -> None:
    script = (
        "import sys\n"
        "from chatvault_cli.main import app\n"
        "for argv in (['health', '--json'], ['metrics', 'top', '--once', '--json', '--interval', '0.2'], ['traces', 'status', '--json']):\n"
        f"    sys.argv = ['chatvault', *argv, '--url', {healthy.url!r}]\n"
        "    try:\n"
        "        app()\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'daemon', 'litellm', 'opentelemetry', 'prometheus_client', 'starlette', 'uvicorn'})\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**__import__("os").environ, **ENV},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "HEAVY []" in result.stdout, result.stdout[-500:] + result.stderr[-2000:]


def test_quantiles_follow_prometheus_histogram_quantile() -> None:
    from chatvault_cli.top import quantile

    buckets = {0.1: 10.0, 0.5: 30.0, 1.0: 40.0, math.inf: 40.0}
    assert quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 * (20 - 10) / 20)
    assert quantile(0.25, buckets) == pytest.approx(0.1 + 0.4 * 0 / 20 + 0.4 * (10 - 10) / 20)
    assert quantile(0.95, buckets) == pytest.approx(0.5 + 0.5 * (38 - 30) / 10)
    assert quantile(0.99, {1.0: 1.0, math.inf: 10.0}) == 1.0  # beyond the last finite bucket
    assert quantile(0.5, {}) is None and quantile(0.5, {1.0: 0.0, math.inf: 0.0}) is None


def test_promtext_agrees_with_prometheus_clients_parser(healthy: Daemon) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from chatvault_cli.promtext import parse

    client = client_for(healthy.url)
    client.chat.completions.create(
        model="mock", messages=[{"role": "user", "content": 'quote " and \\ backslash'}]
    )
    text = httpx.get(
        healthy.url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}
    ).text
    ours = sorted((s.name, tuple(sorted(s.labels.items())), s.value) for s in parse(text))
    reference = sorted(
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for f in text_string_to_metric_families(text)
        for s in f.samples
    )
    assert ours == reference
    tricky = 'x{a="q\\"uote",b="back\\\\slash",c="new\\nline"} 2.5\n'
    (sample,) = parse(tricky)
    assert (
        sample.labels == {"a": 'q"uote', "b": "back\\slash", "c": "new\nline"}
        and sample.value == 2.5
    )


def usage_cli(daemon: Daemon, *args: str, width: int = 200) -> Any:
    return cli(
        "usage", "--config", str(daemon.config_path), "--since", "1h", *args,
        env={"COLUMNS": str(width)},
    )  # fmt: skip


def test_usage_by_day_draws_a_bar_chart_and_json_csv_are_unchanged(healthy: Daemon) -> None:
    client_for(healthy.url).chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "chart me"}]
    )
    wait_for(lambda: ledger_rows(healthy.ledger_path))
    table = usage_cli(healthy, "--by", "day")
    assert table.returncode == 0, table.stderr
    assert "Cost and tokens per day" in table.stdout and "█" in table.stdout
    header = next(x for x in table.stdout.splitlines() if "Usage since" in x)
    assert "Cost and tokens per day" in header  # beside the table on a wide terminal
    (row,) = json.loads(usage_cli(healthy, "--by", "day", "--format", "json").stdout)
    assert set(row) == {"day", "requests", "errors", "input_tokens", "output_tokens", "cost_usd"}
    csv = usage_cli(healthy, "--by", "day", "--format", "csv").stdout.splitlines()
    assert csv[0] == "day,requests,errors,input_tokens,output_tokens,cost_usd" and len(csv) == 2
    assert "█" not in usage_cli(healthy, "--by", "model").stdout  # no time axis, no chart


def test_usage_by_hour(healthy: Daemon) -> None:
    client_for(healthy.url).chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "hourly"}]
    )
    wait_for(lambda: ledger_rows(healthy.ledger_path))
    result = usage_cli(healthy, "--by", "hour")
    assert result.returncode == 0, result.stderr
    assert "Cost and tokens per hour" in result.stdout
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:00", result.stdout)
    (row,) = json.loads(usage_cli(healthy, "--by", "hour", "--format", "json").stdout)
    assert "hour" in row
