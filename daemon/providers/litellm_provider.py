"""Every provider that does not speak OpenAI's wire format (Anthropic, Bedrock, Gemini, ...).

litellm translates both ways. It takes seconds to import and, unless told otherwise,
fetches its price list from the network at import; so it is imported only when a
configured model needs it, always with ``LITELLM_LOCAL_MODEL_COST_MAP=True``, and in
a worker thread after start-up (``/readyz`` says "starting" until it is loaded).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import time
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from daemon.errors import GatewayError, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from daemon.providers.base import SSE_DONE, ProbeResult, Reply, UpstreamCall, sse_event
from daemon.providers.openai_compat import upstream_status_error


def _import_litellm() -> ModuleType:
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    litellm = importlib.import_module("litellm")
    settings = {
        "telemetry": False,
        "suppress_debug_info": True,
        "drop_params": True,  # drop OpenAI parameters a provider lacks, rather than fail
    }
    for name, value in settings.items():
        setattr(litellm, name, value)
    return litellm


async def load_litellm() -> ModuleType:
    """litellm, imported off the event loop the first time (the import lock makes
    concurrent first calls wait for one import)."""
    module = sys.modules.get("litellm")
    if module is not None and getattr(module, "drop_params", None) is True:
        return module
    return await asyncio.to_thread(_import_litellm)


OPENAI_PARAMETERS = frozenset(
    {
        # chat completions
        "messages",
        "temperature",
        "top_p",
        "n",
        "stream",
        "stream_options",
        "stop",
        "max_tokens",
        "max_completion_tokens",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "response_format",
        "seed",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "reasoning_effort",
        "modalities",
        "audio",
        "prediction",
        "service_tier",
        "web_search_options",
        # embeddings
        "input",
        "dimensions",
        "encoding_format",
    }
)


def litellm_error(exc: Exception, provider: str) -> GatewayError:
    name = type(exc).__name__
    if name in ("Timeout", "APITimeoutError"):
        return UpstreamTimeout(f"The upstream ({provider}) did not answer in time.")
    if name == "APIConnectionError":
        return UpstreamUnavailable(f"The upstream ({provider}) cannot be reached.")
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and status >= 400:
        message = str(getattr(exc, "message", "") or "")
        return upstream_status_error(status, message.encode(), provider)
    return UpstreamError(f"The upstream ({provider}) call failed ({name}).")


class LiteLLMProvider:
    def __init__(
        self,
        *,
        provider: str,
        model: str,
        api_base: str | None,
        api_key: str | None,
        timeout_s: float,
    ) -> None:
        self.name = provider
        self.model = model if model.startswith(provider + "/") else f"{provider}/{model}"
        self.api_base = api_base
        self.api_key = api_key
        self.timeout_s = timeout_s
        parts = urlsplit(api_base) if api_base else None
        self.server_address: str | None = parts.hostname if parts else None
        self.server_port: int | None = (
            (parts.port or (443 if parts.scheme == "https" else 80)) if parts else None
        )

    async def warm(self) -> None:
        await load_litellm()

    def _kwargs(self, call: UpstreamCall) -> dict[str, Any]:
        # Only OpenAI's request parameters pass: litellm also takes connection settings
        # (api_base, base_url, api_key, extra_headers, mock_response, ...) as keyword
        # arguments, and a client must never choose where the gateway's key is sent.
        body = {k: v for k, v in call.body.items() if k in OPENAI_PARAMETERS}
        body["model"] = self.model
        if self.api_base:
            body["api_base"] = self.api_base
        if self.api_key:
            body["api_key"] = self.api_key
        body["timeout"] = call.timeout_s or self.timeout_s
        if call.headers:
            body["extra_headers"] = call.headers
        return body

    async def complete(self, call: UpstreamCall) -> Reply:
        litellm = await load_litellm()
        try:
            response = await litellm.acompletion(**self._kwargs(call))
        except Exception as exc:
            raise litellm_error(exc, self.name) from exc
        body = response.model_dump(exclude_none=False)
        return Reply.from_json(response.model_dump_json().encode(), body)

    async def open_stream(self, call: UpstreamCall) -> AsyncIterator[list[bytes]]:
        litellm = await load_litellm()
        kwargs = self._kwargs(call)
        kwargs["stream"] = True
        try:
            stream = await litellm.acompletion(**kwargs)
        except Exception as exc:
            raise litellm_error(exc, self.name) from exc
        return self._events(stream)

    async def _events(self, stream: Any) -> AsyncIterator[list[bytes]]:
        try:
            async for chunk in stream:
                yield [sse_event(chunk.model_dump(exclude_none=True))]
        except Exception as exc:
            raise litellm_error(exc, self.name) from exc
        yield [SSE_DONE]

    async def embed(self, call: UpstreamCall) -> Reply:
        litellm = await load_litellm()
        kwargs = self._kwargs(call)
        try:
            response = await litellm.aembedding(**kwargs)
        except Exception as exc:
            raise litellm_error(exc, self.name) from exc
        body = response.model_dump(exclude_none=True)
        return Reply.from_json(response.model_dump_json().encode(), body)

    async def probe(self, timeout_s: float) -> ProbeResult:
        # No cheap, free, provider-neutral probe exists through litellm: a completion
        # would cost money. The model is "available" once litellm is loaded; real
        # traffic then marks it up or down.
        started = time.perf_counter()
        try:
            await asyncio.wait_for(load_litellm(), timeout_s)
        except Exception as exc:
            return ProbeResult(False, time.perf_counter() - started, f"litellm: {exc}")
        return ProbeResult(True, time.perf_counter() - started)
