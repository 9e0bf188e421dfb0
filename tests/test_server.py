"""The real thing: `chatvault serve` as a process, the official openai client, the ledger on disk."""

from __future__ import annotations

import json
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fakes import Upstream, openai_upstream
from tests.helpers import (
    ADMIN_KEY,
    Daemon,
    ServerThread,
    base_config,
    cli,
    client_for,
    free_port,
    ledger_rows,
    running,
    shared_limits,
    wait_for,
    write_config,
)

MOCK_PRICE = (0.15, 0.60)  # the test config's USD per million input / output tokens


def expected_cost(input_tokens: int, output_tokens: int) -> float:
    return (input_tokens * MOCK_PRICE[0] + output_tokens * MOCK_PRICE[1]) / 1_000_000


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Any:
    directory = tmp_path_factory.mktemp("served")
    with running(directory, base_config()) as d:
        yield d


def test_non_stream_completion_matches_its_ledger_row(daemon: Daemon) -> None:
    client = client_for(daemon.url)
    raw = client.chat.completions.with_raw_response.create(
        model="mock", messages=[{"role": "user", "content": "count these words please"}]
    )
    completion = raw.parse()
    request_id = raw.headers["x-request-id"]
    assert completion.choices[0].message.content.endswith("count these words please")
    assert completion.usage is not None
    rows = wait_for(lambda: ledger_rows(daemon.ledger_path, "request_id = ?", (request_id,)))
    row = rows[0]
    assert (row["input_tokens"], row["output_tokens"]) == (
        completion.usage.prompt_tokens,
        completion.usage.completion_tokens,
    )
    assert row["cost_usd"] == pytest.approx(
        expected_cost(completion.usage.prompt_tokens, completion.usage.completion_tokens), rel=1e-12
    )
    assert row["status_code"] == 200 and row["error_type"] is None
    assert row["key_id"] == "admin" and row["model"] == "mock" and row["stream"] == 0


@pytest.mark.parametrize("include_usage", [True, False])
def test_stream_completion_matches_its_ledger_row(daemon: Daemon, include_usage: bool) -> None:
    client = client_for(daemon.url)
    kwargs: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    raw = client.chat.completions.with_raw_response.create(
        model="mock", messages=[{"role": "user", "content": "stream me"}], stream=True, **kwargs
    )
    stream = raw.parse()
    text, usage_chunks, usage = "", 0, None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            usage_chunks += 1
            usage = chunk.usage
    assert text.endswith("stream me")
    assert usage_chunks == (1 if include_usage else 0)
    row = wait_for(
        lambda: ledger_rows(daemon.ledger_path, "request_id = ?", (raw.headers["x-request-id"],))
    )[0]
    assert row["stream"] == 1 and row["status_code"] == 200
    assert row["ttft_s"] is not None and row["ttft_s"] <= row["latency_s"]
    if usage is not None:
        assert (row["input_tokens"], row["output_tokens"]) == (
            usage.prompt_tokens,
            usage.completion_tokens,
        )
    else:
        # The gateway still counted the tokens, though the client did not ask to see them.
        assert row["output_tokens"] == len(
            text.replace("'", " ' ").replace(".", " . ").replace(":", " : ").split()
        )
    assert row["cost_usd"] == pytest.approx(
        expected_cost(row["input_tokens"], row["output_tokens"]), rel=1e-12
    )


def test_embeddings_and_models_with_the_openai_client(daemon: Daemon) -> None:
    client = client_for(daemon.url)
    result = client.embeddings.create(model="mock", input=["one two", "three"])
    assert [d.index for d in result.data] == [0, 1]
    assert result.usage.prompt_tokens == 3
    assert [m.id for m in client.models.list()] == ["mock"]


def test_errors_surface_as_openai_client_exceptions(daemon: Daemon) -> None:
    with pytest.raises(openai.AuthenticationError):
        client_for(daemon.url, "cv-wrong").chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.NotFoundError) as not_found:
        client_for(daemon.url).chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}]
        )
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client_for(daemon.url).chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "x"}], temperature=9
        )
    with pytest.raises(openai.InternalServerError) as upstream:
        client_for(daemon.url).chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "mock:fail"}]
        )
    assert upstream.value.status_code == 502


