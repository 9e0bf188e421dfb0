"""The HTTP surface: handlers that translate HTTP in and out, and nothing more.

Model requests go to the pipeline (``daemon/pipeline.py``); the operational endpoints
read the gateway's lifecycle, health and metrics. Errors are mapped to OpenAI's shape
in one place, at the bottom of this file.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from daemon.auth import bearer_token, credentials
from daemon.errors import (
    AuthenticationFailed,
    GatewayError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    error_response,
)
from daemon.gateway import Gateway
from daemon.metrics import MetricsCollector
from daemon.pipeline import Incoming, Stream
from daemon.requests import read_body
from daemon.streaming import EventStreamResponse
from daemon.usage import Usage

JSON = "application/json"


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def _credentials(request: Request) -> str | None:
    return credentials(request.headers.get("authorization"), request.headers.get("x-api-key"))


def _json(payload: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), media_type=JSON, headers=headers)


async def _model_request(request: Request, operation: str) -> Response:
    state = request.scope["state"]
    pipeline = _gateway(request).pipeline
    incoming = Incoming(
        authorization=_credentials(request),
        request_id=state["request_id"],
        trace_id=state.get("trace_id", ""),
        read_body=lambda limit: read_body(request, limit),
        state=state,
        cache_control=request.headers.get("cache-control") if pipeline.cache.enabled else None,
    )
    result = await pipeline.run(operation, incoming)
    _routing_headers(result.headers, state["usage"])
    if isinstance(result, Stream):
        return EventStreamResponse(result.events, result.headers)
    if len(result.body) > LARGE_BODY:
        return LargeResponse(result.body, headers=result.headers)
    return Response(result.body, media_type=JSON, headers=result.headers)


def _routing_headers(headers: dict[str, str], usage: Usage) -> None:
    """What served the request (docs/routing.md): the public model that answered, the
    upstream attempts made, and the cache's verdict when a cache is configured."""
    if usage.served_model:
        headers["x-chatvault-model"] = usage.served_model
    headers["x-chatvault-attempts"] = str(usage.attempts)
    result = usage.cache_result
    if result is not None:
        headers["x-chatvault-cache"] = "bypass" if result == "error" else result


LARGE_BODY = 1 << 20


class LargeResponse(Response):
    """A large answer (a big batch of embeddings: 2048 x 3072 values is 130 MB) sent a
    slice at a time: one send would copy it whole into the transport's buffer on the
    event loop (a quarter of a second, measured) instead of as the client reads."""

    media_type = JSON

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = memoryview(self.body)
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        for start in range(0, len(body), LARGE_BODY):
            piece = bytes(body[start : start + LARGE_BODY])
            more = start + LARGE_BODY < len(body)
            await send({"type": "http.response.body", "body": piece, "more_body": more})


async def chat_completions(request: Request) -> Response:
    return await _model_request(request, "chat")


async def embeddings(request: Request) -> Response:
    return await _model_request(request, "embeddings")


async def responses(request: Request) -> Response:
    return await _model_request(request, "responses")


async def completions(request: Request) -> Response:
    return await _model_request(request, "text_completion")


def _model_entry(gw: Gateway, name: str) -> dict[str, Any]:
    owner = next(d.provider_name for d in gw.router.deployments if d.name == name)
    return {
        "id": name,
        "object": "model",
        "created": int(gw.lifecycle.started_at),
        "owned_by": owner,
    }


async def list_models(request: Request) -> Response:
    gw = _gateway(request)
    principal = await gw.auth.authenticate(_credentials(request))
    data = [_model_entry(gw, name) for name in gw.router.names if principal.may_use(name)]
    return _json({"object": "list", "data": data})


async def retrieve_model(request: Request) -> Response:
    gw = _gateway(request)
    principal = await gw.auth.authenticate(_credentials(request))
    name = request.path_params["model"]
    if not gw.router.knows(name) or not principal.may_use(name):
        raise NotFound(f"The model '{name}' does not exist.", param="model", code="model_not_found")
    return _json(_model_entry(gw, name))


async def livez(request: Request) -> Response:
    return _json({"status": "ok"})


async def readyz(request: Request) -> Response:
    gw = _gateway(request)
    ledger_ok, reason = gw.health.readiness()
    state = gw.lifecycle.readiness(ledger_ok)
    body = (
        {"status": state}
        if ledger_ok or state != "database_unreachable"
        else {
            "status": state,
            "reason": reason,
        }
    )
    return Response(
        orjson.dumps(body),
        status_code=200 if state == "ready" else 503,
        media_type=JSON,
    )


async def metrics(request: Request) -> Response:
    gw = _gateway(request)
    collector = gw.metrics
    assert isinstance(collector, MetricsCollector)  # the route exists only when metrics are on
    if gw.settings.monitoring.metrics.require_auth:
        require_admin(gw, request)
    gw.sample_metrics()
    accept = request.headers.get("accept", "")
    # Rendering (and, with several workers, reading their files) must not block the loop.
    body = await asyncio.to_thread(collector.get_metrics, accept)
    return Response(body, headers={"content-type": collector.content_type(accept)})


async def health(request: Request) -> Response:
    gw = _gateway(request)
    admin = gw.auth.is_admin(_credentials(request))
    if request.query_params.get("refresh", "").lower() in ("1", "true", "yes"):
        if not admin:
            raise PermissionDenied("refresh=true needs the admin key.", code="admin_key_required")
        await gw.probes.check_round()  # every probe in it is bounded by the probe timeout
    body, status = gw.health.report(detailed=admin)
    return Response(
        orjson.dumps(body),
        status_code=status,
        media_type=JSON,
        headers={"cache-control": "no-store"},
    )


async def traces_status(request: Request) -> Response:
    gw = _gateway(request)
    require_admin(gw, request)
    status = gw.tracing.export_status
    if status is None:
        return _json({"enabled": False})
    return _json({"enabled": True, **status.as_dict()})


def require_admin(gw: Gateway, request: Request) -> None:
    header = _credentials(request)
    if gw.auth.is_admin(header):
        return
    if bearer_token(header) is None:
        raise AuthenticationFailed(
            "This endpoint needs the admin key: 'Authorization: Bearer <admin key>'.",
            code="missing_api_key",
        )
    raise PermissionDenied("This endpoint needs the admin key.", code="admin_key_required")


def routes(*, metrics_enabled: bool = True) -> list[Route]:
    out = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/responses", responses, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
        Route("/livez", livez, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/admin/traces/status", traces_status, methods=["GET"]),
    ]
    if metrics_enabled:
        out.append(Route("/metrics", metrics, methods=["GET"]))
    return out


# -- errors, mapped once -------------------------------------------------------


async def _gateway_error(request: Request, exc: Exception) -> Response:
    return error_response(exc)


async def _internal_error(request: Request, exc: Exception) -> Response:
    # Starlette answers this one outside every middleware, so the id is added here.
    response = error_response(exc)
    rid = request.scope.get("state", {}).get("request_id")
    if rid:
        response.headers["x-request-id"] = rid
    return response


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error: GatewayError = NotFound(f"Unknown request URL: {request.method} {request.url.path}.")
    elif exc.status_code == 405:
        error = InvalidRequest(f"Method {request.method} is not allowed on {request.url.path}.")
        error.status_code = 405
    else:
        error = InvalidRequest(str(exc.detail))
        error.status_code = exc.status_code
    return await _gateway_error(request, error)


exception_handlers = {
    GatewayError: _gateway_error,
    HTTPException: _http_error,
    Exception: _internal_error,  # anything unexpected: a generic 500, never a traceback
}
