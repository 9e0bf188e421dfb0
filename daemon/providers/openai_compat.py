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
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
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
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamFirstByteTimeout,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from daemon.providers.base import ProbeResult, Reply, UpstreamCall
from daemon.providers.sse import MAX_EVENT_BYTES, EventSplitter

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
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamConnectTimeout(
            f"The upstream ({provider}) could not be connected to in time."
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamUnavailable(f"The upstream ({provider}) cannot be reached.")
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeout(f"The upstream ({provider}) did not answer in time.")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return UpstreamUnavailable(f"The upstream ({provider}) closed the connection.")
    return UpstreamError(f"The upstream ({provider}) call failed ({type(exc).__name__}).")


def request_error(exc: BaseException, provider: str, timeouts: Timeouts) -> GatewayError:
    """A failure before the response started: which timeout ran out, if one did."""
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return UpstreamFirstByteTimeout(
            f"The upstream ({provider}) did not start its answer within "
            f"{timeouts.first_byte_s:g}s (first_byte_timeout_s)."
        )
    if isinstance(exc, asyncio.TimeoutError) and not isinstance(exc, aiohttp.ServerTimeoutError):
        return UpstreamTimeout(
            f"The upstream ({provider}) did not answer within {timeouts.total_s:g}s (timeout_s)."
        )
    return transport_error(exc, provider)


_TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)

# orjson parses about 15 ms per MB holding the GIL: 2048 vectors of 3072 dimensions
# (130 MB) would stop the event loop for two seconds. Above this size an embeddings
# answer is forwarded as it is and only its usage and model are read.
_SKIM_ABOVE = 1 << 20
_USAGE = re.compile(rb'"usage"\s*:\s*(\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\})')
_MODEL = re.compile(rb'"model"\s*:\s*("(?:[^"\\]|\\.){0,512}")')


def skim_top_level(body: bytes) -> dict[str, Any]:
    """``usage`` and ``model`` of a large JSON answer, found from its end without parsing
    the rest. A quote inside a JSON string is escaped, so ``"usage":`` can only be a key;
    the last one is taken (OpenAI puts them after ``data``)."""
    out: dict[str, Any] = {}
    for key, pattern in ((b'"usage"', _USAGE), (b'"model"', _MODEL)):
        at = body.rfind(key)
        found = pattern.match(body, at) if at >= 0 else None
        if found is not None:
            with contextlib.suppress(orjson.JSONDecodeError):
                out[key.strip(b'"').decode()] = orjson.loads(found.group(1))
    return out


@dataclass(frozen=True, slots=True)
class Timeouts:
    """A model's upstream timeouts: connecting (a free pooled connection included),
    the response starting (and each later read: the longest silence), the whole call."""

    connect_s: float = 5.0
    first_byte_s: float = 120.0
    total_s: float = 600.0

    def client_timeout(self, *, total: bool = True) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=self.total_s if total else None,
            connect=self.connect_s,
            sock_read=self.first_byte_s,
        )


class OpenAICompatProvider:
    """``name`` is the provider label (openai, ollama); the wire format is OpenAI's."""

    def __init__(
        self,
        *,
        name: str,
        api_base: str,
        api_key: str | None,
        session: aiohttp.ClientSession,
        timeouts: Timeouts = Timeouts(),
        probe_path: str = "/models",
        responses_native: bool = False,
        max_event_bytes: int = MAX_EVENT_BYTES,
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
        # One object for every call: the session's default would drop the connect
        # timeout as soon as a per-call one replaced it.
        self.timeouts = timeouts
        self.timeout = timeouts.client_timeout()
        # For an answer read whole under the request's deadline, which comes first:
        # aiohttp's total timer would cost a timer and a timer context per request.
        self.timeout_within_deadline = timeouts.client_timeout(total=False)
        self.max_event_bytes = max_event_bytes
        self.probe_url = self.root + "/api/tags" if name == "ollama" else self.base + probe_path
        # HTTP(S)_PROXY and NO_PROXY, resolved once: aiohttp's trust_env would look
        # them up again in a worker thread on every request.
        self.proxy = env_proxy(self.base)
        self._headers = {"content-type": "application/json"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"

    async def _send(
        self, path: str, call: UpstreamCall, timeout: aiohttp.ClientTimeout | None = None
    ) -> aiohttp.ClientResponse:
        headers = {**self._headers, **call.headers} if call.headers else self._headers
        try:
            response = await self.session.post(
                self.base + path,
                data=orjson.dumps(call.body),
                headers=headers,
                proxy=self.proxy,
                timeout=timeout or self.timeout,
            )
        except _TRANSPORT_ERRORS as exc:
            raise request_error(exc, self.name, self.timeouts) from exc
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

    async def _post_json(
        self,
        path: str,
        call: UpstreamCall,
        read: Callable[[bytes, Any], Reply],
        *,
        skim: bool = False,
    ) -> Reply:
        """POST, read the whole answer, parse it; ``read`` takes usage and ids from it.
        ``skim``: a large answer (embeddings) is not parsed whole, only its usage."""
        # Read whole here, inside the attempt: the request's deadline, when armed, bounds it.
        timeout = self.timeout_within_deadline if call.within_deadline else self.timeout
        response = await self._send(path, call, timeout)
        try:
            body = await response.read()
        except _TRANSPORT_ERRORS as exc:
            raise transport_error(exc, self.name) from exc
        finally:
            response.release()
        if skim and len(body) > _SKIM_ABOVE:
            skimmed = skim_top_level(body)
            if "usage" in skimmed:  # else parsed whole, slowly: the usage is what bills
                return read(body, skimmed)
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise UpstreamError(f"The upstream ({self.name}) answered with invalid JSON.") from None
        return read(body, parsed)

    async def complete(self, call: UpstreamCall) -> Reply:
        return await self._post_json("/chat/completions", call, Reply.from_json)

    async def embed(self, call: UpstreamCall) -> Reply:
        return await self._post_json("/embeddings", call, Reply.from_json, skim=True)

    async def open_stream(self, call: UpstreamCall) -> AsyncIterator[list[bytes]]:
        response = await self._send("/chat/completions", call)
        return self._events(response)

    async def create_response(self, call: UpstreamCall) -> Reply:
        """The Responses API, passed through: the body is the client's, usage is read
        from the Responses shape (``input_tokens``, ``output_tokens``)."""
        return await self._post_json("/responses", call, Reply.from_responses_json)

    async def open_response_stream(self, call: UpstreamCall) -> AsyncIterator[list[bytes]]:
        """A streamed Responses API call: the upstream's events, forwarded as they come."""
        response = await self._send("/responses", call)
        return self._events(response)

    async def _events(self, response: aiohttp.ClientResponse) -> AsyncIterator[list[bytes]]:
        splitter = EventSplitter(self.max_event_bytes, self.name)
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
