"""The Responses API (``POST /v1/responses``) over chat completions, or passed through.

Three pure translations and one stream translator, one module each (``request``,
``reply``, ``events``):

- ``to_chat(body)``: a Responses request to a chat completions request (``input``
  as a string or items, ``instructions``, function ``tools`` and function-call
  items, ``text.format``, ``max_output_tokens``, ``top_logprobs``);
- ``response_from_chat(...)``: a chat completion to a Response object;
- ``ResponsesStream``: chat chunks to the Responses event sequence that the official
  client's ``responses.stream()`` consumes (``response.created``, ``…in_progress``,
  ``…output_item.added``, ``…content_part.added``, ``…output_text.delta``, …,
  ``response.completed`` with usage);
- ``observe``: reads ids, usage and errors from Responses events for the relay, for
  translated and passed-through streams alike.

Stateful features (``previous_response_id``, ``store: true``, ``conversation``,
``background``, stored prompts, item references) and built-in tools cannot be
translated: they are refused with a 400 unless the deployment passes requests through
to an upstream that speaks the Responses API itself (``responses_api: native``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

import orjson

from daemon.errors import InvalidRequest
from daemon.providers.base import Provider, Reply, UpstreamCall
from daemon.providers.openai_compat import OpenAICompatProvider
from daemon.requests import parse_chat
from daemon.surfaces.common import new_id
from daemon.surfaces.responses.events import ResponsesStream, observe, translate_stream
from daemon.surfaces.responses.reply import response_from_chat
from daemon.surfaces.responses.request import stateful_features, to_chat

__all__ = [
    "ResponsesStream",
    "ResponsesSurface",
    "observe",
    "response_from_chat",
    "stateful_features",
    "to_chat",
    "translate_stream",
]


def _native(provider: Provider) -> OpenAICompatProvider | None:
    if isinstance(provider, OpenAICompatProvider) and provider.responses_native:
        return provider
    return None


class ResponsesSurface:
    """One ``/v1/responses`` request: its chat form, and how to answer it per attempt."""

    operation = "responses"
    include_usage = True  # the usage travels in response.completed; nothing to drop

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.stream = body.get("stream") is True
        self.error: InvalidRequest | None = None
        try:
            self.chat_body = to_chat(body)
        except InvalidRequest as exc:
            # A native upstream may serve it (stored state, built-in tools): refuse it
            # only when an attempt would have to translate.
            self.error = exc
            self.chat_body = {"model": body.get("model"), "messages": [_placeholder(body)]}
            if self.stream:
                self.chat_body["stream"] = True
        params = parse_chat(self.chat_body)
        self.model = params.model
        self.observe = observe

    def check_servable(self, providers: Iterable[Provider]) -> None:
        """Refuse before admission what no deployment of the model can serve (stored
        state, built-in tools without a native upstream): a 400 that reserved nothing
        and used none of the key's requests per minute."""
        if self.error is not None and not any(_native(p) for p in providers):
            raise self.error

    def _passthrough(self, call: UpstreamCall) -> UpstreamCall:
        body = {**self.body, "model": call.body["model"]}
        return UpstreamCall(
            operation=call.operation,
            body=body,
            stream=call.stream,
            headers=call.headers,
            timeout_s=call.timeout_s,
        )

    async def complete(self, provider: Provider, call: UpstreamCall) -> Reply:
        native = _native(provider)
        if native is not None:
            return await native.create_response(self._passthrough(call))
        if self.error is not None:
            raise self.error
        reply = await provider.complete(call)
        response_id = new_id("resp_")
        try:
            chat = orjson.loads(reply.body)
        except orjson.JSONDecodeError:
            chat = {}
        body = orjson.dumps(response_from_chat(self.body, chat, response_id))
        return Reply(body, reply.tokens, reply.response_model, response_id, reply.finish_reasons)

    async def open_stream(
        self, provider: Provider, call: UpstreamCall
    ) -> AsyncIterator[list[bytes]]:
        native = _native(provider)
        if native is not None:
            return await native.open_response_stream(self._passthrough(call))
        if self.error is not None:
            raise self.error
        chunks = await provider.open_stream(call)
        model = str(call.body.get("model") or "")
        return translate_stream(chunks, ResponsesStream(self.body, new_id("resp_"), model))


def _placeholder(body: dict[str, Any]) -> dict[str, Any]:
    """A stand-in message for a request only a native upstream can serve: what the
    gateway's own accounting (prompt size estimates, spans) reads."""
    data = body.get("input")
    return {"role": "user", "content": data if isinstance(data, str) else ""}
