from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from daemon.app import create_app
from daemon.config import Settings, parse_config
from tests.helpers import ADMIN_KEY, base_config

MakeClient = Callable[..., TestClient]


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def make(config: dict[str, Any] | None = None) -> Settings:
        return parse_config(config or base_config(), base=tmp_path)

    return make


@pytest.fixture
def make_client(make_settings: Callable[..., Settings]) -> Iterator[MakeClient]:
    """An in-process app with its lifespan running, for tests that need no real socket."""
    clients: list[TestClient] = []

    def make(
        config: dict[str, Any] | None = None, env: dict[str, str] | None = None, **kwargs: Any
    ) -> TestClient:
        app = create_app(
            make_settings(config),
            environ={"CHATVAULT_ADMIN_KEY": ADMIN_KEY, **(env or {})},
            **kwargs,
        )
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def admin_headers() -> dict[str, str]:
    return {"authorization": f"Bearer {ADMIN_KEY}"}
