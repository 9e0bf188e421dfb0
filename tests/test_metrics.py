"""Prometheus metrics scraped from a real daemon after real traffic, checked against the ledger."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MakeClient
from tests.helpers import (
    ADMIN_KEY,
    Daemon,
    base_config,
    cli,
    client_for,
    free_port,
    ledger_rows,
    row_cost,
    running,
    shared_limits,
    wait_for,
    write_config,
)

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def scrape(url: str, headers: dict[str, str] | None = None) -> str:
    response = httpx.get(url + "/metrics", headers=headers or ADMIN, timeout=10)
    assert response.status_code == 200, response.text
    return response.text


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out.append((sample.labels, sample.value))
    return out


def total(text: str, name: str, **match: str) -> float:
    return sum(
        v
        for labels, v in samples(text, name)
        if all(labels.get(k) == want for k, want in match.items())
    )


def two_models() -> dict[str, Any]:
    return base_config(
        models=[
            {
                "name": "mock",
                "provider": "mock",
                "pricing": {"input_per_million": 0.15, "output_per_million": 0.60},
            },
            {
                "name": "pricey",
                "provider": "mock",
                "model": "pricey-1",
                "pricing": {"input_per_million": 3.0, "output_per_million": 15.0},
            },
        ]
    )


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One daemon, a mix of real traffic, then the ledger has settled."""
    directory = tmp_path_factory.mktemp("metrics")
    with running(directory, two_models()) as daemon:
        key = json.loads(
            cli(
                "keys",
                "create",
                "--name",
                "team-zebra-app",
                "--rpm",
                "2",
                "--json",
                "--config",
                str(daemon.config_path),
            ).stdout
        )["key"]
        admin = client_for(daemon.url)
        user = client_for(daemon.url, key)
        for model in ("mock", "pricey", "mock"):
            admin.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"tell me about {model}"}]
            )
        for _ in admin.chat.completions.create(
            model="pricey", messages=[{"role": "user", "content": "a streamed one"}], stream=True
        ):
            pass
        admin.embeddings.create(model="mock", input="embed these four words")
        for _ in range(3):  # the third is over the limit
            with contextlib.suppress(openai.RateLimitError):
                user.chat.completions.create(
                    model="mock", messages=[{"role": "user", "content": "hi"}]
                )
        with pytest.raises(openai.AuthenticationError):
            client_for(daemon.url, "cv-bad").models.list()
        for model in ("gpt-made-up-1", "gpt-made-up-2"):
            with pytest.raises(openai.NotFoundError):
                admin.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "x"}]
                )
        rows = wait_for(lambda: (r := ledger_rows(daemon.ledger_path)) and len(r) == 10 and r)
        yield daemon, rows, scrape(daemon.url)


def test_tokens_and_cost_per_model_equal_the_ledger(traffic: Any) -> None:
    _, rows, text = traffic
    prices = {m["name"]: m["pricing"] for m in two_models()["models"]}
    ledger: dict[tuple[str, str], float] = defaultdict(float)
    for row in rows:
        ledger[(row["model"], "input")] += row["input_tokens"]
        ledger[(row["model"], "output")] += row["output_tokens"]
        if row["model"] in prices:
            # What each request must cost at the configured prices, not what it was billed.
            cost = row_cost(prices[row["model"]], row)
            assert row["cost_usd"] == pytest.approx(cost, rel=1e-9)
            ledger[(row["model"], "cost")] += cost
    for model in ("mock", "pricey"):
        assert (
            total(text, "chatvault_tokens_processed_total", model=model, token_type="input")
            == ledger[(model, "input")]
        )
        assert (
            total(text, "chatvault_tokens_processed_total", model=model, token_type="output")
            == ledger[(model, "output")]
        )
        assert total(text, "chatvault_requests_cost_total", model=model) == pytest.approx(
            ledger[(model, "cost")], rel=1e-9
        )
    assert ledger[("pricey", "output")] > 0 and ledger[("pricey", "cost")] > 0


def test_the_streamed_call_counted_its_tokens(traffic: Any) -> None:
    _, rows, text = traffic
    streamed = [r for r in rows if r["stream"]]
    assert len(streamed) == 1 and streamed[0]["output_tokens"] > 0
    # pricey had one non-streamed and one streamed call: both are in the counter.
    pricey = [r for r in rows if r["model"] == "pricey"]
    assert total(
        text, "chatvault_tokens_processed_total", model="pricey", token_type="output"
    ) == sum(r["output_tokens"] for r in pricey)
    assert total(text, "chatvault_time_to_first_token_seconds_count", model="pricey") == 1


