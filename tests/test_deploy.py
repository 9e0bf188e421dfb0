"""What an operator installs from deploy/: checked with the real tools.

- The alert rules: ``promtool check rules`` and the unit tests under deploy/tests/
  (every alert has a case that fires and one that stays silent).
- The scrape config: ``promtool check config``.
- The Grafana dashboard: a real Prometheus (Debian's ``prometheus``) scrapes a live
  ``chatvault serve`` with deploy/prometheus.yml's job, and every query of every panel
  must parse and return data once the daemon has served traffic of every kind.
- The systemd unit: ``systemd-analyze verify``.

A failure names the file and the failing rule, panel or query.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.fakes import Upstream, openai_upstream
from tests.helpers import (
    ADMIN_KEY,
    REPO,
    Daemon,
    ServerThread,
    base_config,
    cli,
    client_for,
    free_port,
    write_config,
)

DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "chatvault.json"
ALERTS = DEPLOY / "alerts.yml"
RULE_TESTS = sorted((DEPLOY / "tests").glob("*.yml"))

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install prometheus)"
)
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus is not installed (Debian: apt-get install prometheus)"
)


# -- alert rules ----------------------------------------------------------------------


def run_promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )


def rule_test_failures(rules: Path, tests: list[Path]) -> str | None:
    """Run promtool's checks on a rules file and its unit tests; None when all pass,
    else a message naming the file and promtool's own report (which names the rule)."""
    checked = run_promtool("check", "rules", str(rules))
    if checked.returncode != 0:
        return f"{rules}: promtool check rules failed:\n{checked.stdout}{checked.stderr}"
    tested = run_promtool("test", "rules", *map(str, tests))
    if tested.returncode != 0:
        names = ", ".join(str(t) for t in tests)
        return (
            f"{names} (rules {rules}): promtool test rules failed:\n{tested.stdout}{tested.stderr}"
        )
    return None


def alert_names(rules: Path) -> list[str]:
    groups = yaml.safe_load(rules.read_text())["groups"]
    return [r["alert"] for g in groups for r in g["rules"] if "alert" in r]


def test_every_alert_has_a_case_that_fires_and_one_that_stays_silent() -> None:
    assert RULE_TESTS, "no promtool test files under deploy/tests/"
    fires: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        spec = yaml.safe_load(path.read_text())
        rule_files = {(path.parent / f).resolve() for f in spec["rule_files"]}
        assert ALERTS.resolve() in rule_files, f"{path}: does not test {ALERTS}"
        for group in spec["tests"]:
            for case in group.get("alert_rule_test", []):
                (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    missing = [
        f"{name}: no case where it {what}"
        for name in alert_names(ALERTS)
        for what, seen in (("fires", fires), ("stays silent", silent))
        if name not in seen
    ]
    assert not missing, f"{ALERTS}: untested alerts:\n" + "\n".join(missing)


@needs_promtool
def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    failure = rule_test_failures(ALERTS, RULE_TESTS)
    assert failure is None, failure


@needs_promtool
def test_a_broken_rule_fails_naming_the_file_and_the_alert(tmp_path: Path) -> None:
    # The shipped tests against a rules file where one alert waits ten times longer.
    (tmp_path / "tests").mkdir()
    broken = tmp_path / "alerts.yml"
    broken.write_text(ALERTS.read_text().replace("for: 1m", "for: 10m", 1))
    tests = [shutil.copy(t, tmp_path / "tests" / t.name) for t in RULE_TESTS]
    failure = rule_test_failures(broken, [Path(t) for t in tests])
    assert failure is not None
    assert str(broken) in failure and "ChatVaultDown" in failure

    unparsable = tmp_path / "unparsable.yml"
    unparsable.write_text(ALERTS.read_text().replace("== 0", "== == 0", 1))
    failure = rule_test_failures(unparsable, [Path(t) for t in tests])
    assert failure is not None and str(unparsable) in failure and "parse error" in failure


@needs_promtool
def test_the_shipped_scrape_config_is_valid(tmp_path: Path) -> None:
    # The config names /etc/prometheus/chatvault-admin-key; promtool wants it to exist.
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    key_file = tmp_path / "chatvault-admin-key"
    key_file.write_text(ADMIN_KEY)
    for job in config["scrape_configs"]:
        job["authorization"]["credentials_file"] = str(key_file)
    config["rule_files"] = [str(ALERTS)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    checked = run_promtool("check", "config", str(path))
    assert checked.returncode == 0, f"deploy/prometheus.yml: {checked.stdout}{checked.stderr}"


# -- the dashboard's shape ----------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    panel: str
    ref: str
    expr: str

    def name(self) -> str:
        return f"panel {self.panel!r} query {self.ref}: {self.expr}"


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except ValueError as exc:
        raise AssertionError(f"{path}: not valid JSON ({exc})") from None
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside a collapsed row


def queries(dashboard: dict[str, Any]) -> list[Query]:
    return [
        Query(panel["title"], target.get("refId", "?"), target["expr"])
        for panel in panels(dashboard)
        if panel["type"] != "row"
        for target in panel.get("targets", [])
        if not target.get("hide")
    ]


def test_dashboard_is_importable_as_is() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "chatvault-gateway"  # stable: links survive re-imports
    assert dashboard.get("id") is None  # an id would clash with the importing Grafana's
    assert "JSON" in dashboard["description"]  # says how it is maintained
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("model", "user_type"):
        assert variables[name]["type"] == "query"
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), f"{DASHBOARD}: duplicate panel ids"
    for panel in panels(dashboard):
        where = f"{DASHBOARD}: panel {panel['title']!r}"
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, f"{where}: outside the grid"
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"{where}: no query"
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, (
                f"{where}: not bound to the datasource variable"
            )
    titles = {p["title"] for p in panels(dashboard)}
    expected_rows = {"Traffic", "Latency", "Tokens", "Spend", "Limits and keys", "Upstreams"}
    assert expected_rows <= titles


# -- the dashboard against a live Prometheus ------------------------------------------------

# Grafana's built-in interval variables, as Grafana would fill them for a 3-hour view.
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "3h"}
_VARIABLE = re.compile(r"\$\{([A-Za-z_]\w*)(?::\w+)?\}|\$([A-Za-z_]\w*)")


