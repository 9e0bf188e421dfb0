"""The built-in mock model: in-process, deterministic, free.

It answers like an OpenAI server so that demos, tests and benchmarks exercise the
whole gateway without a model. Replies depend only on the request, streams go word
by word, and token counts are real counts of the text sent and returned (one token
per word or punctuation mark). Two markers in the last user message make it fail on
purpose: ``mock:fail`` (an upstream error before any output) and
``mock:fail-mid-stream`` (an error event after the first words of a stream).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import secrets
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from daemon.config import MockOptions
from daemon.errors import InvalidRequest, UpstreamError
from daemon.providers.base import SSE_DONE, ProbeResult, Reply, UpstreamCall, sse_event
from daemon.usage import TokenCounts

_TOKEN = re.compile(r"\w+|[^\w\s]")
_ECHO_WORDS = 24


def count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return " ".join(
            str(p.get("text", ""))
            for p in content
            if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def prompt_tokens(messages: list[Any]) -> int:
    # One token per message for its role, as real chat templates spend some too.
    return sum(
        1 + count_tokens(message_text(m.get("content"))) for m in messages if isinstance(m, dict)
    )


def last_user_text(messages: list[Any]) -> str:
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            return message_text(m.get("content"))
    return ""


class MockProvider:
    name = "mock"
    server_address: str | None = None
    server_port: int | None = None

    def __init__(self, model: str, options: MockOptions | None = None) -> None:
        self.model = model
        self.options = options or MockOptions()

    def reply_words(self, messages: list[Any]) -> list[str]:
        if self.options.reply is not None:
            text = self.options.reply
        else:
            said = " ".join(last_user_text(messages).split()[:_ECHO_WORDS])
            text = f"This is ChatVault's mock model. You said: {said}".strip()
        return text.split()

    def _plan(self, body: dict[str, Any]) -> tuple[list[str], str, int]:
        messages = body.get("messages") or []
        words = self.reply_words(messages)
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        finish = "stop"
        if isinstance(limit, int) and limit > 0:
            kept, used = [], 0
            for word in words:
                n = count_tokens(word)
                if used + n > limit:
                    finish = "length"
                    break
                kept.append(word)
                used += n
            words = kept
        return words, finish, prompt_tokens(messages)

    def _check_failure(self, body: dict[str, Any]) -> bool:
        text = last_user_text(body.get("messages") or [])
        if "mock:fail-mid-stream" in text:
            return True
        if "mock:fail" in text:
            raise UpstreamError("The mock model failed on purpose (mock:fail).")
        return False

    async def _delay(self, seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds)

    async def complete(self, call: UpstreamCall) -> Reply:
        self._check_failure(call.body)
        await self._delay(self.options.latency_s)
        words, finish, n_in = self._plan(call.body)
        text = " ".join(words)
        tokens = TokenCounts(input=n_in, output=count_tokens(text))
        response_id = "chatcmpl-" + secrets.token_hex(12)
        body = {
            "id": response_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": _usage(tokens),
        }
        return Reply(orjson.dumps(body), tokens, self.model, response_id, (finish,))

    async def open_stream(self, call: UpstreamCall) -> AsyncIterator[list[bytes]]:
        fail_mid_stream = self._check_failure(call.body)
        words, finish, n_in = self._plan(call.body)
        include_usage = bool((call.body.get("stream_options") or {}).get("include_usage"))
        await self._delay(self.options.latency_s)
        return self._stream(words, finish, n_in, include_usage, fail_mid_stream)

    async def _stream(
        self, words: list[str], finish: str, n_in: int, include_usage: bool, fail: bool
    ) -> AsyncIterator[list[bytes]]:
        response_id = "chatcmpl-" + secrets.token_hex(12)
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            payload: dict[str, Any] = {
                "id": response_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                ],
            }
            if include_usage:
                payload["usage"] = None
            return sse_event(payload)

        yield [chunk({"role": "assistant", "content": ""})]
        for i, word in enumerate(words):
            await self._delay(self.options.chunk_delay_s)
            yield [chunk({"content": word if i == 0 else " " + word})]
            if fail and i == 1:
                error = {
                    "message": "The mock model failed mid-stream on purpose.",
                    "type": "upstream_error",
                    "param": None,
                    "code": "bad_gateway",
                }
                yield [sse_event({"error": error})]
                return
        yield [chunk({}, finish)]
        if include_usage:
            tokens = TokenCounts(input=n_in, output=count_tokens(" ".join(words)))
            final = {
                "id": response_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model,
                "choices": [],
                "usage": _usage(tokens),
            }
            yield [sse_event(final)]
        yield [SSE_DONE]

    async def embed(self, call: UpstreamCall) -> Reply:
        raw = call.body.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            raise InvalidRequest("The mock model embeds strings only.", param="input")
        await self._delay(self.options.latency_s)
        dims = call.body.get("dimensions") or self.options.embedding_dimensions
        n_in = sum(count_tokens(text) for text in inputs)
        body = {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": _vector(text, int(dims))}
                for i, text in enumerate(inputs)
            ],
            "model": self.model,
            "usage": {"prompt_tokens": n_in, "total_tokens": n_in},
        }
        return Reply(orjson.dumps(body), TokenCounts(input=n_in), self.model)

    async def probe(self, timeout_s: float) -> ProbeResult:
        return ProbeResult(ok=True, latency_s=0.0)


def _usage(tokens: TokenCounts) -> dict[str, int]:
    return {
        "prompt_tokens": tokens.input,
        "completion_tokens": tokens.output,
        "total_tokens": tokens.total,
    }


def _vector(text: str, dims: int) -> list[float]:
    """A deterministic unit vector from the text's hash."""
    seed = hashlib.sha256(text.encode()).digest()
    raw: list[float] = []
    counter = 0
    while len(raw) < dims:
        block = hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        raw.extend(v / 2**31 - 1.0 for v in struct.unpack(">8I", block))
        counter += 1
    raw = raw[:dims]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]
