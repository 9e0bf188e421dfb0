"""Any OpenAI-compatible server (OpenAI, vLLM, LM Studio, Ollama's /v1, ...).

All deployments share one pooled ``aiohttp.ClientSession`` owned by the app's
lifespan. (aiohttp rather than httpx: on the request path httpx costs about 2.4 ms of
CPU per call against aiohttp's 0.16 ms, measured in the same run; the gateway's whole
budget is 1 ms.) Bodies are passed through as bytes: a non-streamed answer is parsed
once to read its usage and sent back unchanged; a stream is forwarded event by event
as it arrives.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from daemon.errors import (
    GatewayError,
    InvalidRequest,
    RateLimited,
    UpstreamError,
    UpstreamFirstByteTimeout,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from daemon.providers.base import ProbeResult, Reply, UpstreamCall
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
    return redact(_raw_error_message(body))


_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)
_SECRET = re.compile(
    r"(?i)\b(api[_-]?key|key|token|secret|password|authorization)\b(\s*[=:]\s*)(bearer\s+)?\S+"
)
_KEYLIKE = re.compile(r"\b(sk|cv|pk|rk|key)-[A-Za-z0-9_\-]{12,}")


def redact(message: str) -> str:
    """An upstream's message, safe to show a client: upstream messages sometimes echo
    request URLs (with keys in the query string) or parts of credentials."""
    message = _URL.sub("[url]", message)
    message = _SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}[redacted]", message)
    return _KEYLIKE.sub("[redacted]", message)[:_MAX_MESSAGE]


def _raw_error_message(body: bytes) -> str:
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:_MAX_MESSAGE].decode("utf-8", "replace").strip() or "no details"
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[: _MAX_MESSAGE * 2]
        if isinstance(error, str):
            return error[: _MAX_MESSAGE * 2]
        if parsed.get("message"):
            return str(parsed["message"])[: _MAX_MESSAGE * 2]
    return "no details"


def transport_error(exc: BaseException, provider: str) -> GatewayError:
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return UpstreamUnavailable(f"The upstream ({provider}) cannot be reached.")
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeout(f"The upstream ({provider}) did not answer in time.")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return UpstreamUnavailable(f"The upstream ({provider}) closed the connection.")
    return UpstreamError(f"The upstream ({provider}) call failed ({type(exc).__name__}).")


_TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


class OpenAICompatProvider:
    """``name`` is the provider label (openai, ollama); the wire format is OpenAI's."""

    def __init__(
        self,
        *,
        name: str,
        api_base: str,
        api_key: str | None,
        session: aiohttp.ClientSession,
        timeout_s: float | None = None,
        probe_path: str = "/models",
        responses_native: bool = False,
    ) -> None:
        self.name = name
        # The upstream implements POST /responses itself (config: responses_api: native).
        self.responses_native = responses_native
        self.base = api_base.rstrip("/")
        if name == "ollama" and not self.base.endswith("/v1"):
            self.root = self.base
            self.base = self.base + "/v1"
        else:
            self.root = self.base
        parts = urlsplit(self.base)
        self.server_address: str | None = parts.hostname
        self.server_port: int | None = parts.port or (443 if parts.scheme == "https" else 80)
        self.session = session
        self.timeout = aiohttp.ClientTimeout(sock_read=timeout_s) if timeout_s else None
        self.probe_url = self.root + "/api/tags" if name == "ollama" else self.base + probe_path
        # HTTP(S)_PROXY and NO_PROXY, resolved once: aiohttp's trust_env would look
        # them up again in a worker thread on every request.
        self.proxy = env_proxy(self.base)
        self._headers = {"content-type": "application/json"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"

    async def _send(self, path: str, call: UpstreamCall) -> aiohttp.ClientResponse:
        headers = {**self._headers, **call.headers} if call.headers else self._headers
        options: dict[str, Any] = {
            "data": orjson.dumps(call.body),
            "headers": headers,
            "proxy": self.proxy,
        }
        timeout = (
            aiohttp.ClientTimeout(sock_read=call.timeout_s) if call.timeout_s else self.timeout
        )
        if timeout is not None:
            options["timeout"] = timeout
        try:
            response = await self.session.post(self.base + path, **options)
        except aiohttp.SocketTimeoutError as exc:  # connected, no response headers in time
            raise UpstreamFirstByteTimeout(
                f"The upstream ({self.name}) did not start its answer in time."
            ) from exc
        except _TRANSPORT_ERRORS as exc:
            raise transport_error(exc, self.name) from exc
        if response.status >= 400:
            try:
                body = await response.read()
            except _TRANSPORT_ERRORS:
                body = b""
            finally:
                response.release()
            error = upstream_status_error(response.status, body, self.name)
            error.upstream_status = response.status  # routing retries 5xx (docs/routing.md)
            wait = response.headers.get("retry-after", "")
            if response.status == 429 and wait.isdigit():
                error.headers["Retry-After"] = wait  # the upstream's own, not a guess
            raise error
        return response

    async def _post_json(self, path: str, call: UpstreamCall) -> Reply:
        response = await self._send(path, call)
        try:
            body = await response.read()
        except _TRANSPORT_ERRORS as exc:
            raise transport_error(exc, self.name) from exc
        finally:
            response.release()
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise UpstreamError(f"The upstream ({self.name}) answered with invalid JSON.") from None
        return Reply.from_json(body, parsed)

    async def complete(self, call: UpstreamCall) -> Reply:
        return await self._post_json("/chat/completions", call)

    async def embed(self, call: UpstreamCall) -> Reply:
        return await self._post_json("/embeddings", call)

    async def open_stream(self, call: UpstreamCall) -> AsyncIterator[list[bytes]]:
        response = await self._send("/chat/completions", call)
        return self._events(response)

    async def create_response(self, call: UpstreamCall) -> Reply:
        """The Responses API, passed through: the body is the client's, usage is read
        from the Responses shape (``input_tokens``, ``output_tokens``)."""
        response = await self._send("/responses", call)
        try:
            body = await response.read()
        except _TRANSPORT_ERRORS as exc:
            raise transport_error(exc, self.name) from exc
        finally:
            response.release()
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise UpstreamError(f"The upstream ({self.name}) answered with invalid JSON.") from None
        return Reply.from_responses_json(body, parsed)

    async def open_response_stream(self, call: UpstreamCall) -> AsyncIterator[list[bytes]]:
        """A streamed Responses API call: the upstream's events, forwarded as they come."""
        response = await self._send("/responses", call)
        return self._events(response)

    async def _events(self, response: aiohttp.ClientResponse) -> AsyncIterator[list[bytes]]:
        splitter = EventSplitter()
        try:
            async for data in response.content.iter_any():
                events = splitter.feed(data)
                if events:
                    yield events  # together, as they arrived: none is held back
            rest = splitter.rest()
            if rest.strip():
                yield [rest + b"\n\n"]
        except _TRANSPORT_ERRORS as exc:
            raise transport_error(exc, self.name) from exc
        finally:
            if response.content.at_eof():
                response.release()  # the connection goes back to the pool
            else:
                response.close()  # abandoned mid-stream: the connection cannot be reused

    async def probe(self, timeout_s: float) -> ProbeResult:
        started = time.perf_counter()
        headers = {k: v for k, v in self._headers.items() if k == "authorization"}
        try:
            async with self.session.get(
                self.probe_url,
                headers=headers,
                proxy=self.proxy,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as response:
                await response.read()  # drain, so the connection is reused
                status = response.status
        except _TRANSPORT_ERRORS as exc:
            if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
                message = f"no answer within {timeout_s:g}s"
            else:
                detail = str(exc) or type(exc).__name__
                message = f"{transport_error(exc, self.name).message} ({detail[:200]})"
            return ProbeResult(False, time.perf_counter() - started, message)
        latency = time.perf_counter() - started
        if status != 200:
            return ProbeResult(False, latency, f"HTTP {status}")
        return ProbeResult(True, latency)


def env_proxy(url: str) -> str | None:
    """The proxy the environment asks for this URL, if any."""
    try:
        proxy, _ = get_env_proxy_for_url(URL(url))
    except LookupError:
        return None
    return str(proxy)
