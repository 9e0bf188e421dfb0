"""/health, /livez, /readyz with real causes: dead and hung upstreams, a dead collector, broken ledgers."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon import __version__
from tests.conftest import MakeClient
from tests.fakes import Upstream, openai_upstream
from tests.helpers import ADMIN_KEY, ServerThread, base_config, free_port, running, wait_for

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
SEVEN = {
    "database",
    "configuration",
    "authentication",
    "metrics",
    "tracing",
    "external_apis",
    "models",
}
FAST_PROBES = {"probe_interval_s": 3600, "probe_timeout_s": 0.5, "failure_threshold": 3}


def config(
    models: list[dict[str, Any]] | None = None, tracing: dict[str, Any] | None = None
) -> dict[str, Any]:
    c = base_config(monitoring={"tracing": tracing or {"enabled": False}, "health": FAST_PROBES})
    if models is not None:
        c["models"] = models
    return c


def dead_openai(name: str = "remote") -> dict[str, Any]:
    return {
        "name": name,
        "provider": "openai",
        "model": "m",
        "api_base": f"http://127.0.0.1:{free_port()}/v1",
    }


def fresh(client: Any) -> tuple[int, dict[str, Any]]:
    r = client.get("/health?refresh=true", headers=ADMIN)
    return r.status_code, r.json()


def test_healthy_body_has_the_documented_shape(make_client: MakeClient) -> None:
    client = make_client(config())
    status, body = fresh(client)
    assert status == 200 and body["status"] == "healthy"
    assert set(body) == {"status", "timestamp", "version", "components", "performance"}
    assert body["version"] == __version__
    assert set(body["components"]) == SEVEN
    for name, component in body["components"].items():
        assert component["status"] == "healthy", (name, component)
        assert isinstance(component["message"], str) and component["message"]
    db = body["components"]["database"]
    assert db["backend"] == "sqlite" and db["request_rows"] == 0 and db["size_bytes"] > 0
    assert body["components"]["authentication"]["admin_key_source"] == "environment"
    assert body["components"]["metrics"]["series"] > 10
    assert set(body["performance"]) == {
        "memory_usage_mb",
        "cpu_percent",
        "uptime_seconds",
        "event_loop_lag",
    }
    assert body["performance"]["memory_usage_mb"] > 10


def test_cpu_percent_is_a_reading_over_at_least_a_second(make_client: MakeClient) -> None:
    """Check rounds milliseconds apart never report one clock tick over a few
    milliseconds (hundreds of percent); after a second of this process burning one core,
    the reading shows it (the bound is low: the machine is shared)."""
    ceiling = 100 * (os.cpu_count() or 1) + 10
    client = make_client(config())
    for _ in range(5):
        assert 0 <= fresh(client)[1]["performance"]["cpu_percent"] <= ceiling
    burn_until = time.monotonic() + 1.2
    while time.monotonic() < burn_until:
        pass
    cpu = fresh(client)[1]["performance"]["cpu_percent"]
    assert 25 <= cpu <= ceiling, cpu


def test_public_body_shows_statuses_only(tmp_path: Path, make_client: MakeClient) -> None:
    client = make_client(config(models=[{"name": "mock", "provider": "mock"}, dead_openai()]))
    fresh(client)
    r = client.get("/health")
    body = r.json()
    assert r.status_code == 200 and body["status"] == "degraded"
    assert set(body) == {"status", "timestamp", "components"}
    assert all(set(c) == {"status"} for c in body["components"].values())
    text = r.text
    for leak in (
        "http",
        "127.0.0.1",
        str(tmp_path),
        "sqlite",
        "refused",
        "reach",
        __version__,
        "error",
    ):
        assert leak not in text, leak
    assert client.get("/health?refresh=true").status_code == 403


def test_an_upstream_refusing_connections_degrades(make_client: MakeClient) -> None:
    client = make_client(config(models=[{"name": "mock", "provider": "mock"}, dead_openai()]))
    status, body = fresh(client)
    assert status == 200 and body["status"] == "degraded"
    apis = body["components"]["external_apis"]
    (entry,) = apis["upstreams"].values()
    assert apis["status"] == "unhealthy"  # every upstream is down, yet it only degrades the whole
    assert entry["reachable"] is False and "cannot be reached" in entry["last_error"]
    models = body["components"]["models"]
    assert models["status"] == "degraded"
    assert models["models"]["mock"]["available"] and not models["models"]["remote"]["available"]
    metrics = client.get("/metrics", headers=ADMIN).text
    # Named by its provider and first deployment: no host or address in a label.
    assert 'chatvault_upstream_up{upstream="openai models[1]"} 0.0' in metrics
    assert "127.0.0.1" not in metrics
    assert 'chatvault_health_status{component="overall"} 1.0' in metrics


def test_a_hung_upstream_does_not_hang_health(tmp_path: Path) -> None:
    state = Upstream(hang=True)  # accepts, reads the request, never answers
    with ServerThread(openai_upstream(state)) as upstream:
        healthy = {"name": "mock", "provider": "mock"}
        hung = {
            "name": "hung",
            "provider": "openai",
            "model": "m",
            "api_base": upstream.url + "/v1",
        }
        with running(tmp_path, config(models=[healthy, hung])) as daemon:
            # Plain calls answer from memory, whatever the upstream does (a tight client
            # timeout turns a hang into a failure here).
            for _ in range(5):
                assert (
                    httpx.get(daemon.url + "/health", headers=ADMIN, timeout=1).status_code == 200
                )
            # A forced round waits for the probe's timeout (0.5 s), not for the upstream.
            r = httpx.get(daemon.url + "/health?refresh=true", headers=ADMIN, timeout=3)
            body = r.json()
            (entry,) = body["components"]["external_apis"]["upstreams"].values()
            assert entry["reachable"] is False and "no answer within 0.5s" in entry["last_error"]
            assert body["status"] == "degraded"


def test_only_dead_models_is_unhealthy_but_live(make_client: MakeClient) -> None:
    client = make_client(config(models=[dead_openai("a"), dead_openai("b")]))
    status, body = fresh(client)
    assert status == 503 and body["status"] == "unhealthy"
    assert body["components"]["models"]["status"] == "unhealthy"
    assert client.get("/health").status_code == 503
    assert client.get("/livez").status_code == 200


def test_traffic_opens_a_circuit_that_a_probe_closes_only_after_the_cooldown(
    make_client: MakeClient,
) -> None:
    """Issue #13's hysteresis: failing traffic keeps a deployment down until the
    cool-down has passed; a good probe before that does not bring it back (it flapped)."""
    state = Upstream(status=500)  # lists its models fine, fails every completion
    chat = {"model": "flaky", "messages": [{"role": "user", "content": "x"}]}
    with ServerThread(openai_upstream(state)) as upstream:
        flaky = {
            "name": "flaky",
            "provider": "openai",
            "model": "m",
            "api_base": upstream.url + "/v1",
        }
        c = config(models=[{"name": "mock", "provider": "mock"}, flaky])
        c["routing"] = {"retries": 0, "circuit_breaker": {"failures": 3, "cooldown_s": 1.5}}
        client = make_client(c)
        assert fresh(client)[1]["components"]["models"]["status"] == "healthy"
        for _ in range(3):
            assert client.post("/v1/chat/completions", json=chat, headers=ADMIN).status_code == 502
        # The good probe of this round comes before the cool-down: the circuit stays open.
        body = fresh(client)[1]
        flaky_state = body["components"]["models"]["models"]["flaky"]
        (deployment,) = flaky_state["deployments"]
        assert not flaky_state["available"] and deployment["circuit"]["state"] == "open"
        assert "3 consecutive upstream failures (upstream_error)" in flaky_state["reason"]
        (api,) = body["components"]["external_apis"]["upstreams"].values()
        assert api["reachable"] is True and api["circuits"]["models[1]"]["state"] == "open"
        # While open it is skipped: the upstream sees nothing, the client a 503 at once.
        posts = len(state.posts())
        r = client.post("/v1/chat/completions", json=chat, headers=ADMIN)
        assert r.status_code == 503 and r.json()["error"]["code"] == "circuit_open"
        assert len(state.posts()) == posts
        # After the cool-down a good probe closes it.
        state.status = 200
        wait_for(
            lambda: fresh(client)[1]["components"]["models"]["status"] == "healthy", timeout=10
        )
        assert client.post("/v1/chat/completions", json=chat, headers=ADMIN).status_code == 200


def test_a_dead_trace_collector_only_degrades(make_client: MakeClient) -> None:
    tracing = {"enabled": True, "endpoint": f"http://127.0.0.1:{free_port()}"}
    client = make_client(
        config(tracing=tracing),
        env={"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_BSP_EXPORT_TIMEOUT": "500"},
    )
    client.post(
        "/v1/chat/completions",
        json={"model": "mock", "messages": [{"role": "user", "content": "x"}]},
        headers=ADMIN,
    )

    def degraded() -> dict[str, Any] | None:
        body = client.get("/health", headers=ADMIN).json()
        return body if body["components"]["tracing"]["status"] == "degraded" else None

    body = wait_for(degraded, timeout=20)
    assert body["status"] == "degraded"
    assert body["components"]["tracing"]["export_failures"] >= 1
    assert "not reaching the collector" in body["components"]["tracing"]["message"]


def test_ledger_file_replaced_by_a_directory_is_unhealthy(tmp_path: Path) -> None:
    with running(tmp_path, config()) as daemon:
        assert httpx.get(daemon.url + "/readyz").status_code == 200
        ledger = daemon.ledger_path
        for suffix in ("", "-wal", "-shm"):
            Path(f"{ledger}{suffix}").unlink(missing_ok=True)
        ledger.mkdir()
        r = httpx.get(daemon.url + "/health?refresh=true", headers=ADMIN, timeout=10)
        assert r.status_code == 503
        db = r.json()["components"]["database"]
        assert db["status"] == "unhealthy" and "replaced or removed" in db["error"]
        assert httpx.get(daemon.url + "/livez").status_code == 200
        assert httpx.get(daemon.url + "/readyz").status_code == 503
        shutil.rmtree(ledger)


def test_read_only_ledger_is_unhealthy(tmp_path: Path) -> None:
    with running(tmp_path, config()):
        pass  # a real ledger, which the next daemon may only read (like a replica)
    c = config()
    c["ledger"] = {"url": "sqlite:///data/ledger.db?mode=ro"}
    with running(tmp_path, c) as daemon:
        r = httpx.get(daemon.url + "/health?refresh=true", headers=ADMIN, timeout=10)
        body = r.json()
        assert r.status_code == 503, json.dumps(body)
        assert body["components"]["database"]["status"] == "unhealthy"


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/health"])
def test_probe_endpoints_need_no_key(make_client: MakeClient, path: str) -> None:
    assert make_client(config()).get(path).status_code == 200
