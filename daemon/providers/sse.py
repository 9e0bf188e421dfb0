"""Server-sent events: split upstream bytes into complete events, read their data.

Upstream bytes are forwarded as they arrive, one complete event at a time (a client
cannot use half an event, so nothing useful is held back). What the gateway learns
from the events lives in ``daemon/relay.py``.
"""

from __future__ import annotations


class EventSplitter:
    """Accumulates bytes and hands out complete SSE events."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer + data if self._buffer else data
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        events = buffer.split(b"\n\n")
        self._buffer = events.pop()
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
