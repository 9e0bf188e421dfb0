"""One exception tree for everything a client can be told, mapped to HTTP in one place.

Handlers raise these; ``error_response`` turns any of them into OpenAI's error body
(``{"error": {"message", "type", "param", "code"}}``) with OpenAI's status code. Any
other exception becomes a generic 500 without its text: stack traces and upstream
secrets never reach a client.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from starlette.responses import Response


class GatewayError(Exception):
    """Base of every error a client may see."""

    status_code = 500
    error_type = "server_error"
    code: str | None = "internal_error"
    # Short, bounded name for metrics labels, the ledger and span error.type.
    kind = "internal"
    # The upstream's HTTP status when it answered with an error (routing retries 5xx).
    upstream_status: int | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if error_type is not None:
            self.error_type = error_type
        self.headers = dict(headers or {})

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"
    code = None
    kind = "invalid_request"


class AuthenticationFailed(GatewayError):
    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"
    kind = "authentication"


class PermissionDenied(GatewayError):
    status_code = 403
    error_type = "invalid_request_error"
    code = "model_not_allowed"
    kind = "permission"


class NotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"
    kind = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"
    kind = "model_not_found"


class RequestTooLarge(GatewayError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"
    kind = "too_large"


class RequestTimeout(GatewayError):
    """The client did not send its request in time (server.body_timeout_s)."""

    status_code = 408
    error_type = "invalid_request_error"
    code = "request_timeout"
    kind = "request_timeout"


class RateLimited(GatewayError):
    status_code = 429
    error_type = "requests"
    code = "rate_limit_exceeded"
    kind = "rate_limited"


class BudgetExceeded(RateLimited):
    """The key's budget cannot pay for this request: ``insufficient_quota`` when nothing
    is left, ``budget_exceeded`` when the request's worst case does not fit what is."""

    error_type = "insufficient_quota"
    code = "insufficient_quota"
    kind = "budget_exceeded"


class UpstreamError(GatewayError):
    """The upstream answered with an error or something that is not an answer."""

    status_code = 502
    error_type = "upstream_error"
    code = "bad_gateway"
    kind = "upstream_error"


class UpstreamIncomplete(UpstreamError):
    """The upstream ended a stream cleanly but before its end (no finish_reason, no
    ``[DONE]``): what the client got is truncated."""

    code = "upstream_incomplete"
    kind = "upstream_incomplete"


class UpstreamUnavailable(UpstreamError):
    """The upstream could not be reached at all (refused, DNS, reset before a reply)."""

    code = "upstream_unreachable"
    kind = "upstream_unreachable"


class UpstreamTimeout(UpstreamError):
    """The upstream took too long after the request was sent: it may still be
    generating, and billing, so routing does not retry it elsewhere (docs/routing.md)."""

    status_code = 504
    error_type = "timeout"
    code = "upstream_timeout"
    kind = "upstream_timeout"


class UpstreamConnectTimeout(UpstreamTimeout):
    """No connection within the model's ``connect_timeout_s``: the upstream never saw
    the request, so another attempt is safe."""

    kind = "upstream_connect_timeout"


class UpstreamFirstByteTimeout(UpstreamTimeout):
    """Connected and sent, but no response headers within ``first_byte_timeout_s``.
    Retryable by the routing contract (nothing reached the client yet)."""

    kind = "upstream_first_byte_timeout"


class ClientClosedRequest(GatewayError):
    """The client went away before its request was read (nginx's 499)."""

    status_code = 499
    error_type = "invalid_request_error"
    code = "client_closed_request"
    kind = "cancelled"


class ServiceUnavailable(GatewayError):
    status_code = 503
    error_type = "server_error"
    code = "service_unavailable"
    kind = "unavailable"


def as_gateway_error(exc: BaseException) -> GatewayError:
    if isinstance(exc, GatewayError):
        return exc
    return GatewayError("The gateway hit an internal error; see its log for the request id.")


def error_json(exc: GatewayError) -> bytes:
    return orjson.dumps(exc.body())


def error_response(exc: BaseException) -> Response:
    error = as_gateway_error(exc)
    return Response(
        error_json(error),
        status_code=error.status_code,
        headers=error.headers,
        media_type="application/json",
    )


def sse_error_event(exc: BaseException) -> bytes:
    """A failure after a stream started: one error event; the caller then ends the stream."""
    return b"data: " + error_json(as_gateway_error(exc)) + b"\n\n"