def substitute(expr: str, values: dict[str, str]) -> str:
    """Fill in template variables the way Grafana does; an undefined one is an error."""

    def fill(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise AssertionError(f"undefined variable ${name} in {expr}")
        return values[name]

    return _VARIABLE.sub(fill, expr)


class Prometheus:
    """Debian's prometheus, on a free port, with its own storage in a temporary folder."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "prometheus.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Prometheus:
        assert PROMETHEUS is not None
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/-/ready", timeout=0.5).status_code == 200:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"prometheus not ready in 30 s:\n{self.log()}")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def query(self, expr: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(error, result): Prometheus' parse or evaluation error, else the samples."""
        response = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        if body.get("status") != "success":
            return f"{body.get('errorType')}: {body.get('error')}", []
        data = body["data"]
        if data["resultType"] in ("scalar", "string"):
            return None, [{"value": data["result"]}]
        return None, list(data["result"])

    def label_values(self, metric: str, label: str) -> list[str]:
        response = httpx.get(
            f"{self.url}/api/v1/label/{label}/values", params={"match[]": metric}, timeout=10
        )
        return list(response.json()["data"])


def has_finite_value(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


def check_queries(prometheus: Prometheus, found: list[Query], values: dict[str, str]) -> list[str]:
    """Every query evaluated as Grafana would send it; the failures, each naming its panel."""
    problems = []
    for q in found:
        expr = substitute(q.expr, values)
        error, result = prometheus.query(expr)
        if error is not None:
            problems.append(f"{q.name()}\n    -> {error}")
        elif not result:
            problems.append(f"{q.name()}\n    -> returned nothing")
        elif not has_finite_value(result):
            problems.append(f"{q.name()}\n    -> only NaN or infinite values")
    return problems


def variable_queries(dashboard: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """The query variables: name -> (metric, label) from ``label_values(metric, label)``."""
    out = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\(\s*([^,]+?)\s*,\s*(\w+)\s*\)", text.strip())
        assert match, f"{DASHBOARD}: variable {variable['name']}: unexpected query {text!r}"
        out[variable["name"]] = (match.group(1), match.group(2))
    return out


def chat(
    client: openai.OpenAI, model: str, text: str = "hello there", stream: bool = False
) -> None:
    """One request; refusals and upstream failures are part of the traffic, not errors."""
    with contextlib.suppress(openai.APIStatusError):
        messages: Any = [{"role": "user", "content": text}]
        if stream:
            for _ in client.chat.completions.create(model=model, messages=messages, stream=True):
                pass
        else:
            client.chat.completions.create(model=model, messages=messages)


def traffic_round(url: str, keys: dict[str, str]) -> None:
    """Every kind of request a dashboard panel shows: successes, streams, embeddings,
    upstream failures, rate-limit and budget refusals, bad keys, a remote upstream."""
    admin = client_for(url)
    for _ in range(3):
        chat(admin, "mock")
    chat(admin, "mock", stream=True)
    chat(admin, "remote")
    chat(admin, "remote", stream=True)
    chat(admin, "mock", "please mock:fail")
    admin.embeddings.create(model="mock", input=["some text"])
    for _ in range(3):
        chat(client_for(url, keys["limited"]), "mock", stream=True)
        chat(client_for(url, keys["budget"]), "mock")
    chat(client_for(url, "cv-not-a-real-key"), "mock")


def create_key(config_path: Path, *args: str) -> str:
    result = cli("keys", "create", "--json", "--config", str(config_path), *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return str(json.loads(result.stdout)["key"])


def prometheus_config(target: str, key_file: Path) -> dict[str, Any]:
    """deploy/prometheus.yml's job as shipped, pointed at the test daemon and key file."""
    shipped = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    job = next(j for j in shipped["scrape_configs"] if j["job_name"] == "chatvault")
    assert job["authorization"]["type"] == "Bearer"
    assert "credentials_file" in job["authorization"], "the key must come from a file"
    job["authorization"]["credentials_file"] = str(key_file)
    job["static_configs"] = [{"targets": [target]}]
    job["scrape_interval"] = "1s"
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],  # the rules load in a real Prometheus too
        "scrape_configs": [job],
    }


@needs_prometheus
def test_every_dashboard_query_returns_data_from_a_live_daemon(tmp_path: Path) -> None:
    dashboard = load_dashboard()
    found = queries(dashboard)
    assert found
    with ServerThread(openai_upstream(Upstream())) as upstream:
        port = free_port()
        config = base_config(
            port,
            models=[
                *base_config()["models"],
                {
                    "name": "remote",
                    "provider": "openai",
                    "model": "gpt-test",
                    "api_base": upstream.url + "/v1",
                    "pricing": {"input_per_million": 1.0, "output_per_million": 2.0},
                },
            ],
            monitoring={
                "metrics": {"business_refresh_s": 0.5},
                "health": {"probe_interval_s": 0.5},
                # A collector that is not there: span export failures show on the panel.
                "tracing": {
                    "endpoint": f"http://127.0.0.1:{free_port()}",
                    "export_timeout_s": 0.5,
                },
            },
        )
        config_path = write_config(tmp_path / "gw", config)
        keys = {
            "limited": create_key(
                config_path, "--name", "limited", "--rpm", "1", "--user-type", "service"
            ),
            # The mock costs about $0.0000083 a request: two pass, then budget refusals.
            "budget": create_key(config_path, "--name", "budget", "--budget-usd", "0.000015"),
        }
        key_file = tmp_path / "chatvault-admin-key"
        key_file.write_text(ADMIN_KEY)
        key_file.chmod(0o600)
        with (
            Daemon(config_path) as daemon,
            Prometheus(
                tmp_path / "prom", prometheus_config(f"127.0.0.1:{port}", key_file)
            ) as prometheus,
        ):
            daemon.wait_ready()

            def scraped_at() -> float:
                _, result = prometheus.query('timestamp(up{job="chatvault"} == 1)')
                return float(result[0]["value"][1]) if result else 0.0

            def next_scrape(after: float, timeout: float = 10.0) -> float:
                deadline = time.monotonic() + timeout
                while (seen := scraped_at()) <= after:
                    if time.monotonic() > deadline:
                        raise AssertionError(
                            f"prometheus did not scrape the daemon:\n{prometheus.log()}"
                        )
                    time.sleep(0.1)
                return seen

            last = next_scrape(0.0, timeout=20.0)
            all_values = {**BUILTINS, **dict.fromkeys(variable_queries(dashboard), ".*")}
            # Counters and histograms need a scrape before and after the traffic to show a
            # rate, so: traffic, a scrape, and again, until every query has data.
            deadline = time.monotonic() + 45
            while True:
                traffic_round(daemon.url, keys)
                last = next_scrape(last)
                last = next_scrape(last)
                problems = check_queries(prometheus, found, all_values)
                if not problems or time.monotonic() > deadline:
                    break
            assert not problems, f"{DASHBOARD}: queries without data:\n" + "\n".join(problems)

            # Each variable lists values, and each query also works with one value chosen.
            one_value = dict(BUILTINS)
            for name, (metric, label) in variable_queries(dashboard).items():
                values = prometheus.label_values(metric, label)
                assert values, (
                    f"{DASHBOARD}: variable {name}: label_values({metric}, {label}) is empty"
                )
                one_value[name] = values[0]
            for q in found:
                error, _ = prometheus.query(substitute(q.expr, one_value))
                assert error is None, f"{DASHBOARD}: {q.name()} with {one_value}: {error}"

            # A broken panel is reported with its title and query.
            bogus = [Query("Broken", "A", "sum(rate(chatvault_no_such_metric[$__rate_interval]))")]
            report = check_queries(prometheus, bogus, all_values)
            assert report and "'Broken'" in report[0] and "returned nothing" in report[0]
            report = check_queries(prometheus, [Query("Typo", "B", "sum(rate(x[1m])")], all_values)
            assert report and "'Typo'" in report[0] and "bad_data" in report[0]


# -- the systemd unit ---------------------------------------------------------------------

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (DEPLOY / "chatvault.service").read_text()
    assert "ExecStart=/opt/chatvault/bin/chatvault serve" in unit
    # verify checks that ExecStart's program exists: point it at this checkout's.
    chatvault = str(Path(sys.executable).parent / "chatvault")  # the venv running the tests
    path = tmp_path / "chatvault.service"
    path.write_text(unit.replace("/opt/chatvault/bin/chatvault", chatvault))
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    # Unknown keys and bad values are only warnings (exit 0): any output is a failure.
    report = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not report, f"deploy/chatvault.service:\n{report}"