def test_rate_limit_and_bad_key_are_counted(traffic: Any) -> None:
    _, _, text = traffic
    assert (
        total(text, "chatvault_rate_limit_violations_total", limit_type="rpm", user_type="standard")
        == 1
    )
    assert total(text, "chatvault_auth_attempts_total", result="invalid") == 1
    assert total(text, "chatvault_auth_attempts_total", result="success") >= 9
    assert total(text, "chatvault_model_requests_total", status="rate_limited") == 1
    assert (
        total(
            text,
            "chatvault_http_requests_total",
            endpoint="/v1/chat/completions",
            status_code="429",
        )
        == 1
    )
    assert (
        total(text, "chatvault_http_requests_total", endpoint="/v1/models", status_code="401") == 1
    )


def test_unknown_models_do_not_create_series(traffic: Any) -> None:
    _, _, text = traffic
    assert "gpt-made-up" not in text
    assert (
        total(text, "chatvault_model_requests_total", model="unknown", status="model_not_found")
        == 2
    )
    models = {labels["model"] for labels, _ in samples(text, "chatvault_model_requests_total")}
    assert models == {"mock", "pricey", "unknown"}


def test_a_request_refused_before_it_names_a_model_counts_as_unknown(
    make_client: MakeClient, admin_headers: dict[str, str]
) -> None:
    client = make_client(base_config())
    for body in (b"{not json", b'{"model": 7, "messages": []}'):
        r = client.post("/v1/chat/completions", content=body, headers=admin_headers)
        assert r.status_code == 400, r.text
    text = client.get("/metrics", headers=admin_headers).text
    models = {labels["model"] for labels, _ in samples(text, "chatvault_model_requests_total")}
    assert models == {"unknown"}
    assert (
        total(text, "chatvault_model_requests_total", model="unknown", status="invalid_request")
        == 2
    )


def test_labels_are_bounded_and_carry_no_secrets(traffic: Any) -> None:
    daemon, _, text = traffic
    assert ADMIN_KEY not in text and "cv-bad" not in text and "zebra" not in text
    endpoints = {labels["endpoint"] for labels, _ in samples(text, "chatvault_http_requests_total")}
    assert endpoints <= {
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/models",
        "/livez",
        "unmatched",
    }
    httpx.get(daemon.url + "/some/random/path/123", headers=ADMIN)
    after = scrape(daemon.url)
    assert "/some/random" not in after
    assert (
        total(after, "chatvault_http_requests_total", endpoint="unmatched", status_code="404") >= 1
    )


def test_every_family_has_help_and_the_contract_names_exist(traffic: Any) -> None:
    _, _, text = traffic
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for family in families.values():
        assert family.documentation, family.name
    for name, kind in {
        "chatvault_tokens_processed": "counter",
        "chatvault_requests_cost": "counter",
        "chatvault_http_requests": "counter",
        "chatvault_http_request_duration_seconds": "histogram",
        "chatvault_model_requests": "counter",
        "chatvault_rate_limit_violations": "counter",
        "chatvault_auth_attempts": "counter",
        "chatvault_db_query_duration_seconds": "histogram",
        "chatvault_upstream_latency_seconds": "histogram",
        "chatvault_time_to_first_token_seconds": "histogram",
        "chatvault_time_per_output_token_seconds": "histogram",
        "chatvault_gateway_overhead_seconds": "histogram",
        "chatvault_http_requests_in_flight": "gauge",
        "chatvault_ledger_queue_depth": "gauge",
        "chatvault_ledger_rows_written": "counter",
        "chatvault_ledger_write_failures": "counter",
        "chatvault_process_cpu_seconds": "counter",
        "chatvault_process_resident_memory_bytes": "gauge",
        "chatvault_build_info": "gauge",
        "chatvault_active_keys": "gauge",
        "chatvault_requests_today": "gauge",
        "chatvault_spend_today_usd": "gauge",
    }.items():
        assert name in families, name
        assert families[name].type == kind, name
    assert total(text, "chatvault_ledger_rows_written_total") >= 1
    assert total(text, "chatvault_process_resident_memory_bytes") > 10_000_000
    buckets = {
        labels["le"] for labels, _ in samples(text, "chatvault_upstream_latency_seconds_bucket")
    }
    assert "81.92" in buckets  # LLM-sized buckets, not the client library's 10 s ceiling


