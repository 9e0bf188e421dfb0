"""The HTTP contract, in process: OpenAI-shaped errors, status codes, headers, ledger rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from daemon.quota import Admitted, Ask, MemoryQuota
from tests.conftest import MakeClient
from tests.fakes import Upstream, openai_upstream
from tests.helpers import ADMIN_KEY, ServerThread, base_config, ledger_rows, new_key, wait_for

CHAT = "/v1/chat/completions"


def chat_body(content: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": "mock", "messages": [{"role": "user", "content": content}], **extra}


def assert_openai_error(
    response: httpx.Response, status: int, code: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers.get("x-request-id")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def ledger(tmp_path: Path) -> Path:
    return tmp_path / "data" / "ledger.db"


def test_completion_returns_openai_shape_and_request_id(
    make_client: MakeClient, admin_headers: dict[str, str]
) -> None:
    client = make_client()
    r = client.post(CHAT, json=chat_body(), headers=admin_headers)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"].endswith("hello there")
    assert (
        body["usage"]["total_tokens"]
        == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )
    assert len(r.headers["x-request-id"]) >= 16


def test_client_request_id_is_kept_and_unsafe_one_replaced(
    make_client: MakeClient, admin_headers: dict[str, str]
) -> None:
    client = make_client()
    r = client.post(
        CHAT, json=chat_body(), headers={**admin_headers, "x-request-id": "trace-abc.123"}
    )
    assert r.headers["x-request-id"] == "trace-abc.123"
    r = client.post(
        CHAT, json=chat_body(), headers={**admin_headers, "x-request-id": "bad id\twith space"}
    )
    assert r.headers["x-request-id"] != "bad id\twith space"


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"authorization": "Bearer cv-not-a-real-key"}, "invalid_api_key"),
        ({"authorization": "Basic abc"}, "missing_api_key"),
    ],
)
def test_401_without_a_valid_key(
    make_client: MakeClient, headers: dict[str, str], code: str
) -> None:
    client = make_client()
    error = assert_openai_error(client.post(CHAT, json=chat_body(), headers=headers), 401, code)
    assert "cv-not-a-real-key" not in error["message"]
    assert_openai_error(client.get("/v1/models", headers=headers), 401, code)


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b"", None),
        (orjson.dumps({"messages": [{"role": "user", "content": "x"}]}), "model"),
        (orjson.dumps({"model": "mock", "messages": []}), "messages"),
        (orjson.dumps({**chat_body(), "model": "mo\u0000ck"}), "model"),
        (orjson.dumps({**chat_body(), "model": "m" * 300}), "model"),
        (orjson.dumps({"model": "mock", "messages": ["hi"]}), "messages[0]"),
        (orjson.dumps(chat_body(temperature="hot")), "temperature"),
        (orjson.dumps(chat_body(temperature=5)), "temperature"),
        (orjson.dumps(chat_body(max_tokens=True)), "max_tokens"),
        (orjson.dumps(chat_body(stream="yes")), "stream"),
        (orjson.dumps(chat_body(stream_options={"include_usage": True})), "stream_options"),
    ],
)
def test_400_for_bad_bodies_names_the_parameter(
    make_client: MakeClient, admin_headers: dict[str, str], raw: bytes, param: str | None
) -> None:
    client = make_client()
    error = assert_openai_error(
        client.post(
            CHAT, content=raw, headers={**admin_headers, "content-type": "application/json"}
        ),
        400,
    )
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_404_unknown_model_and_route(
    make_client: MakeClient, admin_headers: dict[str, str]
) -> None:
    client = make_client()
    error = assert_openai_error(
        client.post(CHAT, json={**chat_body(), "model": "gpt-nope"}, headers=admin_headers),
        404,
        "model_not_found",
    )
    assert "gpt-nope" in error["message"]
    assert_openai_error(client.get("/v1/nothing-here", headers=admin_headers), 404)
    assert_openai_error(
        client.get("/v1/models/gpt-nope", headers=admin_headers), 404, "model_not_found"
    )


def test_403_model_not_allowed_and_models_listing_filtered(
    tmp_path: Path, make_client: MakeClient, make_settings: Any
) -> None:
    # 403 only when the operator asks for it (the default answers 404: test_hardening).
    config = base_config(
        models=[
            {"name": "mock", "provider": "mock"},
            {"name": "mock-2", "provider": "mock", "model": "other"},
        ],
        auth={"refresh_interval_s": 0.2, "forbidden_model_status": 403},
    )
    client = make_client(config)
    key = new_key(make_settings(config), models=("mock-2",))["key"]
    assert_openai_error(
        client.post(CHAT, json=chat_body(), headers=bearer(key)), 403, "model_not_allowed"
    )
    ok = client.post(CHAT, json={**chat_body(), "model": "mock-2"}, headers=bearer(key))
    assert ok.status_code == 200
    listed = client.get("/v1/models", headers=bearer(key)).json()
    assert [m["id"] for m in listed["data"]] == ["mock-2"]
    everything = client.get("/v1/models", headers=bearer(ADMIN_KEY)).json()
    assert [m["id"] for m in everything["data"]] == ["mock", "mock-2"]


def test_413_over_the_body_limit_changes_nothing(
    tmp_path: Path, make_client: MakeClient, admin_headers: dict[str, str]
) -> None:
    config = base_config(server={"max_body_bytes": 2000})
    client = make_client(config)
    big = chat_body("word " * 1000)
    assert_openai_error(
        client.post(CHAT, json=big, headers=admin_headers), 413, "request_too_large"
    )
    # Also when the client does not declare a length (chunked upload).
    chunks = iter([orjson.dumps(big)[:1500], orjson.dumps(big)[1500:]])
    assert_openai_error(client.post(CHAT, content=chunks, headers=admin_headers), 413)
    # The next normal request still works.
    assert client.post(CHAT, json=chat_body(), headers=admin_headers).status_code == 200


def test_429_rate_limit_with_retry_after_and_ratelimit_headers(
    make_client: MakeClient, make_settings: Any
) -> None:
    config = base_config()
    client = make_client(config)
    key = new_key(make_settings(config), rpm=3)["key"]
    statuses = []
    for _ in range(3):
        r = client.post(CHAT, json=chat_body(), headers=bearer(key))
        statuses.append(r.status_code)
        assert r.headers["x-ratelimit-limit-requests"] == "3"
    assert statuses == [200, 200, 200]
    r = client.post(CHAT, json=chat_body(), headers=bearer(key))
    error = assert_openai_error(r, 429, "rate_limit_exceeded")
    assert error["type"] == "requests"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    # Other keys are not affected.
    assert client.post(CHAT, json=chat_body(), headers=bearer(ADMIN_KEY)).status_code == 200


def test_429_token_limit(make_client: MakeClient, make_settings: Any) -> None:
    config = base_config()
    client = make_client(config)
    key = new_key(make_settings(config), tpm=20)["key"]
    first = client.post(CHAT, json=chat_body(), headers=bearer(key))
    assert first.status_code == 200
    assert first.json()["usage"]["total_tokens"] >= 14  # the window now holds that many
    second = client.post(CHAT, json=chat_body(), headers=bearer(key))
    assert second.status_code == 200  # 14+ < 20: still admitted, then charged
    r = client.post(CHAT, json=chat_body(), headers=bearer(key))
    error = assert_openai_error(r, 429)
    assert error["type"] == "tokens"
    assert r.headers["x-ratelimit-limit-tokens"] == "20"


def test_429_budget_refusals_say_what_is_left_and_never_overspend(
    tmp_path: Path, make_client: MakeClient, make_settings: Any
) -> None:
    config = base_config()
    client = make_client(config)
    budget = 0.00003
    key = new_key(make_settings(config), budget_usd=budget)["key"]
    body = chat_body(max_tokens=5)  # each request reserves its worst case: prompt + 5 tokens
    statuses = [client.post(CHAT, json=body, headers=bearer(key)).status_code for _ in range(12)]
    first_refusal = statuses.index(429)
    assert first_refusal >= 2 and set(statuses[first_refusal:]) == {429}, statuses
    r = client.post(CHAT, json=body, headers=bearer(key))
    error = assert_openai_error(r, 429, "budget_exceeded")
    assert "retry-after" not in r.headers and r.headers["x-should-retry"] == "false"
    assert "$0.00003 budget" in error["message"]  # small amounts shown as they are
    rows = wait_for(lambda: ledger_rows(ledger(tmp_path), "status_code = 200"))
    assert sum(row["cost_usd"] for row in rows) <= budget
    # A key with nothing left at all: insufficient_quota, and no Retry-After either.
    empty = new_key(make_settings(config), budget_usd=0.0)["key"]
    r = client.post(CHAT, json=body, headers=bearer(empty))
    assert_openai_error(r, 429, "insufficient_quota")
    assert "retry-after" not in r.headers


def test_502_upstream_failure_and_ledger_row(
    tmp_path: Path, make_client: MakeClient, admin_headers: dict[str, str]
) -> None:
    client = make_client()
    assert_openai_error(
        client.post(CHAT, json=chat_body("please mock:fail"), headers=admin_headers), 502
    )
    rows = wait_for(lambda: ledger_rows(ledger(tmp_path), "status_code = 502"))
    assert rows[0]["error_type"] == "upstream_error"
    assert rows[0]["model"] == "mock"


def test_504_upstream_timeout(
    tmp_path: Path, make_client: MakeClient, admin_headers: dict[str, str]
) -> None:
    state = Upstream(hang=True)  # accepts the request and never answers
    with ServerThread(openai_upstream(state)) as upstream:
        config = base_config(
            models=[
                {
                    "name": "slow",
                    "provider": "openai",
                    "model": "m",
                    "api_base": upstream.url + "/v1",
                    "timeout_s": 0.3,
                }
            ]
        )
        client = make_client(config)
        r = client.post(CHAT, json={**chat_body(), "model": "slow"}, headers=admin_headers)
        error = assert_openai_error(r, 504, "upstream_timeout")
        assert "127.0.0.1" not in error["message"]
        state.hang = False


def test_503_while_draining(make_client: MakeClient, admin_headers: dict[str, str]) -> None:
    client = make_client()
    gateway = client.app.state.gateway  # type: ignore[attr-defined]
    gateway.lifecycle.begin_drain()
    r = client.post(CHAT, json=chat_body(), headers=admin_headers)
    assert_openai_error(r, 503, "service_unavailable")
    assert client.get("/readyz").status_code == 503
    assert client.get("/livez").status_code == 200


def test_failure_after_stream_start_is_one_error_event_then_end(
    tmp_path: Path, make_client: MakeClient, admin_headers: dict[str, str]
) -> None:
    client = make_client()
    with client.stream(
        "POST", CHAT, json=chat_body("mock:fail-mid-stream", stream=True), headers=admin_headers
    ) as r:
        assert r.status_code == 200
        events = [e for e in r.read().decode().split("\n\n") if e]
    payloads = [orjson.loads(e.removeprefix("data: ")) for e in events]
    assert "choices" in payloads[0]
    assert "error" in payloads[-1]
    assert sum("error" in p for p in payloads) == 1
    assert "data: [DONE]" not in events
    rows = wait_for(lambda: ledger_rows(ledger(tmp_path), "error_type IS NOT NULL"))
    assert rows[0]["stream"] == 1


def test_stream_usage_chunk_only_when_asked(
    make_client: MakeClient, admin_headers: dict[str, str]
) -> None:
    client = make_client()

    def chunks(**extra: Any) -> list[dict[str, Any]]:
        r = client.post(CHAT, json=chat_body(stream=True, **extra), headers=admin_headers)
        events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
        assert events[-1] == "[DONE]"
        return [orjson.loads(e) for e in events[:-1]]

    without = chunks()
    assert all(c["choices"] for c in without), "the usage-only chunk must be stripped"
    with_usage = chunks(stream_options={"include_usage": True})
    assert with_usage[-1]["choices"] == []
    assert with_usage[-1]["usage"]["completion_tokens"] > 0


def test_every_authenticated_request_has_a_ledger_row(
    tmp_path: Path, make_client: MakeClient, admin_headers: dict[str, str]
) -> None:
    client = make_client()
    client.post(CHAT, json=chat_body(), headers=admin_headers)
    client.post(CHAT, json={**chat_body(), "model": "nope"}, headers=admin_headers)
    client.post(CHAT, content=b"{bad", headers=admin_headers)
    client.post(
        CHAT, json=chat_body(), headers={"authorization": "Bearer wrong"}
    )  # not authenticated: no row
    rows = wait_for(lambda: (r := ledger_rows(ledger(tmp_path))) and len(r) >= 3 and r)
    assert sorted(r["status_code"] for r in rows) == [200, 400, 404]


def test_embeddings(make_client: MakeClient, admin_headers: dict[str, str]) -> None:
    client = make_client()
    r = client.post(
        "/v1/embeddings", json={"model": "mock", "input": ["a b c", "d"]}, headers=admin_headers
    )
    assert r.status_code == 200
    body = r.json()
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert body["usage"]["prompt_tokens"] == 4
    assert_openai_error(
        client.post("/v1/embeddings", json={"model": "mock", "input": []}, headers=admin_headers),
        400,
    )


class _BrokenQuota(MemoryQuota):
    """A limit store that fails in a way the gateway does not expect (a bug, as far as it knows)."""

    async def admit(self, ask: Ask) -> Admitted:
        raise ZeroDivisionError("secret internal detail")


def test_unexpected_error_is_a_generic_500_without_internals(
    tmp_path: Path, make_client: MakeClient, admin_headers: dict[str, str]
) -> None:
    client = make_client(quota=_BrokenQuota())
    r = client.post(CHAT, json=chat_body(), headers=admin_headers)
    error = assert_openai_error(r, 500)
    assert "secret" not in r.text and "ZeroDivision" not in r.text
    assert error["type"] == "server_error"
    rows = wait_for(lambda: ledger_rows(ledger(tmp_path)))  # still on record
    assert rows[0]["status_code"] == 500 and rows[0]["error_type"] == "internal"


def test_upstream_error_text_is_redacted_before_a_client_sees_it() -> None:
    from daemon.providers.openai_compat import upstream_status_error

    body = orjson.dumps(
        {
            "error": {
                "message": "bad call to https://up.example/v1?key=AIzaSecret123 with api_key=sk-abcdefghijklmnopqrst"
            }
        }
    )
    error = upstream_status_error(400, body, "gemini")
    assert error.status_code == 400
    assert "AIzaSecret123" not in error.message and "sk-abcdefghijklmnopqrst" not in error.message
    assert "up.example" not in error.message and "bad call" in error.message


def test_keys_arrive_as_x_api_key_or_with_tabs_after_bearer(make_client: MakeClient) -> None:
    client = make_client()
    for headers in (
        {"x-api-key": ADMIN_KEY},
        {"authorization": f"Bearer\t{ADMIN_KEY}"},
        {"authorization": f"Bearer   {ADMIN_KEY}  "},
    ):
        assert client.post(CHAT, json=chat_body(), headers=headers).status_code == 200, headers
    assert_openai_error(client.post(CHAT, json=chat_body(), headers={"x-api-key": "nope"}), 401)
    assert_openai_error(client.post(CHAT, json=chat_body(), headers={"x-api-key": " "}), 401)
