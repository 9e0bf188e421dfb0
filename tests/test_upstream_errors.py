"""Each error status a real OpenAI-compatible upstream can answer with, and what the
client then sees from a real daemon through the official client: the status, the
OpenAI-shaped error and its code, and an unbilled ledger row with the same status.

The client's own mistakes (400, 413, 422) and the upstream's rate limit (429) pass
through as such; the gateway's credentials or configuration (401, 403, 404) and server
errors are a 502, an upstream timeout (408, 504) a 504 (``providers/openai_compat.py``).
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.fakes import Upstream, openai_upstream
from tests.helpers import (
    Daemon,
    ServerThread,
    base_config,
    client_for,
    ledger_rows,
    running,
    wait_for,
)

# upstream status -> (client status, error code, error type)
MAPPING = {
    400: (400, None, "invalid_request_error"),
    413: (400, None, "invalid_request_error"),
    422: (400, None, "invalid_request_error"),
    401: (502, "bad_gateway", "upstream_error"),
    403: (502, "bad_gateway", "upstream_error"),
    404: (502, "bad_gateway", "upstream_error"),
    408: (504, "upstream_timeout", "timeout"),
    429: (429, "upstream_rate_limited", "requests"),
    500: (502, "bad_gateway", "upstream_error"),
    502: (502, "bad_gateway", "upstream_error"),
    503: (502, "bad_gateway", "upstream_error"),
    504: (504, "upstream_timeout", "timeout"),
}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Upstream]]:
    state = Upstream()
    with ServerThread(openai_upstream(state)) as upstream:
        config = base_config()
        config["models"] = [
            {
                "name": "up",
                "provider": "openai",
                "model": "up-model",
                "api_base": upstream.url + "/v1",
                "pricing": {"input_per_million": 1.0, "output_per_million": 2.0},
            }
        ]
        # One attempt each, and no circuit opening on the failures this module asks for:
        # the mapping of each status is under test, not the routing (tests/test_routing.py).
        config["routing"] = {"retries": 0, "circuit_breaker": {"failures": 1000}}
        with running(tmp_path_factory.mktemp("upstream-errors"), config) as daemon:
            yield daemon, state


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("upstream_status", sorted(MAPPING))
def test_an_upstream_error_status_reaches_the_client_mapped(
    gateway: tuple[Daemon, Upstream], upstream_status: int, stream: bool
) -> None:
    daemon, state = gateway
    state.status = upstream_status
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            client_for(daemon.url).chat.completions.create(
                model="up", messages=[{"role": "user", "content": "hello"}], stream=stream
            )
    finally:
        state.status = 200
    status, code, error_type = MAPPING[upstream_status]
    error = caught.value
    assert error.status_code == status
    assert isinstance(error.body, dict) and set(error.body) == {"message", "type", "param", "code"}
    assert error.body["code"] == code and error.body["type"] == error_type
    assert "127.0.0.1" not in error.body["message"]  # the upstream's address stays inside
    if upstream_status == 429:
        assert error.response.headers["retry-after"] == "1"
    request_id = error.response.headers["x-request-id"]
    rows = wait_for(lambda: ledger_rows(daemon.ledger_path, "request_id = ?", (request_id,)))
    assert [(r["status_code"], r["cost_usd"], r["stream"]) for r in rows] == [(status, 0.0, stream)]


def test_the_gateway_answers_normally_again_afterwards(gateway: tuple[Daemon, Upstream]) -> None:
    daemon, state = gateway
    state.status, state.usage = 200, (11, 3)
    reply = client_for(daemon.url).chat.completions.create(
        model="up", messages=[{"role": "user", "content": "hello"}]
    )
    assert reply.choices[0].message.content == "Hello from upstream"
