"""The CLI never leaks a key, never sends one in clear to another host, and never lets a
server's strings drive the terminal (issue #13, "Secrets and the CLI")."""

from __future__ import annotations

import json
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from chatvault_cli.safety import clean, is_loopback, redact, remember
from tests.helpers import (
    ADMIN_KEY,
    Daemon,
    ServerThread,
    base_config,
    cli,
    free_port,
    running,
    write_config,
)

ENV = {"CHATVAULT_ADMIN_KEY": ADMIN_KEY}
API_KEY = "cv-smoke-api-key-abcdef987654"
# Whatever a hostile or broken server could put in a string to drive a terminal.
NASTY = "\x1b[2J\x1b[31mred\x1b[0m \x1b]0;owned\x07 \x9b1m \u202egnp.exe\u202c bell\x07 cr\rlf\n"
CONTROL = ("\x1b", "\x07", "\x9b", "\u202e", "\r")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    config = base_config(
        monitoring={"tracing": {"enabled": False}, "health": {"probe_interval_s": 3600}}
    )
    with running(tmp_path_factory.mktemp("cli-secrets"), config) as d:
        yield d


def output(result: Any) -> str:
    return str(result.stdout) + str(result.stderr)


# -- keys: whitespace, and never printed --------------------------------------------------


def test_a_key_with_a_trailing_newline_works_from_env_flag_and_state_file(
    daemon: Daemon, tmp_path: Path
) -> None:
    from_env = cli(
        "health", "--url", daemon.url, "--json", env={"CHATVAULT_ADMIN_KEY": ADMIN_KEY + "\n"}
    )
    assert from_env.returncode == 0, output(from_env)
    assert "admin_key_source" in json.loads(from_env.stdout)["components"]["authentication"]

    from_flag = cli(
        "metrics", "top", "--url", daemon.url, "--once", "--json", "--interval", "0.2",
        "--admin-key", f"  {ADMIN_KEY}\r\n", env={"CHATVAULT_ADMIN_KEY": ""},
    )  # fmt: skip
    assert from_flag.returncode == 0, output(from_flag)

    # A config of the CLI's own that points at the daemon, whose state file (as a
    # Kubernetes secret mounted as a file would be) ends in a newline.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "state.json").write_text(json.dumps({"admin_key": ADMIN_KEY + "\n"}))
    path = write_config(tmp_path, {"server": {"host": "127.0.0.1", "port": daemon.port}})
    from_file = cli(
        "health", "--config", str(path), "--json",
        env={"CHATVAULT_ADMIN_KEY": "", "CHATVAULT_URL": ""},
    )  # fmt: skip
    assert from_file.returncode == 0, output(from_file)
    assert "admin_key_source" in json.loads(from_file.stdout)["components"]["authentication"]

    smoke = cli("smoke", "--url", daemon.url, env={**ENV, "CHATVAULT_API_KEY": ADMIN_KEY + "\n"})
    assert smoke.returncode == 0, output(smoke)


def test_a_key_broken_inside_is_refused_without_printing_it(daemon: Daemon) -> None:
    broken = "cv-first-half-0001\ncv-second-half-0002"
    for args, env in (
        (("health", "--url", daemon.url), {"CHATVAULT_ADMIN_KEY": broken}),
        (("traces", "status", "--url", daemon.url, "--admin-key", broken), {}),
        (("smoke", "--url", daemon.url, "--key", broken), ENV),
        (("smoke", "--url", daemon.url), {**ENV, "CHATVAULT_API_KEY": broken}),
    ):
        result = cli(*args, env=env)
        text = output(result)
        assert result.returncode == 4, text  # not 2: health means unhealthy by it
        assert "Traceback" not in text and len(result.stderr.strip().splitlines()) == 1, text
        assert "whitespace or a control character" in text
        assert "first-half" not in text and "second-half" not in text, text


Handler = Callable[[Request], Awaitable[Response]]


def fake_daemon(
    health: Handler, metrics: Handler, traces: Handler, models: Handler, chat: Handler
) -> Starlette:
    """Every endpoint the CLI talks to, answered by the given handlers."""
    return Starlette(
        routes=[
            Route("/health", health),
            Route("/metrics", metrics),
            Route("/admin/traces/status", traces),
            Route("/v1/models", models),
            Route("/v1/chat/completions", chat, methods=["POST"]),
        ]
    )


