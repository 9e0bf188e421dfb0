"""A lean HTTP/1.1 load generator: keep-alive connections, httptools, no client library.

A general-purpose client spends more CPU per request than the gateway under test; on
a 2-core machine that would measure the client. Each connection sends its requests
one after another; ``concurrency`` connections run at once. Latency is arrival of the
last byte; time to first token is the first body bytes of a stream.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httptools


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(round(q / 100 * (len(ordered) - 1)), len(ordered) - 1)
    return ordered[index]


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[int] | None = None
        self.first_body: float | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("connection closed"))
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        if self.first_body is None:
            self.first_body = time.perf_counter()

    def on_message_complete(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(self.parser.get_status_code())

    async def send(self, request: bytes) -> tuple[int, float | None]:
        assert self.transport is not None
        self.done = asyncio.get_running_loop().create_future()
        self.first_body = None
        self.transport.write(request)
        status = await self.done
        return status, self.first_body


def build_request(host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"host: {host}:{port}",
        "content-type: application/json",
        f"content-length: {len(body)}",
    ]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def run(
    host: str,
    port: int,
    request: bytes,
    *,
    concurrency: int,
    count: int | None = None,
    duration: float | None = None,
) -> Result:
    """Send ``count`` requests in total, or as many as fit in ``duration`` seconds."""
    loop = asyncio.get_running_loop()
    result = Result()
    remaining = [count if count is not None else 1 << 62]
    deadline = time.perf_counter() + duration if duration is not None else float("inf")

    async def worker() -> None:
        _, conn = await loop.create_connection(_Connection, host, port)
        try:
            while remaining[0] > 0 and time.perf_counter() < deadline:
                remaining[0] -= 1
                started = time.perf_counter()
                try:
                    status, first = await conn.send(request)
                except ConnectionError:
                    result.errors += 1
                    return
                ended = time.perf_counter()
                if status != 200:
                    result.errors += 1
                    continue
                result.latencies.append(ended - started)
                if first is not None:
                    result.ttfts.append(first - started)
        finally:
            if conn.transport is not None:
                conn.transport.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - started
    return result
