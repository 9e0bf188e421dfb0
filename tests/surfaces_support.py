"""Shared by the Responses, completions and mock tests: the official client in process,
metric readings, and a small upstream that speaks the Responses API natively."""

from __future__ import annotations

import json
import time
from typing import Any

import openai
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from tests.fakes import Upstream
from tests.helpers import ADMIN_KEY


def openai_client(app_client: TestClient, key: str = ADMIN_KEY) -> openai.OpenAI:
    """The official client, talking to the in-process app (no retries: a test sees all)."""
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key=key, http_client=app_client, max_retries=0
    )


def metric_value(app_client: TestClient, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    text = app_client.get("/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def responses_upstream(state: Upstream) -> Starlette:
    """An OpenAI-compatible server with its own POST /v1/responses (and nothing stored:
    it only echoes what it was sent, so a test can see the body passed through)."""
    words = list(state.reply_words)

    def response(body: dict[str, Any], status: str) -> dict[str, Any]:
        p, c = state.usage
        text = " ".join(words)
        return {
            "id": "resp_upstream_1",
            "object": "response",
            "created_at": int(time.time()),
            "status": status,
            "error": None,
            "incomplete_details": None,
            "model": body["model"],
            "output": []
            if status != "completed"
            else [
                {
                    "id": "msg_up_1",
                    "type": "message",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "previous_response_id": body.get("previous_response_id"),
            "store": body.get("store", True),
            "usage": None
            if status != "completed"
            else {
                "input_tokens": p,
                "input_tokens_details": {"cached_tokens": 2},
                "output_tokens": c,
                "output_tokens_details": {"reasoning_tokens": 1},
                "total_tokens": p + c,
            },
        }

    async def create(request: Request) -> Response:
        body = await state._record(request)
        if state.status != 200:
            return JSONResponse({"error": {"message": "no"}}, status_code=state.status)
        if not body.get("stream"):
            return JSONResponse(response(body, "completed"))

        async def events() -> Any:
            seq = 0

            def event(kind: str, **fields: Any) -> str:
                nonlocal seq
                seq += 1
                payload = {"type": kind, "sequence_number": seq, **fields}
                return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

            yield event("response.created", response=response(body, "in_progress"))
            item = {
                "id": "msg_up_1",
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            yield event("response.output_item.added", output_index=0, item=item)
            part = {"type": "output_text", "text": "", "annotations": []}
            yield event(
                "response.content_part.added",
                item_id="msg_up_1",
                output_index=0,
                content_index=0,
                part=part,
            )
            for i, word in enumerate(words):
                yield event(
                    "response.output_text.delta",
                    item_id="msg_up_1",
                    output_index=0,
                    content_index=0,
                    delta=word if i == 0 else " " + word,
                    logprobs=[],
                )
            text = " ".join(words)
            yield event(
                "response.output_text.done",
                item_id="msg_up_1",
                output_index=0,
                content_index=0,
                text=text,
                logprobs=[],
            )
            done_part = {"type": "output_text", "text": text, "annotations": []}
            yield event(
                "response.content_part.done",
                item_id="msg_up_1",
                output_index=0,
                content_index=0,
                part=done_part,
            )
            done_item = {**item, "status": "completed", "content": [done_part]}
            yield event("response.output_item.done", output_index=0, item=done_item)
            yield event("response.completed", response=response(body, "completed"))

        return StreamingResponse(events(), media_type="text/event-stream")

    async def models(request: Request) -> Response:
        await state._record(request)
        return JSONResponse({"object": "list", "data": [{"id": "up-model", "object": "model"}]})

    return Starlette(
        routes=[
            Route("/v1/responses", create, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
        ]
    )
