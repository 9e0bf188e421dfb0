"""Limits and budgets across workers and replicas: real `chatvault serve` processes,
one PostgreSQL ledger, one Redis (the machine's, or a private one the test stops)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.helpers import (
    ADMIN_KEY,
    REDIS_URL,
    Daemon,
    base_config,
    cli,
    free_port,
    postgres_scratch,
    shared_limits,
    wait_for,
    write_config,
)

CHAT = {"model": "mock", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 20}


def replica_config(directory: Path, ledger_url: str, limits: dict[str, Any], **server: Any) -> Path:
    config = base_config(
        port=free_port(),
        ledger={"url": ledger_url, "flush_interval_s": 0.05},
        limits=limits,
    )
    config["server"].update(server)
    return write_config(directory, config)


def create_key(config: Path, *args: str) -> str:
    result = cli("keys", "create", "--json", "--config", str(config), *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return str(json.loads(result.stdout)["key"])


def post(url: str, key: str, body: dict[str, Any] = CHAT) -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )


@pytest.fixture
def two_replicas(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon, Path]]:
    limits = shared_limits()
    with postgres_scratch("database") as ledger:
        a = replica_config(tmp_path / "a", ledger, limits)
        b = replica_config(tmp_path / "b", ledger, limits)
        with Daemon(a) as first, Daemon(b) as second:
            yield first, second, a


def test_two_replicas_enforce_one_request_limit(
    two_replicas: tuple[Daemon, Daemon, Path],
) -> None:
    first, second, config = two_replicas
    key = create_key(config, "--name", "rpm60", "--rpm", "60")
    wait_for(lambda: post(first.url, key).status_code == 200, timeout=5)  # both know it
    wait_for(lambda: post(second.url, key).status_code == 200, timeout=5)
    started = time.monotonic()
    answers = [post((first, second)[i % 2].url, key).status_code for i in range(200)]
    elapsed = time.monotonic() - started + 1  # the two warm-up calls came before
    assert set(answers) <= {200, 429}
    # 60 a minute, a burst of 60: what the bucket refills while the test runs may pass too.
    allowed = answers.count(200) + 2
    assert 60 <= allowed <= 60 + elapsed + 1, (allowed, elapsed)
    both = {answers[i] for i in range(0, 200, 2)} | {answers[i] for i in range(1, 200, 2)}
    assert 429 in both


def test_a_budget_holds_under_concurrency_on_two_replicas(
    two_replicas: tuple[Daemon, Daemon, Path],
) -> None:
    first, second, config = two_replicas
    # mock costs $0.15/M input and $0.60/M output tokens; each request reserves its
    # worst case (about 40 prompt tokens and 20 output tokens: ~$0.000018).
    budget = 0.0001
    key = create_key(config, "--name", "tiny", "--budget-usd", str(budget))
    wait_for(lambda: post(second.url, key, {**CHAT, "max_tokens": 1}).status_code == 200)
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda i: post((first, second)[i % 2].url, key), range(64)))
    codes = [r.status_code for r in answers]
    assert codes.count(200) >= 1 and codes.count(429) >= 1, codes
    refusal = next(r for r in answers if r.status_code == 429).json()["error"]
    assert refusal["code"] in ("budget_exceeded", "insufficient_quota")
    assert "Retry-After" not in next(r for r in answers if r.status_code == 429).headers

    def ledger_spend() -> float:
        async def read() -> float:
            conn = await asyncpg.connect(_ledger_url(config))
            try:
                return float(await conn.fetchval("SELECT COALESCE(SUM(cost_usd), 0) FROM requests"))
            finally:
                await conn.close()

        return asyncio.run(read())

    rows_expected = codes.count(200) + 1
    wait_for(lambda: _ledger_count(config) >= 64 + 1, timeout=10)
    spent = ledger_spend()
    assert spent <= budget + 1e-12, (spent, codes.count(200), rows_expected)


def _ledger_url(config: Path) -> str:
    import yaml

    return str(yaml.safe_load(config.read_text())["ledger"]["url"])


def _ledger_count(config: Path) -> int:
    async def read() -> int:
        conn = await asyncpg.connect(_ledger_url(config))
        try:
            return int(await conn.fetchval("SELECT COUNT(*) FROM requests"))
        finally:
            await conn.close()

    return asyncio.run(read())


def test_workers_with_process_local_limits_are_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, base_config(port=free_port()))
    result = cli("serve", "--config", str(config), "--workers", "2", timeout=30)
    assert result.returncode != 0
    assert "limits.backend: redis" in result.stderr + result.stdout


def test_two_workers_share_one_request_limit(tmp_path: Path) -> None:
    config = write_config(tmp_path, base_config(port=free_port(), limits=shared_limits()))
    key = create_key(config, "--name", "rpm10", "--rpm", "10")
    with Daemon(config, args=("--workers", "2")) as daemon:
        answers = [post(daemon.url, key).status_code for _ in range(30)]
        pids = {
            post(daemon.url, ADMIN_KEY).status_code for _ in range(2)
        }  # the admin key has no limits
    assert pids == {200}
    assert answers.count(200) in (10, 11), answers  # 11: one refill during the run


@contextlib.contextmanager
def private_redis(port: int, directory: Path) -> Iterator[subprocess.Popen[bytes]]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: _pings(port), timeout=10)
        yield process
    finally:
        process.terminate()
        process.wait(10)


def _pings(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(port=port, socket_timeout=0.5).ping())
    except redis.exceptions.RedisError:
        return False


@pytest.mark.parametrize("on_error", ["deny", "allow"])
def test_redis_outage_follows_on_backend_error_and_recovers(tmp_path: Path, on_error: str) -> None:
    port = free_port()
    limits = shared_limits(redis_url=f"redis://127.0.0.1:{port}/0", on_backend_error=on_error)
    config = write_config(tmp_path, base_config(port=free_port(), limits=limits))
    key = create_key(config, "--name", "limited", "--rpm", "1000")
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    with private_redis(port, tmp_path) as redis_process, Daemon(config) as daemon:
        assert post(daemon.url, key).status_code == 200
        redis_process.terminate()
        redis_process.wait(10)
        started = time.monotonic()
        during = post(daemon.url, key)
        assert time.monotonic() - started < 2  # no request waits long for Redis
        health = httpx.get(daemon.url + "/health", headers=admin).json()
        auth = health["components"]["authentication"]
        assert auth["status"] == "degraded" and auth["limit_store"]["reachable"] is False
        if on_error == "deny":
            assert during.status_code == 503, during.text
            assert during.json()["error"]["code"] == "service_unavailable"
        else:
            assert during.status_code == 200
            metrics = httpx.get(daemon.url + "/metrics", headers=admin).text
            assert "chatvault_limits_fail_open_total 1.0" in metrics
        with private_redis(port, tmp_path):
            assert wait_for(lambda: post(daemon.url, key).status_code == 200, timeout=10)
            health = httpx.get(daemon.url + "/health", headers=admin).json()
            assert health["components"]["authentication"]["limit_store"]["reachable"] is True
    assert REDIS_URL  # the machine's Redis was never touched


def test_a_key_revoked_on_one_replica_is_refused_by_both_within_seconds(
    two_replicas: tuple[Daemon, Daemon, Path],
) -> None:
    first, second, config = two_replicas
    key = create_key(config, "--name", "short-lived")
    assert wait_for(lambda: post(first.url, key).status_code == 200, timeout=5)
    assert wait_for(lambda: post(second.url, key).status_code == 200, timeout=5)
    revoked = cli("keys", "revoke", "short-lived", "--config", str(config))
    assert revoked.returncode == 0, revoked.stdout + revoked.stderr
    started = time.monotonic()
    for replica in (first, second):
        assert wait_for(lambda r=replica: post(r.url, key).status_code == 401, timeout=5)
    assert time.monotonic() - started < 3
