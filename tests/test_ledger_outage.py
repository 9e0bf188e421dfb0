"""PostgreSQL stopped for 30 s under load, then started again: a private PostgreSQL
(initdb + pg_ctl on a free port, in a temporary folder; the shared one is never
touched), a real daemon, real clients. Afterwards rows equal responses, none twice,
the daemon's memory stayed bounded, and nothing needed a restart."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.helpers import ADMIN_KEY, Daemon, base_config, free_port, wait_for, write_config

OUTAGE_S = 30.0


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if found:
        return found[-1].parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


class PrivatePostgres:
    def __init__(self, directory: Path, port: int, bindir: Path) -> None:
        self.directory, self.port, self.bindir = directory, port, bindir
        self.data = directory / "pgdata"
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def _run(self, *args: str) -> None:
        command = [str(self.bindir / args[0]), *args[1:]]
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise subprocess.SubprocessError(f"{args[0]} failed: {done.stderr or done.stdout}")

    def init(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.directory, user.pw_uid, user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-w",
            "-l",
            str(self.directory / "pg.log"),
            "start",
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    bindir = _pg_bin()
    if bindir is None or (os.geteuid() == 0 and not _has_user("postgres")):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    # Not under pytest's 0700 temp root: the postgres user must reach its data folder.
    directory = Path(tempfile.mkdtemp(prefix="chatvault-pg-"))
    os.chmod(directory, 0o755)
    pg = PrivatePostgres(directory / "cluster", free_port(), bindir)
    try:
        pg.init()
        pg.start()
        yield pg
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            pg.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _load(url: str, stop: threading.Event, seen: list[str], errors: list[int]) -> None:
    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.is_set():
            r = client.post(
                "/v1/chat/completions",
                json={"model": "mock", "messages": [{"role": "user", "content": "outage"}]},
                headers={"authorization": f"Bearer {ADMIN_KEY}"},
            )
            if r.status_code == 200:
                seen.append(r.headers["x-request-id"])
            else:
                errors.append(r.status_code)
            time.sleep(0.01)


def test_postgres_down_for_30s_under_load_loses_nothing(
    private_postgres: PrivatePostgres, tmp_path: Path
) -> None:
    config = base_config(free_port())
    config["ledger"] = {"url": private_postgres.url, "flush_interval_s": 0.05}
    daemon = Daemon(write_config(tmp_path, config))
    daemon.start()
    daemon.wait_ready()
    assert daemon.process is not None
    pid = daemon.process.pid
    seen: list[str] = []
    errors: list[int] = []
    stop = threading.Event()
    threads = [
        threading.Thread(target=_load, args=(daemon.url, stop, seen, errors)) for _ in range(3)
    ]
    for t in threads:
        t.start()
    rss: list[float] = []
    try:
        wait_for(lambda: len(seen) >= 200, timeout=30)  # steady traffic before the outage
        rss.append(_rss_mb(pid))
        private_postgres.stop()
        down_since = time.monotonic()
        while time.monotonic() - down_since < OUTAGE_S:
            time.sleep(1)
            rss.append(_rss_mb(pid))
        during = len(seen)
        private_postgres.start()
        wait_for(lambda: len(seen) >= during + 200, timeout=30)  # and traffic after it
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert daemon.process.poll() is None, "the daemon died"
    assert not errors, f"clients saw errors: {sorted(set(errors))}"
    assert during > 500  # the gateway kept serving through the outage

    async def stored() -> list[str]:
        conn = await asyncpg.connect(private_postgres.url)
        try:
            return [r[0] for r in await conn.fetch("SELECT request_id FROM requests")]
        finally:
            await conn.close()

    wait_for(lambda: len(asyncio.run(stored())) >= len(seen), timeout=30, interval=0.5)
    ids = asyncio.run(stored())
    assert sorted(ids) == sorted(seen), "rows differ from responses"
    assert len(ids) == len(set(ids)), "a row was stored twice"
    # Bounded: rows went to memory queues and the journal, not an unbounded list.
    assert max(rss) - rss[0] < 60, f"RSS grew from {rss[0]:.0f} to {max(rss):.0f} MB"
    daemon.stop()
