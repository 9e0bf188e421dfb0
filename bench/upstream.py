"""A fast OpenAI-compatible mock upstream for benchmarks: raw asyncio + httptools.

Several thousand requests per second on one core, so that the upstream is never what
a benchmark measures. Non-streamed and SSE-streamed chat completions with a
configurable number of chunks and latency; keep-alive; GET /v1/models for probes.

    python -m bench.upstream --port 9100 --chunks 16 --latency-ms 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import httptools

WORD = "tok"


def completion_body(model: str, chunks: int) -> bytes:
    text = " ".join([WORD] * chunks)
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": 12,
                "completion_tokens": chunks,
                "total_tokens": 12 + chunks,
            },
        },
        separators=(",", ":"),
    ).encode()


def stream_events(model: str, chunks: int, include_usage: bool) -> list[bytes]:
    def event(payload: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

    base = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
    }
    events = [
        event(
            {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                    }
                ],
            }
        )
    ]
    for i in range(chunks):
        events.append(
            event(
                {
                    **base,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"content": WORD if i == 0 else " " + WORD},
                            "finish_reason": None,
                        }
                    ],
                }
            )
        )
    events.append(event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    if include_usage:
        events.append(
            event(
                {
                    **base,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": 12,
                        "completion_tokens": chunks,
                        "total_tokens": 12 + chunks,
                    },
                }
            )
        )
    events.append(b"data: [DONE]\n\n")
    return events


def _chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


MODELS = b'{"object":"list","data":[{"id":"bench-model","object":"model"}]}'


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body, self.body = b"".join(self.body), []
        method = self.parser.get_method()
        if method == b"GET":
            self._respond(200, b"application/json", MODELS)
            return
        try:
            request = json.loads(body) if body else {}
        except ValueError:
            self._respond(400, b"application/json", b'{"error":{"message":"bad json"}}')
            return
        model = str(request.get("model", "bench-model"))
        delay = self.options.latency_ms / 1000
        if request.get("stream"):
            include = bool((request.get("stream_options") or {}).get("include_usage"))
            events = stream_events(model, self.options.chunks, include)
            if delay:
                asyncio.get_running_loop().call_later(delay, self._stream, events)
            else:
                self._stream(events)
            return
        payload = completion_body(model, self.options.chunks)
        if delay:
            asyncio.get_running_loop().call_later(
                delay, self._respond, 200, b"application/json", payload
            )
        else:
            self._respond(200, b"application/json", payload)

    def _respond(self, status: int, content_type: bytes, payload: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        head = b"HTTP/1.1 %d OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n" % (
            status,
            content_type,
            len(payload),
        )
        self.transport.write(head + payload)

    def _stream(self, events: list[bytes]) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        gap = self.options.chunk_delay_ms / 1000
        if not gap:
            self.transport.write(head + b"".join(_chunked(e) for e in events) + b"0\r\n\r\n")
            return
        self.transport.write(head + _chunked(events[0]))
        loop = asyncio.get_running_loop()
        for i, event in enumerate(events[1:], start=1):
            loop.call_later(gap * i, self._write, _chunked(event))
        loop.call_later(gap * len(events), self._write, b"0\r\n\r\n")

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


async def serve(options: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: UpstreamProtocol(options), options.host, options.port, backlog=4096
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument(
        "--chunks", type=int, default=16, help="content chunks per answer (and completion tokens)"
    )
    parser.add_argument("--latency-ms", type=float, default=0.0, help="before the first byte")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="between streamed chunks")
    options = parser.parse_args()
    try:
        import uvloop

        uvloop.run(serve(options))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