def echo_server() -> Starlette:
    """A server that puts the Authorization header it receives into every answer."""

    def auth(request: Request) -> str:
        return request.headers.get("authorization", "")

    async def health(request: Request) -> Response:
        return JSONResponse(
            {
                "status": "degraded",
                "components": {"database": {"status": "degraded", "message": auth(request)}},
            }
        )

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(f"denied {auth(request)}", status_code=403)

    async def traces(request: Request) -> Response:
        return JSONResponse({"enabled": True, "last_error": auth(request), "last_failure": 1.0})

    async def models(request: Request) -> Response:
        return JSONResponse({"data": [{"id": f"model-{auth(request)}"}]})

    async def chat(request: Request) -> Response:
        return JSONResponse({"error": {"message": f"bad key {auth(request)}"}}, status_code=401)

    return fake_daemon(health, metrics, traces, models, chat)


def test_no_output_contains_a_key_even_when_the_server_echoes_it() -> None:
    with ServerThread(echo_server()) as server:
        runs = [
            cli("health", "--url", server.url, env=ENV),
            cli("health", "--url", server.url, "--json", env=ENV),
            cli("metrics", "top", "--url", server.url, "--once", "--interval", "0.2", env=ENV),
            cli("traces", "status", "--url", server.url, env=ENV),
            cli("traces", "status", "--url", server.url, "--json", env=ENV),
            cli("smoke", "--url", server.url, "--key", API_KEY + "\n", env=ENV),
        ]
    for result in runs:
        text = output(result)
        assert "Traceback" not in text, text
        assert ADMIN_KEY not in text and API_KEY not in text, text
    assert "[redacted]" in runs[0].stdout  # the echo was there, and was blanked out
    # Nothing listening, a refused admin key: error paths that print the URL and a reason.
    for result in (
        cli("health", "--url", f"http://127.0.0.1:{free_port()}", env=ENV),
        cli("smoke", "--url", f"http://127.0.0.1:{free_port()}", "--key", API_KEY, env=ENV),
    ):
        assert ADMIN_KEY not in output(result) and API_KEY not in output(result)


# -- keys over plain HTTP -----------------------------------------------------------------


def test_loopback_addresses() -> None:
    for host in ("127.0.0.1", "127.8.9.10", "localhost", "LOCALHOST.", "::1", "[::1]", "::ffff:127.0.0.1"):  # fmt: skip
        assert is_loopback(host), host
    for host in ("10.0.0.1", "192.168.1.5", "gateway.example", "localhost.example", "::ffff:10.0.0.1", "0.0.0.0", ""):  # fmt: skip
        assert not is_loopback(host), host


def test_keys_are_not_sent_over_plain_http_to_another_host_without_insecure() -> None:
    url = "http://gateway.example.invalid:8000"
    for args, env, what in (
        (("health", "--url", url), ENV, "the admin key"),
        (("metrics", "top", "--url", url, "--once"), ENV, "the admin key"),
        (("traces", "status", "--url", url), ENV, "the admin key"),
        (("smoke", "--url", url, "--key", API_KEY), {"CHATVAULT_ADMIN_KEY": ""}, "the API key"),
    ):
        result = cli(*args, env=env)
        assert result.returncode == 4, output(result)
        (line,) = result.stderr.strip().splitlines()
        assert f"refusing to send {what}" in line and "--insecure" in line, line
        assert "gateway.example.invalid:8000" in line and "https://" in line
        assert ADMIN_KEY not in output(result) and API_KEY not in output(result)