def test_keys_created_and_revoked_by_the_cli_take_effect_without_restart(daemon: Daemon) -> None:
    created = cli(
        "keys",
        "create",
        "--name",
        "app-1",
        "--rpm",
        "100",
        "--json",
        "--config",
        str(daemon.config_path),
    )
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["key"].startswith("cv-") and key["id"] and key["name"] == "app-1"
    client = client_for(daemon.url, key["key"])
    assert client.chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "hi"}]
    ).choices

    listed = cli("keys", "list", "--json", "--config", str(daemon.config_path))
    assert key["key"] not in listed.stdout  # the secret is never shown again
    assert key["id"] in {k["id"] for k in json.loads(listed.stdout)}

    revoked = cli("keys", "revoke", "app-1", "--config", str(daemon.config_path))
    assert revoked.returncode == 0, revoked.stderr

    def refused() -> bool:
        try:
            client.chat.completions.create(
                model="mock", messages=[{"role": "user", "content": "hi"}]
            )
        except openai.AuthenticationError:
            return True
        return False

    wait_for(refused, timeout=10)
    assert cli("keys", "revoke", "app-1", "--config", str(daemon.config_path)).returncode == 1


def test_sigterm_during_a_stream_lets_it_finish_and_writes_its_row(tmp_path: Path) -> None:
    config = base_config(
        models=[
            {
                "name": "slow",
                "provider": "mock",
                "mock": {"chunk_delay_s": 0.1, "reply": " ".join(["w"] * 20)},
            }
        ]
    )
    with running(tmp_path, config) as daemon:
        client = client_for(daemon.url)
        stream = client.chat.completions.create(
            model="slow", messages=[{"role": "user", "content": "go"}], stream=True
        )
        chunks = iter(stream)
        first = next(chunks)
        daemon.signal(signal.SIGTERM)
        rest = list(chunks)
        words = "".join(c.choices[0].delta.content or "" for c in [first, *rest] if c.choices)
        assert words.split() == ["w"] * 20
        assert daemon.wait(30) == 0
        rows = ledger_rows(daemon.ledger_path)
        assert len(rows) == 1
        assert rows[0]["status_code"] == 200 and rows[0]["output_tokens"] == 20


def test_sigterm_past_the_drain_timeout_cuts_the_stream_but_keeps_its_row(tmp_path: Path) -> None:
    config = base_config(
        models=[
            {
                "name": "slow",
                "provider": "mock",
                "mock": {"chunk_delay_s": 0.5, "reply": " ".join(["w"] * 40)},
            }
        ],
        server={"drain_timeout_s": 1},
    )
    with running(tmp_path, config) as daemon:
        with httpx.stream(
            "POST",
            daemon.url + "/v1/chat/completions",
            json={"model": "slow", "messages": [{"role": "user", "content": "go"}], "stream": True},
            headers={"authorization": f"Bearer {ADMIN_KEY}"},
            timeout=30,
        ) as response:
            lines = response.iter_lines()
            next(lines)
            daemon.signal(signal.SIGTERM)
            with pytest.raises(httpx.HTTPError):
                for _ in lines:
                    pass
        assert daemon.wait(30) == 0
        rows = ledger_rows(daemon.ledger_path)
        assert len(rows) == 1
        assert rows[0]["status_code"] == 499 and rows[0]["error_type"] == "cancelled"


def test_a_client_leaving_mid_stream_is_recorded_with_estimated_tokens(tmp_path: Path) -> None:
    config = base_config(
        models=[
            {
                "name": "slow",
                "provider": "mock",
                "pricing": {"input_per_million": 1.0, "output_per_million": 1.0},
                "mock": {"chunk_delay_s": 0.1, "reply": " ".join(["w"] * 30)},
            }
        ]
    )
    with running(tmp_path, config) as daemon:
        body = {
            "model": "slow",
            "messages": [{"role": "user", "content": "please write thirty words for me right now"}],
            "stream": True,
        }
        with httpx.stream(
            "POST",
            daemon.url + "/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {ADMIN_KEY}"},
            timeout=30,
        ) as response:
            lines = response.iter_lines()
            events = [line for line in (next(lines) for _ in range(12)) if line.startswith("data:")]
        assert len(events) >= 4  # then the client hangs up
        row = wait_for(lambda: ledger_rows(daemon.ledger_path), timeout=15)[0]
        assert row["status_code"] == 499 and row["error_type"] == "cancelled"
        # No usage chunk ever came: the tokens are estimated, not zero.
        assert 3 <= row["output_tokens"] < 30 and row["input_tokens"] > 0 and row["cost_usd"] > 0


