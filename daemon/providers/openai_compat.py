"""Any OpenAI-compatible server (OpenAI, vLLM, LM Studio, Ollama's /v1, ...).

All deployments share one pooled ``httpx.AsyncClient`` owned by the app's lifespan.
Bodies are passed through as bytes: a non-streamed answer is parsed once to read its
usage and sent back unchanged; a stream is forwarded event by event as it arrives.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from daemon.errors import (
    GatewayError,
    InvalidRequest,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from daemon.providers.base import ProbeResult, Reply, StreamInfo, UpstreamCall
from daemon.providers.sse import EventSplitter

_MAX_MESSAGE = 500


def upstream_status_error(status: int, body: bytes, provider: str) -> GatewayError:
    """Map an upstream's error status to what the client should see.

    The client's own mistakes (400, 422) and the upstream's rate limits (429) pass
    through as such; anything about the gateway's credentials or configuration (401,
    403, 404) and server errors become 502: the client's key is fine, the gateway's
    side is not.
    """
    message = _error_message(body)
    if status in (400, 413, 422):
        return InvalidRequest(f"The upstream rejected the request: {message}")
    if status == 429:
        return RateLimited(
            f"The upstream provider is rate limiting: {message}",
            code="upstream_rate_limited",
            headers={"Retry-After": "1"},
        )
    if status in (401, 403):
        return UpstreamError(f"The upstream ({provider}) refused the gateway's credentials.")
    if status == 404:
        return UpstreamError(f"The upstream ({provider}) does not know this model: {message}")
    if status in (408, 504):
        return UpstreamTimeout(f"The upstream ({provider}) timed out.")
    return UpstreamError(f"The upstream ({provider}) answered with HTTP {status}: {message}")


def _error_message(body: bytes) -> str:
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:_MAX_MESSAGE].decode("utf-8", "replace").strip() or "no details"
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:_MAX_MESSAGE]
        if isinstance(error, str):
            return error[:_MAX_MESSAGE]
        if parsed.get("message"):
            return str(parsed["message"])[:_MAX_MESSAGE]
    return "no details"


def transport_error(exc: httpx.HTTPError, provider: str) -> GatewayError:
    if isinstance(exc, httpx.ConnectTimeout | httpx.ConnectError):
        return UpstreamUnavailable(f"The upstream ({provider}) cannot be reached.")
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"The upstream ({provider}) did not answer in time.")
    if isinstance(exc, httpx.RemoteProtocolError):
        return UpstreamUnavailable(f"The upstream ({provider}) closed the connection.")
    return UpstreamError(f"The upstream ({provider}) call failed ({type(exc).__name__}).")


class OpenAICompatProvider:
    """``name`` is the provider label (openai, ollama); the wire format is OpenAI's."""

    def __init__(
        self,
        *,
        name: str,
        api_base: str,
        api_key: str | None,
        client: httpx.AsyncClient,
        probe_path: str = "/models",
    ) -> None:
        self.name = name
        self.base = api_base.rstrip("/")
        if name == "ollama" and not self.base.endswith("/v1"):
            self.root = self.base
            self.base = self.base + "/v1"
        else:
            self.root = self.base
        parts = urlsplit(self.base)
        self.server_address: str | None = parts.hostname
        self.server_port: int | None = parts.port or (443 if parts.scheme == "https" else 80)
        self.client = client
        self.probe_url = self.root + "/api/tags" if name == "ollama" else self.base + probe_path
        self._headers = {"content-type": "application/json"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"

    def _request(self, path: str, call: UpstreamCall) -> httpx.Request:
        headers = {**self._headers, **call.headers} if call.headers else self._headers
        extensions = {}
        if call.timeout_s is not None:
            extensions["timeout"] = httpx.Timeout(call.timeout_s).as_dict()
        return self.client.build_request(
            "POST",
            self.base + path,
            content=orjson.dumps(call.body),
            headers=headers,
            extensions=extensions,
        )

    async def _send(self, request: httpx.Request, *, stream: bool) -> httpx.Response:
        try:
            response = await self.client.send(request, stream=stream)
        except httpx.HTTPError as exc:
            raise transport_error(exc, self.name) from exc
        if response.status_code >= 400:
            try:
                body = await response.aread()
            except httpx.HTTPError:
                body = b""
            finally:
                await response.aclose()
            raise upstream_status_error(response.status_code, body, self.name)
        return response

    async def _post_json(self, path: str, call: UpstreamCall) -> Reply:
        response = await self._send(self._request(path, call), stream=False)
        body = response.content
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise UpstreamError(f"The upstream ({self.name}) answered with invalid JSON.") from None
        return Reply.from_json(body, parsed)

    async def complete(self, call: UpstreamCall) -> Reply:
        return await self._post_json("/chat/completions", call)

    async def embed(self, call: UpstreamCall) -> Reply:
        return await self._post_json("/embeddings", call)

    async def open_stream(self, call: UpstreamCall, info: StreamInfo) -> AsyncIterator[bytes]:
        response = await self._send(self._request("/chat/completions", call), stream=True)
        return self._events(response)

    async def _events(self, response: httpx.Response) -> AsyncIterator[bytes]:
        splitter = EventSplitter()
        try:
            async for data in response.aiter_raw():
                for event in splitter.feed(data):
                    yield event
            rest = splitter.rest()
            if rest.strip():
                yield rest + b"\n\n"
        except httpx.HTTPError as exc:
            raise transport_error(exc, self.name) from exc
        finally:
            await response.aclose()

    async def probe(self, timeout_s: float) -> ProbeResult:
        started = time.perf_counter()
        try:
            response = await self.client.get(
                self.probe_url,
                headers={k: v for k, v in self._headers.items() if k == "authorization"},
                timeout=timeout_s,
            )
        except httpx.HTTPError as exc:
            detail = str(exc) or type(exc).__name__
            message = f"{transport_error(exc, self.name).message} ({detail[:200]})"
            return ProbeResult(False, time.perf_counter() - started, message)
        latency = time.perf_counter() - started
        if response.status_code != 200:
            return ProbeResult(False, latency, f"HTTP {response.status_code}")
        return ProbeResult(True, latency, None, _model_ids(response.content))

    async def aclose(self) -> None:
        return None  # the shared client belongs to the app


def _model_ids(body: bytes) -> tuple[str, ...]:
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ()
    if not isinstance(parsed, dict):
        return ()
    items = parsed.get("data") or parsed.get("models") or []
    ids = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict):
            ident = item.get("id") or item.get("name") or item.get("model")
            if ident:
                ids.append(str(ident))
    return tuple(ids)
