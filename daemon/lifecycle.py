"""Where the process is in its life: starting, ready, draining, stopped.

/readyz and new requests read it; the server flips it to draining on SIGTERM.
"""

from __future__ import annotations

import time
from typing import Literal

from daemon.errors import ServiceUnavailable

State = Literal["starting", "ready", "draining", "stopped"]


class Lifecycle:
    def __init__(self) -> None:
        self.state: State = "starting"
        self.started_at = time.time()
        self.pending_warmups = 0

    def readiness(self, database_ok: bool) -> str:
        """What /readyz says: "ready", or why not."""
        if self.state != "ready":
            return self.state
        if self.pending_warmups:
            return "starting"
        return "ready" if database_ok else "database_unreachable"

    def begin_drain(self) -> None:
        if self.state in ("starting", "ready"):
            self.state = "draining"

    def check_accepting(self) -> None:
        """New model requests are refused once draining has begun."""
        if self.state in ("draining", "stopped"):
            raise ServiceUnavailable(
                "The gateway is shutting down; retry on another instance.",
                headers={"Retry-After": "1"},
            )
