"""/health while the database misbehaves: ledger writes failing, the key store
unreachable, and the 503 a client with a key not yet in memory then gets.

The store is the real SQLite store, with chosen calls failing the way a database that
has gone away fails (connection refused) or one whose disk is full refuses writes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chatvault_cli import offline
from daemon.config import Settings
from daemon.ledger import open_store
from tests.conftest import MakeClient
from tests.fakes import Failing
from tests.helpers import ADMIN_KEY, base_config, ledger_rows, wait_for

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
CHAT = {"model": "mock", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
KEY_CALLS = frozenset({"keys_generation", "list_keys", "key_spend", "find_key"})


def health(client: Any) -> tuple[int, dict[str, Any]]:
    r = client.get("/health?refresh=true", headers=ADMIN)
    return r.status_code, r.json()


def component(client: Any, name: str) -> dict[str, Any]:
    return dict(health(client)[1]["components"][name])


def gateway(
    tmp_path: Path, make_client: MakeClient, failing: frozenset[str], error: Callable[[], Exception]
) -> tuple[Any, Failing]:
    config = base_config()
    store = Failing(open_store(f"sqlite:///{tmp_path / 'data' / 'ledger.db'}"), failing, error)
    return make_client(config, store=store), store


def test_health_is_degraded_while_ledger_writes_fail_and_recovers(
    tmp_path: Path, make_client: MakeClient
) -> None:
    client, store = gateway(
        tmp_path,
        make_client,
        frozenset({"write_requests"}),
        lambda: sqlite3.OperationalError("database or disk is full"),
    )
    assert health(client)[1]["status"] == "healthy"
    store.down = True
    r = client.post("/v1/chat/completions", json=CHAT, headers=ADMIN)
    assert r.status_code == 200  # the client is served; its row waits for the database
    db = wait_for(lambda: (c := component(client, "database"))["status"] != "healthy" and c)
    assert db["status"] == "degraded"
    assert "disk is full" in db["last_write_error"] and db["write_failures"] >= 1
    status, body = health(client)
    assert status == 200 and body["status"] == "degraded"
    store.down = False
    wait_for(lambda: component(client, "database")["status"] == "healthy")
    rows = ledger_rows(tmp_path / "data" / "ledger.db")
    assert [row["request_id"] for row in rows] == [r.headers["x-request-id"]]


def test_an_unreachable_key_store_degrades_health_and_new_keys_get_a_503(
    tmp_path: Path, make_client: MakeClient, make_settings: Callable[..., Settings]
) -> None:
    client, store = gateway(
        tmp_path, make_client, KEY_CALLS, lambda: ConnectionRefusedError("connection refused")
    )
    settings = make_settings(base_config())
    known = offline.keys_create(
        settings,
        name="known",
        user_type="standard",
        rpm=None,
        tpm=None,
        budget_usd=None,
        models=None,
    )["key"]
    assert client.post("/v1/chat/completions", json=CHAT, headers=bearer(known)).status_code == 200
    assert component(client, "authentication")["status"] == "healthy"

    store.down = True
    auth = wait_for(lambda: (c := component(client, "authentication"))["status"] != "healthy" and c)
    assert auth["status"] == "degraded" and auth["key_store_reachable"] is False
    assert "connection refused" in auth["error"]
    # Created while the store is unreachable from the gateway: not in its memory.
    new = offline.keys_create(
        settings, name="new", user_type="standard", rpm=None, tpm=None, budget_usd=None, models=None
    )["key"]
    r = client.post("/v1/chat/completions", json=CHAT, headers=bearer(new))
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    error = r.json()["error"]
    assert error["code"] == "service_unavailable" and error["type"] == "server_error"
    assert new not in r.text
    # Keys already in memory keep working.
    assert client.post("/v1/chat/completions", json=CHAT, headers=bearer(known)).status_code == 200

    store.down = False
    wait_for(lambda: component(client, "authentication")["status"] == "healthy")
    assert client.post("/v1/chat/completions", json=CHAT, headers=bearer(new)).status_code == 200


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}