def test_openai_compatible_upstream_is_passed_through(tmp_path: Path) -> None:
    state = Upstream(reply_words=("alpha", "beta", "gamma"), usage=(21, 4))
    with ServerThread(openai_upstream(state)) as upstream:
        config = base_config(
            models=[
                {
                    "name": "remote",
                    "provider": "openai",
                    "model": "up-model",
                    "api_base": upstream.url + "/v1",
                    "api_key_env": "UPSTREAM_KEY",
                    "pricing": {"input_per_million": 1.0, "output_per_million": 2.0},
                }
            ]
        )
        with running(tmp_path, config, env={"UPSTREAM_KEY": "sk-upstream-secret"}) as daemon:
            client = client_for(daemon.url)
            done = client.chat.completions.create(
                model="remote", messages=[{"role": "user", "content": "hi"}]
            )
            assert done.choices[0].message.content == "alpha beta gamma"
            assert done.model == "up-model"
            text = "".join(
                c.choices[0].delta.content or ""
                for c in client.chat.completions.create(
                    model="remote", messages=[{"role": "user", "content": "hi"}], stream=True
                )
                if c.choices
            )
            assert text.split() == ["alpha", "beta", "gamma"]
            first, second = state.posts()
            assert first.body["model"] == "up-model" and "stream" not in first.body
            assert first.headers["authorization"] == "Bearer sk-upstream-secret"
            assert second.body["stream_options"] == {"include_usage": True}
            rows = wait_for(lambda: (r := ledger_rows(daemon.ledger_path)) and len(r) == 2 and r)
            for row in rows:
                assert (row["input_tokens"], row["output_tokens"]) == (21, 4)
                assert row["cost_usd"] == pytest.approx((21 * 1.0 + 4 * 2.0) / 1e6)
                assert row["upstream_model"] == "up-model" and row["provider"] == "openai"
        assert "sk-upstream-secret" not in daemon.log()


def test_unreachable_deployment_falls_back_to_the_next_one(tmp_path: Path) -> None:
    state = Upstream()
    with ServerThread(openai_upstream(state)) as upstream:
        dead = f"http://127.0.0.1:{free_port()}/v1"
        config = base_config(
            models=[
                {"name": "pool", "provider": "openai", "model": "a", "api_base": dead},
                {
                    "name": "pool",
                    "provider": "openai",
                    "model": "b",
                    "api_base": upstream.url + "/v1",
                },
            ]
        )
        with running(tmp_path, config) as daemon:
            client = client_for(daemon.url)
            for _ in range(4):
                assert client.chat.completions.create(
                    model="pool", messages=[{"role": "user", "content": "hi"}]
                ).choices
            assert {r.body["model"] for r in state.posts()} == {"b"}


def test_bad_config_fails_with_the_key_path_not_a_traceback(tmp_path: Path) -> None:
    config = base_config(
        models=[
            {"name": "mock", "provider": "mock"},
            {"name": "x", "provider": "openai", "model": "m", "api_base": "not a url"},
        ]
    )
    path = write_config(tmp_path, config)
    result = cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert "models[1].api_base: not a URL" in result.stderr
    assert "Traceback" not in result.stderr
    check = cli("config", "check", "--config", str(path))
    assert check.returncode == 1 and "models[1].api_base: not a URL" in check.stderr


def test_busy_port_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = write_config(tmp_path, base_config(port=port))
        result = cli("serve", "--config", str(path), env={"CHATVAULT_ADMIN_KEY": ADMIN_KEY})
    assert result.returncode == 3
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_generated_admin_key_is_written_owner_only(tmp_path: Path) -> None:
    path = write_config(tmp_path, base_config(port=free_port()))
    daemon = Daemon(path, env={"CHATVAULT_ADMIN_KEY": ""})
    with daemon:
        state_file = tmp_path / "data" / "state.json"
        assert state_file.stat().st_mode & 0o777 == 0o600
        key = json.loads(state_file.read_text())["admin_key"]
        models = httpx.get(daemon.url + "/v1/models", headers={"authorization": f"Bearer {key}"})
        assert models.status_code == 200
    assert key not in daemon.log()


def test_two_workers_serve_and_drain(tmp_path: Path) -> None:
    path = write_config(tmp_path, base_config(port=free_port(), limits=shared_limits()))
    with Daemon(path, args=("--workers", "2")) as daemon:
        client = client_for(daemon.url)
        results: list[bool] = []

        def call() -> None:
            results.append(
                bool(
                    client.chat.completions.create(
                        model="mock", messages=[{"role": "user", "content": "x"}]
                    ).choices
                )
            )

        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [True] * 8
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    assert len(ledger_rows(daemon.ledger_path)) == 8
    # Nothing left running: the process is gone and nothing listens on its port.
    assert daemon.process is not None and daemon.process.poll() == 0
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", daemon.port)) != 0
