"""POST /v1/completions (legacy text completions) with the official client, translated to
chat completions for the mock and for an OpenAI-compatible upstream; ledgered as
``text_completion``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MakeClient
from tests.fakes import Upstream, openai_upstream
from tests.helpers import ADMIN_KEY, ServerThread, base_config, ledger_rows, wait_for
from tests.surfaces_support import metric_value, openai_client

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def ledger(tmp_path: Path) -> Path:
    return tmp_path / "data" / "ledger.db"


def test_create_against_mock(tmp_path: Path, make_client: MakeClient) -> None:
    app = make_client()
    client = openai_client(app)
    completion = client.completions.create(model="mock", prompt="Once upon a time", max_tokens=50)
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    choice = completion.choices[0]
    assert choice.text == "This is ChatVault's mock model. You said: Once upon a time"
    assert choice.finish_reason == "stop" and choice.index == 0
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (5, 15)
    row = wait_for(lambda: ledger_rows(ledger(tmp_path), "operation = 'text_completion'"))[0]
    assert (row["model"], row["status_code"], row["input_tokens"], row["output_tokens"]) == (
        "mock",
        200,
        5,
        15,
    )
    assert metric_value(app, "chatvault_model_requests_total", model="mock", status="success") == 1
    assert metric_value(app, "chatvault_http_requests_total", endpoint="/v1/completions") == 1


def test_stream_with_usage_n_stop_and_logprobs(tmp_path: Path, make_client: MakeClient) -> None:
    client = openai_client(make_client())
    chunks = list(
        client.completions.create(
            model="mock",
            prompt="count the words",
            stream=True,
            stream_options={"include_usage": True},
            n=2,
            stop=" You",
            logprobs=2,
        )
    )
    texts: dict[int, str] = {0: "", 1: ""}
    for chunk in chunks[:-1]:
        assert chunk.object == "text_completion"
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.text:
                assert choice.logprobs is not None
                assert "".join(choice.logprobs.tokens or []) == choice.text
                for top in choice.logprobs.top_logprobs or []:
                    assert len(top) == 2 and all(v <= 0 for v in top.values())
    assert texts == {0: "This is ChatVault's mock model.", 1: "This is ChatVault's mock model."}
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.completion_tokens == 2 * 8  # This is ChatVault ' s mock model .
    row = wait_for(lambda: ledger_rows(ledger(tmp_path), "operation = 'text_completion'"))[0]
    assert (row["stream"], row["output_tokens"]) == (1, 16)


def test_stream_without_usage_has_no_usage_chunk(make_client: MakeClient) -> None:
    client = openai_client(make_client())
    chunks = list(client.completions.create(model="mock", prompt="hi", stream=True))
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_non_streamed_are_plausible(make_client: MakeClient) -> None:
    client = openai_client(make_client())
    completion = client.completions.create(model="mock", prompt="hello", logprobs=3)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert logprobs.text_offset is not None and logprobs.text_offset[0] == 0
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs or [], strict=True):
        assert chosen is not None and chosen < 0
        assert sum(math.exp(v) for v in top.values()) <= 1.0 + 1e-9


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"prompt": ["one", "two"]}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"suffix": "end"}, "suffix"),
        ({"echo": True}, "echo"),
        ({"best_of": 3}, "best_of"),
        ({"logprobs": 9}, "logprobs"),
        ({"temperature": 5}, "temperature"),
    ],
)
def test_what_cannot_be_translated_is_a_clear_400(
    make_client: MakeClient, extra: dict[str, Any], param: str
) -> None:
    app = make_client()
    response = app.post(
        "/v1/completions", json={"model": "mock", "prompt": "x", **extra}, headers=ADMIN
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_translated_for_an_openai_compatible_upstream(
    tmp_path: Path, make_client: MakeClient
) -> None:
    state = Upstream(reply_words=("a", "legacy", "answer"), usage=(9, 3))
    with ServerThread(openai_upstream(state)) as upstream:
        config = base_config(
            models=[
                {
                    "name": "up",
                    "provider": "openai",
                    "model": "up-model",
                    "api_base": upstream.url + "/v1",
                }
            ]
        )
        client = openai_client(make_client(config))
        completion = client.completions.create(
            model="up", prompt="Say it", max_tokens=7, seed=3, user="u1"
        )
        streamed = "".join(
            c.choices[0].text
            for c in client.completions.create(model="up", prompt="Say it", stream=True)
            if c.choices
        )
    assert completion.choices[0].text == "a legacy answer"
    assert streamed == "a legacy answer "
    sent = state.posts()
    assert [r.path for r in sent] == ["/v1/chat/completions"] * 2
    assert sent[0].body == {
        "model": "up-model",
        "max_tokens": 7,
        "seed": 3,
        "user": "u1",
        "messages": [{"role": "user", "content": "Say it"}],
    }
    rows = wait_for(lambda: (r := ledger_rows(ledger(tmp_path))) and len(r) == 2 and r)
    assert [(r["operation"], r["input_tokens"], r["output_tokens"]) for r in rows] == [
        ("text_completion", 9, 3),
        ("text_completion", 9, 3),
    ]
