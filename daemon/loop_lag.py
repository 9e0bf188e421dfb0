"""Event-loop lag: how late the loop wakes a task that asked to sleep.

Everything the daemon serves runs on one event loop per process; a request that
holds it (a big parse, a CPU-heavy mock answer) delays every other client by as
long. ``LoopLag.run`` sleeps ``interval_s`` again and again and records how much
later than asked it woke: into the ``chatvault_event_loop_lag_seconds`` histogram,
and into a short window that /health's performance block shows.

    lag = LoopLag(record=metrics.record_loop_lag)
    task = asyncio.create_task(lag.run())
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable


class LoopLag:
    def __init__(
        self, record: Callable[[float], None], *, interval_s: float = 0.1, window: int = 600
    ) -> None:
        self.record = record
        self.interval_s = interval_s
        self._recent: deque[float] = deque(maxlen=window)  # 60 s at the default interval

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.observe(max(0.0, loop.time() - asked))

    def observe(self, lag_s: float) -> None:
        self._recent.append(lag_s)
        self.record(lag_s)

    def summary(self) -> dict[str, float | None]:
        """For /health: the last sample and the worst of the window, in milliseconds."""
        if not self._recent:
            return {"last_ms": None, "max_ms": None, "window_s": self._window_s()}
        return {
            "last_ms": round(self._recent[-1] * 1000, 2),
            "max_ms": round(max(self._recent) * 1000, 2),
            "window_s": self._window_s(),
        }

    def _window_s(self) -> float:
        return round((self._recent.maxlen or 0) * self.interval_s, 1)
