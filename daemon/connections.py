"""Client connections: a deadline for request headers, which uvicorn does not have.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but waits for ever
for a request's headers: a thousand clients that connect and send nothing, or send
their headers a byte a second, would each hold a connection (and count against
``limit_concurrency``) for as long as they like. This protocol arms a timer when a
connection opens, and again when the next request on it begins, and closes the
connection if the headers are not complete when it fires. The body's deadline is
``server.body_timeout_s``, enforced where the body is read (``requests.read_body``).

    config = uvicorn.Config(app, http=with_header_deadline(10.0), limit_concurrency=2048)

It extends uvicorn's httptools protocol (httptools comes with uvicorn[standard], and
is what uvicorn picks by itself when installed).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """Per request this only notes when the headers are due (``loop.time()`` and two
    attribute writes); one timer per connection, re-armed as it fires, does the
    checking. Arming and cancelling a timer per request cost about 4 us."""

    header_timeout_s = 10.0
    _headers_due: float | None = None
    _check: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._headers_due = self.loop.time() + self.header_timeout_s
        self._check = self.loop.call_later(self.header_timeout_s, self._check_headers)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._headers_due is None:  # the next request on a kept-alive connection
            self._headers_due = self.loop.time() + self.header_timeout_s

    def on_headers_complete(self) -> None:
        self._headers_due = None
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Answered before its body was all read (a 401, a 413): uvicorn keeps reading
        # and dropping the rest, and each byte would put off its keep-alive timeout.
        # The rest and the next request's headers get one header deadline.
        cycle = self.cycle
        if cycle is not None and cycle.more_body and self._headers_due is None:
            self._headers_due = self.loop.time() + self.header_timeout_s

    def connection_lost(self, exc: Exception | None) -> None:
        if self._check is not None:
            self._check.cancel()
            self._check = None
        super().connection_lost(exc)

    def _check_headers(self) -> None:
        if self.transport.is_closing():
            self._check = None
            return
        due, now = self._headers_due, self.loop.time()
        if due is not None and now >= due:
            self._check = None
            self.transport.close()
            return
        wait = due - now if due is not None else self.header_timeout_s
        self._check = self.loop.call_later(wait, self._check_headers)


def with_header_deadline(timeout_s: float) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, closing connections whose headers are late."""

    class Protocol(HeaderDeadlineProtocol):
        header_timeout_s = timeout_s

    return Protocol
