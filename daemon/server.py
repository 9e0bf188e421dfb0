"""Running the daemon: uvicorn with a graceful drain, one process or several.

``serve`` binds the socket itself (so a busy port is a clear one-line error), checks
that the ledger opens, then runs either one uvicorn server in this process or a small
supervisor with N worker processes sharing the socket. SIGTERM or SIGINT stops
accepting, lets in-flight requests finish (up to ``server.drain_timeout_s``), flushes
the ledger in the app's lifespan, and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import logging.config
import os
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Generator, Mapping
from pathlib import Path
from types import FrameType
from typing import cast

import psutil
import uvicorn

from daemon.app import create_app
from daemon.config import Settings
from daemon.connections import with_deadlines
from daemon.ledger import open_store
from daemon.ledger.base import redact_text, redact_url
from daemon.lifecycle import Lifecycle
from daemon.logs import logging_config
from daemon.state import ensure_admin_key
from daemon.supervisor import STARTUP_FAILURE, Supervisor

log = logging.getLogger("chatvault.server")


# Allocations (less deallocations) between young-generation garbage collections.
GC_YOUNG_THRESHOLD = 10_000


class StartupError(Exception):
    """The daemon cannot start; the message says why, for the operator."""


class ChatVaultServer(uvicorn.Server):
    """uvicorn's server, telling the app when draining starts, and exiting 0 after it."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # What exists after start-up lives as long as the process: keep it out of the
        # garbage collector's full passes, which otherwise stall requests as it grows.
        gc.collect()
        gc.freeze()
        # A young-generation pass every 700 allocations (the default) ran every ~6
        # requests under load, set off by the objects of the requests in flight rather
        # than by garbage, and every 10th/100th pass went through the older generations:
        # 70-120 µs of CPU per request (gc.callbacks, bench/compare.py's load). At 10,000
        # no pass ran in 6,000 requests; cyclic garbage is still collected, later.
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.lifecycle.begin_drain()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn re-raises the signal after shutdown, which makes the exit status
        # "killed by SIGTERM"; a completed drain is a clean exit.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        sigs = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in sigs}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def preflight(settings: Settings, environ: Mapping[str, str]) -> None:
    """Fail early, with one clear line, on what would otherwise fail in every worker."""
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        ensure_admin_key(settings.state_file, settings.auth.admin_key_env, environ)
    except OSError as exc:
        raise StartupError(f"data directory {settings.data_dir}: {exc.strerror or exc}") from None

    async def open_ledger() -> None:
        ledger = settings.ledger
        store = open_store(
            ledger.url,
            migrate="apply" if ledger.migrate_on_start else "check",
            journal_dir=ledger.journal_dir,
        )
        try:
            await store.open()
        finally:
            await store.close()

    try:
        asyncio.run(open_ledger())
    except Exception as exc:
        url = settings.ledger.url
        raise StartupError(f"ledger {redact_url(url)}: {redact_text(str(exc), url)}") from None


def _uvicorn_config(settings: Settings) -> tuple[uvicorn.Config, Lifecycle]:
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        lifespan="on",
        access_log=False,  # the app writes its own JSON access line
        log_config=logging_config(),
        # uvicorn types this as int, but waits with it as a float: 0.5 s must stay 0.5 s.
        timeout_graceful_shutdown=cast(int, settings.server.drain_timeout_s),
        server_header=False,
        proxy_headers=False,
        http=with_deadlines(settings.server.header_timeout_s, settings.server.body_timeout_s),
        limit_concurrency=settings.server.limit_concurrency,
        # uvicorn types this as int too, and schedules it with call_later.
        timeout_keep_alive=cast(int, settings.server.keep_alive_s),
    )
    return config, app.state.gateway.lifecycle


def tune_process() -> None:
    """The span exporter and the ledger writer are threads; a shorter switch interval
    (default 5 ms) lets the event loop take the GIL back sooner, which is what keeps
    tail latency low while they work."""
    sys.setswitchinterval(0.001)


def run_worker(settings: Settings, sock: socket.socket) -> None:
    """One server process. Exits 3 when the app could not start."""
    tune_process()
    config, lifecycle = _uvicorn_config(settings)
    server = ChatVaultServer(config, lifecycle)
    server.run(sockets=[sock])
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def serve(settings: Settings, environ: Mapping[str, str] | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status."""
    environ = os.environ if environ is None else environ
    logging.config.dictConfig(logging_config())
    preflight(settings, environ)
    if settings.server.workers > 1 and settings.limits.backend == "memory":
        raise StartupError(
            f"--workers {settings.server.workers} with limits.backend: memory would give each "
            "worker its own rate limits and budgets (each key would get N times its limits); "
            "set limits.backend: redis to share them (docs/scaling.md), or run one worker"
        )
    host, port, workers = settings.server.host, settings.server.port, settings.server.workers
    sock = bind(host, port)
    log.info(
        "chatvault listening",
        extra={"fields": {"url": f"http://{host}:{sock.getsockname()[1]}", "workers": workers}},
    )
    try:
        if workers == 1:
            tune_process()
            config, lifecycle = _uvicorn_config(settings)
            server = ChatVaultServer(config, lifecycle)
            server.run(sockets=[sock])
            return 0 if server.started else STARTUP_FAILURE
        return _supervise(settings, sock, workers)
    finally:
        sock.close()


def metrics_dir(settings: Settings) -> Path:
    """A fresh private directory for the workers' metric files.

    Named after this supervisor's pid so two daemons never share one; directories
    left by supervisors that are gone are removed.
    """
    base = settings.data_dir
    for stale in base.glob("prometheus-multiproc.*"):
        pid = stale.suffix.lstrip(".")
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    path = base / f"prometheus-multiproc.{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, mode=0o700)
    return path


def _supervise(settings: Settings, sock: socket.socket, workers: int) -> int:
    """Keep N workers alive; on a signal, pass SIGTERM on and wait for their drain."""
    mp_dir = metrics_dir(settings)
    # Inherited by the spawned workers: their counters land in mp_dir, summed per scrape.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(mp_dir)
    try:
        return Supervisor(
            target=run_worker,
            args=(settings, sock),
            workers=workers,
            drain_timeout_s=settings.server.drain_timeout_s,
            metrics_dir=mp_dir,
        ).run()
    finally:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(mp_dir, ignore_errors=True)
