"""SIGKILL under load: a real daemon, real clients, a real SQLite ledger.

Every response a client saw more than a second before the kill must have its row
after a restart, and no row may be stored twice. The database is held locked for the
last seconds before the kill, so rows are waiting on it (the worst moment to die):
they reach the journal beside the database and the restarted daemon replays them.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx

from tests.helpers import (
    ADMIN_KEY,
    Daemon,
    base_config,
    free_port,
    ledger_rows,
    wait_for,
    write_config,
)

CLIENTS = 4


def _load(url: str, stop: threading.Event, seen: list[tuple[float, str]]) -> None:
    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.is_set():
            try:
                r = client.post(
                    "/v1/chat/completions",
                    json={"model": "mock", "messages": [{"role": "user", "content": "bill me"}]},
                    headers={"authorization": f"Bearer {ADMIN_KEY}"},
                )
            except httpx.HTTPError:
                return  # the daemon is gone
            if r.status_code == 200:
                seen.append((time.monotonic(), r.headers["x-request-id"]))


def test_kill_9_under_load_loses_no_row_older_than_a_second(tmp_path: Path) -> None:
    port = free_port()
    config = base_config(port)
    config["ledger"] = {"url": "sqlite:///data/ledger.db", "flush_interval_s": 0.05}
    daemon = Daemon(write_config(tmp_path, config))
    daemon.start()
    daemon.wait_ready()
    seen: list[tuple[float, str]] = []
    stop = threading.Event()
    threads = [
        threading.Thread(target=_load, args=(daemon.url, stop, seen)) for _ in range(CLIENTS)
    ]
    for t in threads:
        t.start()
    blocker: sqlite3.Connection | None = None
    journal = Path(f"{daemon.ledger_path}.journal")
    try:
        # Rows flowing straight to the database first.
        wait_for(lambda: len(ledger_rows(daemon.ledger_path)) >= 200, timeout=30)
        blocker = sqlite3.connect(daemon.ledger_path, isolation_level=None, timeout=10)
        blocker.execute("BEGIN EXCLUSIVE")  # now the database stalls
        stalled_at = time.monotonic()

        def worst_moment() -> bool:
            # Rows are waiting in the journal, and responses answered during the stall
            # are over a second old: their rows can only be in the journal.
            older = time.monotonic() - 1.2
            return any(p.stat().st_size for p in journal.glob("*.jsonl")) and any(
                stalled_at < at < older for at, _ in list(seen)
            )

        wait_for(worst_moment, timeout=20)
        killed_at = time.monotonic()
        daemon.signal(signal.SIGKILL)
        daemon.wait(10)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
        if blocker is not None:
            blocker.execute("ROLLBACK")
            blocker.close()
    assert list(journal.glob("*.jsonl")), "the stalled rows should be waiting in the journal"

    daemon.start()  # a new process adopts the dead one's journal and replays it
    daemon.wait_ready()
    old = [rid for at, rid in seen if at < killed_at - 1.0]
    assert len(old) > 100

    def stored() -> set[str] | None:
        ids = {r["request_id"] for r in ledger_rows(daemon.ledger_path)}
        return ids if set(old) <= ids else None

    with contextlib.suppress(AssertionError):
        wait_for(stored, timeout=20)
    rows = ledger_rows(daemon.ledger_path)
    ids = [r["request_id"] for r in rows]
    missing = [rid for rid in old if rid not in set(ids)]
    assert not missing, f"{len(missing)} of {len(old)} rows lost"
    assert len(ids) == len(set(ids)), "a row was stored twice"
    # The real window: the youngest response whose row survived, and the oldest lost.
    times = dict((rid, at) for at, rid in seen)
    lost = [killed_at - times[rid] for rid in times if rid not in set(ids)]
    print(
        f"\nkill -9: {len(seen)} responses, {len(lost)} lost, oldest lost "
        f"{max(lost, default=0.0):.3f}s before the kill"
    )
    assert wait_for(lambda: not list(journal.glob("*.jsonl")), timeout=10)
    daemon.stop()
