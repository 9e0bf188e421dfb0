"""The OpenAI-compatible HTTP surface: thin handlers over ``Gateway``.

Each handler authenticates, reads and validates the body, and hands the work to the
gateway; every failure after authentication is still accounted for in the ledger.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from daemon.auth import bearer_token
from daemon.errors import (
    AuthenticationFailed,
    GatewayError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    error_response,
)
from daemon.gateway import Gateway
from daemon.providers.base import StreamInfo, UpstreamCall
from daemon.requests import parse_chat, parse_embeddings, parse_json_object, read_body
from daemon.streaming import EventStreamResponse

JSON = "application/json"


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def _json(payload: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), media_type=JSON, headers=headers)


async def _model_request(request: Request, operation: str) -> Response:
    gw = _gateway(request)
    assert gw.auth is not None
    principal = await gw.auth.authenticate(request.headers.get("authorization"))
    state = request.scope["state"]
    usage = gw.new_usage(state["request_id"], principal, operation, state.get("trace_id", ""))
    request.scope["state"]["usage"] = usage
    try:
        body = parse_json_object(await read_body(request, gw.settings.server.max_body_bytes))
        if operation == "chat":
            params = parse_chat(body)
            model, stream = params.model, params.stream
        else:
            model, stream = parse_embeddings(body), False
        usage.model, usage.stream = model, stream
        usage.known_model = gw.router.knows(model)
        gw.check_accepting()
        plan = gw.router.plan(model)
        principal.require_model(model)
        decision = await gw.admit(principal)
        headers = dict(decision.headers)
        call = UpstreamCall(operation=operation, body=body, stream=stream)
        if not stream:
            reply = await gw.complete(plan, call, usage)
            gw.finish(usage)
            return Response(reply.body, media_type=JSON, headers=headers)
        # Ask upstream for usage even when the client did not, to count tokens; the
        # relay drops that extra chunk again.
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        info = StreamInfo(
            capture=gw.tracing is not None and gw.tracing.capture_content,
            prompt_chars=prompt_chars(body),
        )
        events = await gw.open_stream(plan, call, usage, info)
    except BaseException as exc:  # every authenticated request leaves a ledger row
        gw.fail(usage, exc)
        raise
    return EventStreamResponse(gw.relay(events, info, usage, params.include_usage), headers)


def prompt_chars(body: dict[str, Any]) -> int:
    return sum(
        len(m["content"]) for m in body.get("messages") or () if isinstance(m.get("content"), str)
    )


async def chat_completions(request: Request) -> Response:
    return await _model_request(request, "chat")


async def embeddings(request: Request) -> Response:
    return await _model_request(request, "embeddings")


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
    assert gw.auth is not None
    principal = await gw.auth.authenticate(request.headers.get("authorization"))
    data = [_model_entry(gw, name) for name in gw.router.names if principal.may_use(name)]
    return _json({"object": "list", "data": data})


async def retrieve_model(request: Request) -> Response:
    gw = _gateway(request)
    assert gw.auth is not None
    principal = await gw.auth.authenticate(request.headers.get("authorization"))
    name = request.path_params["model"]
    if not gw.router.knows(name) or not principal.may_use(name):
        raise NotFound(f"The model '{name}' does not exist.", param="model", code="model_not_found")
    return _json(_model_entry(gw, name))


async def livez(request: Request) -> Response:
    return _json({"status": "ok"})


async def readyz(request: Request) -> Response:
    gw = _gateway(request)
    state = gw.lifecycle.readiness(gw.health.database_ok)
    return Response(
        orjson.dumps({"status": state}),
        status_code=200 if state == "ready" else 503,
        media_type=JSON,
    )


async def metrics(request: Request) -> Response:
    gw = _gateway(request)
    assert gw.metrics is not None and gw.auth is not None
    if gw.settings.monitoring.metrics.require_auth:
        require_admin(gw, request)
    gw.sample_metrics()
    # Rendering (and, with several workers, reading their files) must not block the loop.
    body, content_type = await asyncio.to_thread(
        gw.metrics.exposition, request.headers.get("accept", "")
    )
    return Response(body, headers={"content-type": content_type})


async def health(request: Request) -> Response:
    gw = _gateway(request)
    assert gw.auth is not None
    admin = gw.auth.is_admin(request.headers.get("authorization"))
    if request.query_params.get("refresh", "").lower() in ("1", "true", "yes"):
        if not admin:
            raise PermissionDenied("refresh=true needs the admin key.", code="admin_key_required")
        await gw.health.check_round()  # every probe in it is bounded by the probe timeout
    body, status = gw.health.report(gw, detailed=admin)
    return Response(
        orjson.dumps(body),
        status_code=status,
        media_type=JSON,
        headers={"cache-control": "no-store"},
    )


async def traces_status(request: Request) -> Response:
    gw = _gateway(request)
    require_admin(gw, request)
    if gw.tracing is None:
        return _json({"enabled": False})
    return _json({"enabled": True, **gw.tracing.status.as_dict()})


def require_admin(gw: Gateway, request: Request) -> None:
    assert gw.auth is not None
    header = request.headers.get("authorization")
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
