"""The CLI's HTTP client of the daemon. No rich, no daemon code.

It is built on the standard library's ``http.client``: the whole of ``chatvault
health`` must finish well inside half a second, and importing a full-featured HTTP
client costs a good part of that before the first byte is sent.

    daemon = DaemonClient("http://127.0.0.1:8000", admin_key="cv-…", timeout=5)
    status, body = daemon.health()
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from chatvault_cli.safety import is_loopback


class Unreachable(Exception):
    """Nothing answered at the URL (refused, timed out, DNS, TLS)."""


class NotChatVault(Exception):
    """Something answered, but not a ChatVault daemon."""


class InsecureTransport(Exception):
    """A key would go over plain HTTP to a host that is not this machine."""


def exposes_keys(url: str) -> bool:
    """Would a key sent to ``url`` cross the network unencrypted?"""
    parts = urlsplit(url if "://" in url else "http://" + url)
    return parts.scheme == "http" and not is_loopback(parts.hostname or "")


def insecure_message(url: str, what: str = "the admin key") -> str:
    host = urlsplit(url if "://" in url else "http://" + url).netloc
    return (
        f"refusing to send {what} over plain HTTP to {host}, which is not this machine: "
        "use an https:// URL, or pass --insecure if the network is trusted"
    )


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            raise NotChatVault(f"expected JSON, got {self.body[:80]!r}") from None


class DaemonClient:
    def __init__(
        self,
        url: str,
        *,
        admin_key: str | None = None,
        timeout: float = 5.0,
        insecure: bool = False,
    ) -> None:
        parts = urlsplit(url if "://" in url else "http://" + url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
            raise Unreachable(f"not a usable http(s) URL: {url}")
        self.url = url.rstrip("/")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = port or (443 if parts.scheme == "https" else 80)
        self.base_path = parts.path.rstrip("/")
        self.admin_key = admin_key
        self.timeout = timeout
        # Checked again on every request that carries a key, not only by the commands.
        self.keys_may_travel = insecure or not exposes_keys(self.url)

    def _connection(self) -> http.client.HTTPConnection:
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _headers(self, key: str | None, extra: dict[str, str] | None) -> dict[str, str]:
        headers = {"user-agent": "chatvault-cli", **(extra or {})}
        if key:
            if not self.keys_may_travel:
                raise InsecureTransport(insecure_message(self.url, "a key"))
            headers["authorization"] = f"Bearer {key}"
        return headers

    def request(
        self,
        method: str,
        path: str,
        *,
        key: str | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        conn = self._connection()
        payload = json.dumps(body).encode() if body is not None else None
        all_headers = self._headers(key, headers)
        if payload is not None:
            all_headers["content-type"] = "application/json"
        try:
            conn.request(method, self.base_path + path, body=payload, headers=all_headers)
            raw = conn.getresponse()
            return Response(raw.status, {k.lower(): v for k, v in raw.getheaders()}, raw.read())
        except (OSError, http.client.HTTPException) as exc:
            raise Unreachable(_describe(exc, self.url)) from None
        finally:
            conn.close()

    def stream_lines(self, path: str, *, key: str | None, body: Any) -> Iterator[bytes]:
        """POST and yield the response's lines as they arrive (SSE)."""
        conn = self._connection()
        try:
            conn.request(
                "POST",
                self.base_path + path,
                body=json.dumps(body).encode(),
                headers={**self._headers(key, None), "content-type": "application/json"},
            )
            raw = conn.getresponse()
            if raw.status != 200:
                raise NotChatVault(
                    f"HTTP {raw.status}: {raw.read()[:300].decode('utf-8', 'replace')}"
                )
            while line := raw.readline():
                yield line.rstrip(b"\r\n")
        except (OSError, http.client.HTTPException) as exc:
            raise Unreachable(_describe(exc, self.url)) from None
        finally:
            conn.close()

    # -- what the commands read -----------------------------------------------------

    def health(self, refresh: bool = False) -> tuple[int, dict[str, Any]]:
        admin = self.admin_key
        path = "/health?refresh=true" if refresh and admin else "/health"
        response = self.request("GET", path, key=admin)
        body = response.json()
        if not is_health_body(body):
            raise NotChatVault(
                f"{self.url}/health did not answer like ChatVault (HTTP {response.status})"
            )
        return response.status, body

    def metrics_text(self) -> str:
        response = self.request("GET", "/metrics", key=self.admin_key)
        if response.status in (401, 403):
            raise PermissionError(
                "/metrics needs the admin key (--admin-key, CHATVAULT_ADMIN_KEY or the state file)"
            )
        if response.status != 200 or b"chatvault_" not in response.body:
            raise NotChatVault(
                f"{self.url}/metrics did not answer like ChatVault (HTTP {response.status})"
            )
        return response.body.decode("utf-8", "replace")

    def traces_status(self) -> dict[str, Any]:
        response = self.request("GET", "/admin/traces/status", key=self.admin_key)
        if response.status in (401, 403):
            raise PermissionError(
                "traces status needs the admin key (--admin-key, CHATVAULT_ADMIN_KEY or the state file)"
            )
        body = response.json()
        if response.status != 200 or not isinstance(body, dict) or "enabled" not in body:
            raise NotChatVault(f"{self.url} did not answer like ChatVault (HTTP {response.status})")
        wrong = wrong_typed(body, TRACE_STATUS_TYPES)
        if wrong is not None:
            raise NotChatVault(
                f"{self.url}/admin/traces/status did not answer like ChatVault "
                f"({wrong!r} has the wrong type)"
            )
        return body


_NUMBER = (int, float)
# What /admin/traces/status sends, each field null or of these types.
TRACE_STATUS_TYPES: dict[str, tuple[type, ...]] = {
    "enabled": (bool,),
    "endpoint": (str,),
    "protocol": (str,),
    "spans_exported": _NUMBER,
    "export_failures": _NUMBER,
    "spans_failed": _NUMBER,
    "spans_dropped": _NUMBER,
    "queue_size": _NUMBER,
    "queue_capacity": _NUMBER,
    "last_success": _NUMBER,
    "last_failure": _NUMBER,
    "last_error": (str,),
}


def wrong_typed(body: dict[str, Any], types: dict[str, tuple[type, ...]]) -> str | None:
    """The first field of ``body`` that is neither null nor of its type (a bool is not
    a number here, whatever Python says)."""
    for name, allowed in types.items():
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            return name
    return None


def is_health_body(body: Any) -> bool:
    return (
        isinstance(body, dict)
        and body.get("status") in ("healthy", "degraded", "unhealthy")
        and isinstance(body.get("components"), dict)
    )


def _describe(exc: BaseException, url: str) -> str:
    if isinstance(exc, socket.timeout | TimeoutError):
        return f"{url} did not answer in time"
    if isinstance(exc, ConnectionRefusedError):
        return f"nothing is listening at {url} (connection refused)"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host of {url}"
    return f"cannot reach {url}: {exc}"
