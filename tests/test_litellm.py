"""The litellm path, for real: an Anthropic model whose api_base is a local Messages API server."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.fakes import Upstream, anthropic_upstream
from tests.helpers import (
    ServerThread,
    base_config,
    client_for,
    ledger_rows,
    running,
    wait_for,
)


def litellm_price(model: str) -> tuple[float, float]:
    """Read litellm's bundled price list independently of the gateway's code."""
    spec = importlib.util.find_spec("litellm")
    assert spec is not None and spec.origin is not None
    prices = json.loads(
        (Path(spec.origin).parent / "model_prices_and_context_window_backup.json").read_text()
    )
    entry = prices[model]
    return entry["input_cost_per_token"], entry["output_cost_per_token"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    state = Upstream(reply_words=("Bonjour", "from", "Claude"), usage=(17, 6))
    with ServerThread(anthropic_upstream(state)) as upstream:
        config = base_config(
            models=[
                {
                    "name": "claude",
                    "provider": "anthropic",
                    "model": "claude-haiku-4-5",
                    "api_base": upstream.url,
                    "api_key_env": "ANTHROPIC_TEST_KEY",
                }
            ]
        )
        with running(
            tmp_path_factory.mktemp("litellm"), config, env={"ANTHROPIC_TEST_KEY": "sk-ant-test"}
        ) as daemon:
            daemon.wait_ready(60)  # litellm loads in the background after start
            yield daemon, state


def test_openai_request_becomes_an_anthropic_messages_call_and_back(setup) -> None:  # type: ignore[no-untyped-def]
    daemon, state = setup
    client = client_for(daemon.url)
    raw = client.chat.completions.with_raw_response.create(
        model="claude",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hello"},
        ],
        max_tokens=50,
        temperature=0.3,
    )
    completion = raw.parse()
    # Back: OpenAI's shape, Anthropic's answer and counts.
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "Bonjour from Claude"
    assert completion.choices[0].finish_reason == "stop"  # end_turn, translated
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (17, 6)
    # There: Anthropic's shape.
    sent = state.posts()[-1]
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == "sk-ant-test"
    assert "anthropic-version" in sent.headers
    assert sent.body["model"] == "claude-haiku-4-5"
    assert sent.body["max_tokens"] == 50
    assert sent.body["system"] in ("Be brief.", [{"type": "text", "text": "Be brief."}])
    assert [m["role"] for m in sent.body["messages"]] == ["user"]
    # Accounted with litellm's price for the model.
    row = wait_for(
        lambda: ledger_rows(daemon.ledger_path, "request_id = ?", (raw.headers["x-request-id"],))
    )[0]
    price_in, price_out = litellm_price("claude-haiku-4-5")
    assert (row["input_tokens"], row["output_tokens"]) == (17, 6)
    assert row["cost_usd"] == pytest.approx(17 * price_in + 6 * price_out, rel=1e-9)
    assert row["provider"] == "anthropic"


def test_anthropic_stream_becomes_openai_chunks_with_usage(setup) -> None:  # type: ignore[no-untyped-def]
    daemon, state = setup
    client = client_for(daemon.url)
    stream = client.chat.completions.create(
        model="claude",
        messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=50,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage:
            usage = chunk.usage
    assert text == "Bonjour from Claude"
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (17, 6)
    assert state.posts()[-1].body["stream"] is True
    rows = wait_for(lambda: ledger_rows(daemon.ledger_path, "stream = 1"))
    assert (rows[0]["input_tokens"], rows[0]["output_tokens"]) == (17, 6)


def test_clients_cannot_redirect_the_upstream_call(setup) -> None:  # type: ignore[no-untyped-def]
    daemon, state = setup
    client = client_for(daemon.url)
    before = len(state.posts())
    completion = client.chat.completions.create(
        model="claude",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=10,
        extra_body={
            "api_base": "http://127.0.0.1:9",
            "base_url": "http://127.0.0.1:9",
            "api_key": "x",
            "mock_response": "pwned",
            "extra_headers": {"x-evil": "1"},
        },
    )
    assert completion.choices[0].message.content == "Bonjour from Claude"
    assert len(state.posts()) == before + 1
    sent = state.posts()[-1]
    assert sent.headers["x-api-key"] == "sk-ant-test" and "x-evil" not in sent.headers