def local_address() -> str | None:
    """This machine's address on its main interface (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 9))
        except OSError:
            return None
        address = str(s.getsockname()[0])
    return None if is_loopback(address) else address


def test_insecure_sends_the_key_to_a_remote_http_daemon(tmp_path: Path) -> None:
    address = local_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to reach a daemon on")
    config = base_config(
        monitoring={"tracing": {"enabled": False}, "health": {"probe_interval_s": 3600}}
    )
    config["server"]["host"] = "0.0.0.0"
    with running(tmp_path, config) as daemon:
        url = f"http://{address}:{daemon.port}"
        refused = cli("health", "--url", url, "--json", env=ENV)
        assert refused.returncode == 4 and "--insecure" in refused.stderr
        allowed = cli("health", "--url", url, "--json", "--insecure", env=ENV)
        assert allowed.returncode == 0, output(allowed)
        assert "admin_key_source" in json.loads(allowed.stdout)["components"]["authentication"]
        # Without a key nothing secret travels: the public view needs no flag.
        public = cli("health", "--url", url, "--json", env={"CHATVAULT_ADMIN_KEY": ""})
        assert public.returncode == 0, output(public)
        assert "message" not in json.loads(public.stdout)["components"]["database"]
        https = cli(
            "health", "--url", f"https://{address}:{free_port()}", "--timeout", "2", env=ENV
        )
        assert https.returncode == 3 and "--insecure" not in https.stderr  # tried, not refused


def test_smoke_does_not_use_the_admin_key_for_its_calls(daemon: Daemon) -> None:
    result = cli("smoke", "--url", daemon.url, env={**ENV, "CHATVAULT_API_KEY": ""})
    assert result.returncode == 4, output(result)
    (line,) = result.stderr.strip().splitlines()
    assert "--key" in line and "CHATVAULT_API_KEY" in line and "admin key" in line


# -- what the server says, cleaned ----------------------------------------------------


def nasty_server() -> Starlette:
    """A ChatVault look-alike whose every string carries escape sequences."""

    async def health(request: Request) -> Response:
        return JSONResponse(
            {
                "status": "degraded",
                "version": NASTY,
                "components": {
                    "database": {"status": "healthy", "message": NASTY, "admin_key_source": NASTY},
                    f"x{NASTY}": {"status": NASTY, "message": "ok"},
                    "models": NASTY,
                },
                "performance": {"memory_usage_mb": NASTY, "cpu_percent": 1, "uptime_seconds": 5},
            }
        )

    async def metrics(request: Request) -> Response:
        label = NASTY.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return PlainTextResponse(
            f'chatvault_model_request_duration_seconds_count{{model="{label}",outcome="success"}} 3\n'
            f'chatvault_requests_cost_total{{model="{label}"}} 0.5\n'
        )

    async def traces(request: Request) -> Response:
        return JSONResponse(
            {
                "enabled": True,
                "endpoint": NASTY,
                "last_error": NASTY,
                "last_failure": 2.0,
                "last_success": 1.0,
                "spans_exported": 1,
            }
        )

    async def models(request: Request) -> Response:
        return JSONResponse({"data": [{"id": "m"}]})

    async def chat(request: Request) -> Response:
        body = await request.json()
        if body.get("stream"):

            async def events() -> Any:
                yield f"data: {json.dumps({'error': {'message': NASTY}})}\n\n".encode()

            return StreamingResponse(events(), media_type="text/event-stream")
        return JSONResponse({"error": {"message": f"upstream said {NASTY}"}}, status_code=502)

    return fake_daemon(health, metrics, traces, models, chat)


def test_server_strings_reach_the_terminal_without_control_characters() -> None:
    with ServerThread(nasty_server()) as server:
        runs = {
            "health": cli("health", "--url", server.url, env=ENV),
            "top": cli(
                "metrics", "top", "--url", server.url, "--once", "--interval", "0.2", env=ENV
            ),
            "traces": cli("traces", "status", "--url", server.url, env=ENV),
            "smoke": cli("smoke", "--url", server.url, "--key", API_KEY, env=ENV),
        }
    for name, result in runs.items():
        text = output(result)
        assert "Traceback" not in text, (name, text)
        for char in CONTROL:
            assert char not in text, (name, repr(char), text)
        assert "red" in text and "gnp.exe" in text, (name, text)  # the words stay, the codes go
    assert "upstream said" in runs["smoke"].stdout


def test_clean_removes_sequences_and_keeps_text() -> None:
    assert clean("\x1b[1;31mred\x1b[0m") == "red"
    assert clean("a\x1b]0;title\x07b\x1b]8;;http://x\x1b\\c") == "abc"
    assert clean("line\nnext\ttab\rcr") == "line next tab cr"
    assert clean("\u202eabc\u202c \x00\x7f\x9b2Jz") == "abc z"
    assert clean("plain ünïcödé · ✓") == "plain ünïcödé · ✓"
    remember("cv-remembered-secret")
    assert redact("x cv-remembered-secret y") == "x [redacted] y"


# -- a malformed /metrics page -------------------------------------------------------------


@pytest.mark.parametrize(
    "page",
    [
        'chatvault_requests_total{model="a 1\n',  # unterminated label value
        "chatvault_requests_total{model=a} 1\n",  # unquoted label value
        "chatvault_requests_total not-a-number\n",
        'chatvault_model_request_duration_seconds_bucket{model="a",outcome="success"} 1\n',  # no le
        'chatvault_time_to_first_token_seconds_bucket{model="a",le="soon"} 1\n',
    ],
)
def test_metrics_top_on_a_malformed_page_is_one_line(page: str) -> None:
    async def metrics(request: Request) -> Response:
        return PlainTextResponse("# HELP chatvault_x the usual\n" + page)

    with ServerThread(Starlette(routes=[Route("/metrics", metrics)])) as server:
        for extra in ((), ("--json",)):
            result = cli("metrics", "top", "--url", server.url, "--once", "--interval", "0.2", *extra, env=ENV)  # fmt: skip
            assert result.returncode == 3, output(result)
            (line,) = result.stderr.strip().splitlines()
            assert "is not valid Prometheus text" in line and "Traceback" not in output(result)
