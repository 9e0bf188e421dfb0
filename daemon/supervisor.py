"""Several worker processes sharing one listening socket, kept alive by a supervisor.

Modelled on uvicorn's ``supervisors/multiprocess.py``: spawn N workers, watch them,
replace one that dies, and on SIGTERM/SIGINT pass the signal on and wait for their
drain. A worker that dies is restarted with back-off; the supervisor gives up only
when workers keep dying (``max_restarts`` within ``window_s``), or when one cannot
start at all (exit 3: its configuration or ledger is broken, restarting cannot help).

    Supervisor(target=run_worker, args=(settings, sock), workers=4,
               drain_timeout_s=30, metrics_dir=path).run()
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

from prometheus_client import multiprocess as prom_multiprocess

log = logging.getLogger("chatvault.server")

STARTUP_FAILURE = 3


class Supervisor:
    def __init__(
        self,
        *,
        target: Callable[..., None],
        args: tuple[Any, ...],
        workers: int,
        drain_timeout_s: float,
        metrics_dir: Path,
        max_restarts: int = 5,
        window_s: float = 60.0,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
    ) -> None:
        self.target = target
        self.args = args
        self.workers = workers
        self.drain_timeout_s = drain_timeout_s
        self.metrics_dir = metrics_dir
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.context = multiprocessing.get_context("spawn")
        self.processes: list[BaseProcess] = []
        self.restarts: deque[float] = deque()  # when workers were restarted, newest last
        self.should_exit = threading.Event()
        self.status = 0

    def run(self) -> int:
        previous = {
            s: signal.signal(s, self.handle_signal) for s in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            self.processes = [self.start_worker() for _ in range(self.workers)]
            while not self.should_exit.wait(0.5):
                self.restart_dead_workers()
        finally:
            self.terminate_all()
            self.join_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        # A worker still starting when SIGTERM came dies of it: it had nothing in flight.
        clean = (0, -signal.SIGTERM)
        if self.status == 0 and any(p.exitcode not in clean for p in self.processes):
            self.status = 1
        return self.status

    def handle_signal(self, sig: int, frame: FrameType | None) -> None:
        self.should_exit.set()

    def start_worker(self) -> BaseProcess:
        process = self.context.Process(target=self.target, args=self.args, name="chatvault-worker")
        process.start()
        return process

    def restart_dead_workers(self) -> None:
        for i, process in enumerate(self.processes):
            if process.is_alive() or self.should_exit.is_set():
                continue
            if process.exitcode == STARTUP_FAILURE:
                self.give_up(f"worker {process.pid} could not start (exit {process.exitcode})")
                return
            now = time.monotonic()
            while self.restarts and now - self.restarts[0] > self.window_s:
                self.restarts.popleft()
            if len(self.restarts) >= self.max_restarts:
                self.give_up(
                    f"{len(self.restarts)} worker restarts within {self.window_s:g}s; "
                    f"worker {process.pid} died again (exit {process.exitcode})"
                )
                return
            delay = min(self.backoff_s * 2 ** len(self.restarts), self.max_backoff_s)
            log.warning(
                "worker %s died (exit %s); restarting in %.1fs (%d restarts in the last %gs)",
                process.pid,
                process.exitcode,
                delay,
                len(self.restarts) + 1,
                self.window_s,
            )
            if process.pid is not None:
                prom_multiprocess.mark_process_dead(process.pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]
            if self.should_exit.wait(delay):
                return
            self.restarts.append(time.monotonic())
            self.processes[i] = self.start_worker()

    def give_up(self, reason: str) -> None:
        log.error("%s; stopping", reason)
        self.status = STARTUP_FAILURE
        self.should_exit.set()

    def terminate_all(self) -> None:
        for process in self.processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)

    def join_all(self) -> None:
        deadline = self.drain_timeout_s + 15
        for process in self.processes:
            process.join(deadline)
            if process.is_alive():
                log.error("worker %s did not stop in time; killing it", process.pid)
                process.kill()
                process.join()
