"""Server-sent events: split upstream bytes into complete events, read their data.

Upstream bytes are forwarded as they arrive, one complete event at a time (a client
cannot use half an event, so nothing useful is held back). What the gateway learns
from the events lives in ``daemon/relay.py``.
"""

from __future__ import annotations

from daemon.errors import UpstreamError

MAX_EVENT_BYTES = 8 * 1024 * 1024


class EventSplitter:
    """Accumulates bytes and hands out complete SSE events.

    An event may not grow past ``max_event_bytes``: an upstream that never ends one
    (no blank line) fails the call instead of filling memory.
    """

    __slots__ = ("_buffer", "max_event_bytes", "provider")

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES, provider: str = "upstream") -> None:
        self._buffer = b""
        self.max_event_bytes = max_event_bytes
        self.provider = provider

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer + data if self._buffer else data
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        events = buffer.split(b"\n\n")
        self._buffer = events.pop()
        if len(self._buffer) > self.max_event_bytes:
            self._buffer = b""
            raise UpstreamError(
                f"The upstream ({self.provider}) sent more than {self.max_event_bytes} bytes "
                "without ending an event; the call was stopped."
            )
        return [e + b"\n\n" for e in events if e]

    def rest(self) -> bytes:
        """What is left when the upstream closed mid-event."""
        rest, self._buffer = self._buffer, b""
        return rest


def event_data(event: bytes) -> bytes | None:
    """The payload of an event's ``data:`` lines, joined as the SSE spec says."""
    if event.startswith(b"data:") and event.count(b"\n") <= 2:
        return event[5:].strip()
    parts = [line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(parts) if parts else None
