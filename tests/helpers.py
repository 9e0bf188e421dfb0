"""What the tests share: free ports, config files, servers in threads, the daemon as a process."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import asyncpg
import httpx
import openai
import uvicorn
import yaml

ADMIN_KEY = "cv-test-admin-key-0123456789"
REPO = Path(__file__).resolve().parent.parent


def expected_cost(pricing: dict[str, float], prompt: int, cached: int, completion: int) -> float:
    """A request's bill computed from a model's ``pricing`` as written in config.yaml,
    independently of daemon.pricing: cached tokens (never more than the prompt) at the
    cached price, or at the input price when there is none."""
    cached = min(cached, prompt)
    cached_price = pricing.get("cached_input_per_million", pricing["input_per_million"])
    return (
        (prompt - cached) * pricing["input_per_million"]
        + cached * cached_price
        + completion * pricing["output_per_million"]
    ) / 1_000_000


def row_cost(pricing: dict[str, float], row: dict[str, Any]) -> float:
    """``expected_cost`` of one ledger row's token counts."""
    return expected_cost(pricing, row["input_tokens"], row["cached_tokens"], row["output_tokens"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(directory: Path, config: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def base_config(port: int = 0, **overrides: Any) -> dict[str, Any]:
    """A config for tests: SQLite in the test's folder, the mock model, no tracing."""
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "drain_timeout_s": 10},
        "ledger": {"url": "sqlite:///data/ledger.db", "flush_interval_s": 0.05},
        "auth": {"refresh_interval_s": 0.2},
        "models": [
            {
                "name": "mock",
                "provider": "mock",
                "pricing": {"input_per_million": 0.15, "output_per_million": 0.60},
            }
        ],
        "monitoring": {"tracing": {"enabled": False}},
    }
    config.update(overrides)
    return config


POSTGRES = os.environ.get("CHATVAULT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def postgres_execute(sql: str) -> None:
    """Run one statement on the test PostgreSQL server.

    The test is skipped only when no server listens there (connection refused): wrong
    credentials, a missing database or any other error fail it, so that a broken setup
    cannot pass as a skip.
    """

    async def run() -> None:
        conn = await asyncpg.connect(POSTGRES, timeout=3)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(run())
    except OSError as exc:
        if isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED:
            import pytest

            pytest.skip(f"no PostgreSQL server at {POSTGRES}: {exc}")
        raise


@contextlib.contextmanager
def postgres_scratch(kind: Literal["schema", "database"]) -> Iterator[str]:
    """A fresh schema (in the test database) or a fresh database on the machine's
    PostgreSQL, dropped afterwards; yields its URL."""
    name = f"cv_test_{secrets.token_hex(4)}"
    postgres_execute(f"CREATE {kind.upper()} {name}")
    try:
        if kind == "schema":
            yield f"{POSTGRES}?search_path={name}"
        else:
            yield POSTGRES.rsplit("/", 1)[0] + "/" + name
    finally:
        postgres_execute(
            f"DROP SCHEMA {name} CASCADE"
            if kind == "schema"
            else f"DROP DATABASE {name} WITH (FORCE)"
        )


REDIS_URL = os.environ.get("CHATVAULT_TEST_REDIS", "redis://127.0.0.1:6379/0")


def nothing_listens(url: str, default_port: int) -> bool:
    """No server at the URL's host and port (connection refused): the one reason a test
    of a real service may skip. Anything else (wrong password, a timeout) must fail it."""
    parts = urlsplit(url)
    try:
        socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 3
        ).close()
    except ConnectionRefusedError:
        return True
    return False


def shared_limits(**extra: Any) -> dict[str, Any]:
    """limits: for a test that shares them through the machine's Redis, under a key
    prefix of its own so that tests never see each other's counters."""
    return {
        "backend": "redis",
        "redis_url": REDIS_URL,
        "key_prefix": f"cvtest-{uuid.uuid4().hex[:12]}",
        **extra,
    }


class ServerThread:
    """Any ASGI app served by uvicorn in a background thread, on a free port."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="auto"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class Daemon:
    """``chatvault serve`` as a real subprocess, the way operators run it."""

    def __init__(
        self, config_path: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> None:
        self.config_path = config_path
        config = yaml.safe_load(config_path.read_text())
        self.port = int(config["server"]["port"])
        self.env = {**os.environ, "CHATVAULT_ADMIN_KEY": ADMIN_KEY, **(env or {})}
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = config_path.parent / "daemon.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ledger_path(self) -> Path:
        return self.config_path.parent / "data" / "ledger.db"

    def start(self, timeout: float = 20.0) -> Daemon:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "chatvault_cli",
                "serve",
                "--config",
                str(self.config_path),
                *self.args,
            ],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.config_path.parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/livez", timeout=0.5).status_code == 200:
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"daemon not live in {timeout}s:\n{self.log()}")

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=0.5).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"daemon not ready in {timeout}s:\n{self.log()}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._log.close()


def client_for(
    url: str, key: str = ADMIN_KEY, headers: dict[str, str] | None = None
) -> openai.OpenAI:
    """The official client against a daemon, without retries (a test sees every error)."""
    return openai.OpenAI(
        base_url=url + "/v1", api_key=key, max_retries=0, timeout=30, default_headers=headers
    )


def ledger_rows(
    path: Path, where: str = "1=1", params: tuple[Any, ...] = ()
) -> list[dict[str, Any]]:
    """Read the ledger with plain sqlite3, independently of the daemon's code."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.row_factory = sqlite3.Row
        return [
            dict(r)
            for r in conn.execute(f"SELECT * FROM requests WHERE {where} ORDER BY ts", params)
        ]


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy and return its value: a bounded wait."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


async def eventually(predicate: Any, timeout: float = 10.0, interval: float = 0.01) -> Any:
    """``wait_for`` inside an event loop: the loop keeps running while it waits."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
    return value


def cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chatvault_cli", *args],
        env={**os.environ, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextlib.contextmanager
def running(
    config_dir: Path, config: dict[str, Any], env: dict[str, str] | None = None
) -> Iterator[Daemon]:
    port = free_port()
    config = {**config, "server": {**config.get("server", {}), "port": port}}
    with Daemon(write_config(config_dir, config), env=env) as daemon:
        yield daemon


def new_key(settings: Any, **kwargs: Any) -> dict[str, Any]:
    """A key created the way `chatvault keys create` does, with no limits unless given."""
    from chatvault_cli import offline

    kwargs.setdefault("user_type", "standard")
    for name in ("rpm", "tpm", "budget_usd", "models"):
        kwargs.setdefault(name, None)
    return offline.keys_create(  # type: ignore[no-any-return]
        settings, name=kwargs.pop("name", f"k{time.monotonic_ns()}"), **kwargs
    )
