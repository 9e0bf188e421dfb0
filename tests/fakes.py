"""Small real upstream servers for tests (an OpenAI-compatible one and an Anthropic one),
and a real ledger store with chosen calls failing.

They speak the real wire formats over real sockets (served by uvicorn in a thread),
and record what they received so tests can check what the gateway sent.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from daemon.ledger.base import Store


class Failing:
    """A real store whose ``failing`` calls raise ``error()`` while ``down`` is set."""

    def __init__(self, store: Store, failing: frozenset[str], error: Callable[[], Exception]):
        self.inner = store
        self.failing = failing
        self.error = error
        self.down = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in self.failing:
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise self.error()
            return await attr(*args, **kwargs)

        return call


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class Upstream:
    """Behaviour knobs and the record of requests."""

    received: list[Received] = field(default_factory=list)
    status: int = 200
    delay_s: float = 0.0
    hang: bool = False
    reply_words: tuple[str, ...] = ("Hello", "from", "upstream")
    usage: tuple[int, int] = (11, 3)  # prompt, completion tokens it reports
    cached_tokens: int | None = None  # reported as prompt_tokens_details.cached_tokens

    def posts(self) -> list[Received]:
        """What the gateway sent, without its health probes (GET /v1/models)."""
        return [r for r in self.received if r.body]

    async def _record(self, request: Request) -> dict[str, Any]:
        body = await request.json() if request.method == "POST" else {}
        self.received.append(Received(request.url.path, dict(request.headers), body))
        if self.hang:
            await asyncio.sleep(3600)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return body


def openai_upstream(state: Upstream) -> Starlette:
    def usage() -> dict[str, Any]:
        p, c = state.usage
        reported: dict[str, Any] = {
            "prompt_tokens": p,
            "completion_tokens": c,
            "total_tokens": p + c,
        }
        if state.cached_tokens is not None:
            reported["prompt_tokens_details"] = {"cached_tokens": state.cached_tokens}
        return reported

    async def chat(request: Request) -> Response:
        body = await state._record(request)
        if state.status != 200:
            return JSONResponse(
                {"error": {"message": "upstream says no", "type": "server_error", "code": None}},
                status_code=state.status,
            )
        created = int(time.time())
        if not body.get("stream"):
            return JSONResponse(
                {
                    "id": "chatcmpl-up-1",
                    "object": "chat.completion",
                    "created": created,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": " ".join(state.reply_words),
                            },
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage(),
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events() -> Any:
            def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
                payload: dict[str, Any] = {
                    "id": "chatcmpl-up-2",
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": body["model"],
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                }
                if include_usage:
                    payload["usage"] = None
                return f"data: {json.dumps(payload)}\n\n"

            yield chunk({"role": "assistant", "content": ""})
            for word in state.reply_words:
                yield chunk({"content": word + " "})
            yield chunk({}, "stop")
            if include_usage:
                final = {
                    "id": "chatcmpl-up-2",
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": body["model"],
                    "choices": [],
                    "usage": usage(),
                }
                yield f"data: {json.dumps(final)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def embeddings(request: Request) -> Response:
        body = await state._record(request)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": [0.1, 0.2]}
                    for i in range(len(inputs))
                ],
                "model": body["model"],
                "usage": {"prompt_tokens": 5, "total_tokens": 5},
            }
        )

    async def models(request: Request) -> Response:
        await state._record(request)
        return JSONResponse({"object": "list", "data": [{"id": "up-model", "object": "model"}]})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
        ]
    )


def anthropic_upstream(state: Upstream) -> Starlette:
    """Anthropic's Messages API (POST /v1/messages), JSON and SSE."""

    async def messages(request: Request) -> Response:
        body = await state._record(request)
        p, c = state.usage
        text = " ".join(state.reply_words)
        if not body.get("stream"):
            return JSONResponse(
                {
                    "id": "msg_01",
                    "type": "message",
                    "role": "assistant",
                    "model": body["model"],
                    "content": [{"type": "text", "text": text}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": {"input_tokens": p, "output_tokens": c},
                }
            )

        async def events() -> Any:
            def event(name: str, data: dict[str, Any]) -> str:
                return f"event: {name}\ndata: {json.dumps(data)}\n\n"

            yield event(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": "msg_02",
                        "type": "message",
                        "role": "assistant",
                        "model": body["model"],
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {"input_tokens": p, "output_tokens": 1},
                    },
                },
            )
            yield event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            )
            for i, word in enumerate(state.reply_words):
                yield event(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": word if i == 0 else " " + word},
                    },
                )
            yield event("content_block_stop", {"type": "content_block_stop", "index": 0})
            yield event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": c},
                },
            )
            yield event("message_stop", {"type": "message_stop"})

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/messages", messages, methods=["POST"])])