def test_openmetrics_when_asked(traffic: Any) -> None:
    daemon, _, _ = traffic
    response = httpx.get(
        daemon.url + "/metrics",
        headers={**ADMIN, "accept": "application/openmetrics-text; version=1.0.0"},
    )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
    names = {f.name for f in parse_openmetrics(response.text)}
    assert "chatvault_tokens_processed" in names


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (Debian package 'prometheus'); .ci/run installs it",
)
def test_promtool_check_metrics_is_clean(traffic: Any) -> None:
    _, _, text = traffic
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


def test_metrics_need_the_admin_key(traffic: Any) -> None:
    daemon, _, _ = traffic
    assert httpx.get(daemon.url + "/metrics").status_code == 401
    user_key = json.loads(
        cli(
            "keys", "create", "--name", "nosy", "--json", "--config", str(daemon.config_path)
        ).stdout
    )["key"]
    denied = httpx.get(daemon.url + "/metrics", headers={"authorization": f"Bearer {user_key}"})
    assert denied.status_code == 403 and "error" in denied.json()


def test_open_metrics_when_configured(make_client: MakeClient) -> None:
    client = make_client(
        base_config(monitoring={"metrics": {"require_auth": False}, "tracing": {"enabled": False}})
    )
    assert client.get("/metrics").status_code == 200


def test_disabled_metrics_remove_the_endpoint_and_the_middleware(make_client: MakeClient) -> None:
    client = make_client(
        base_config(monitoring={"metrics": {"enabled": False}, "tracing": {"enabled": False}})
    )
    assert client.get("/metrics", headers=ADMIN).status_code == 404
    gateway = client.app.state.gateway  # type: ignore[attr-defined]
    assert not gateway.metrics.enabled
    assert (
        client.post(
            "/v1/chat/completions",
            json={"model": "mock", "messages": [{"role": "user", "content": "x"}]},
            headers=ADMIN,
        ).status_code
        == 200
    )


def _run_traffic(url: str, n: int) -> None:
    client = client_for(url)
    errors: list[Exception] = []

    def worker() -> None:
        try:
            for _ in range(n // 8):
                client.chat.completions.create(
                    model="mock", messages=[{"role": "user", "content": "x"}]
                )
        except Exception as exc:  # collected and re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_workers_are_summed_in_one_scrape_and_two_daemons_do_not_mix(tmp_path: Path) -> None:
    def config(name: str) -> Path:
        return write_config(tmp_path / name, base_config(port=free_port(), limits=shared_limits()))

    a = Daemon(config("a"), args=("--workers", "2"))
    b = Daemon(config("b"), args=("--workers", "2"))
    with a, b:
        _run_traffic(a.url, 48)
        _run_traffic(b.url, 16)
        for daemon, expected in ((a, 48), (b, 16)):
            for _ in range(4):  # whichever worker answers the scrape, it reports all of them
                text = scrape(daemon.url)
                assert (
                    total(text, "chatvault_http_requests_total", endpoint="/v1/chat/completions")
                    == expected
                )
                assert total(text, "chatvault_model_requests_total", status="success") == expected
        pids = {
            json.loads(line)["pid"]
            for line in a.log().splitlines()
            if '"route":"/v1/chat/completions"' in line
        }
        assert len(pids) == 2, "both workers should have served some of the traffic"


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (Debian package 'prometheus'); .ci/run installs it",
)
def test_shipped_alert_rules_are_valid() -> None:
    from tests.helpers import REPO

    result = subprocess.run(
        ["promtool", "check", "rules", str(REPO / "deploy" / "alerts.yml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_metric_is_documented() -> None:
    """docs/metrics.md is the operators' reference: a metric missing from it is a bug."""
    from prometheus_client import Counter

    from daemon.metric_specs import SPECS

    doc = (Path(__file__).parents[1] / "docs" / "metrics.md").read_text()
    exposed = [spec.name + ("_total" if spec.kind is Counter else "") for spec in SPECS]
    missing = [name for name in exposed if f"`{name}`" not in doc]
    assert not missing, f"not in docs/metrics.md: {missing}"
