"""``chatvault smoke``: the post-deploy check a CI job runs against a live gateway.

Health at or above the bar, one completion, one streamed completion, and proof
that both were accounted: the daemon's token counter for the model moved by at least
the tokens the two answers reported.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from chatvault_cli import promtext
from chatvault_cli.client import DaemonClient, NotChatVault, Unreachable

Check = tuple[str, bool, str]
MESSAGES = [{"role": "user", "content": "ChatVault smoke check: reply briefly."}]
# What a malformed answer raises while it is picked apart.
_BAD_ANSWER = (ValueError, KeyError, TypeError, AttributeError, IndexError)


def token_count(client: DaemonClient, model: str) -> float:
    return sum(
        s.value
        for s in promtext.parse(client.metrics_text())
        if s.name == "chatvault_tokens_processed_total"
        and s.labels.get("model") == model
        and s.labels.get("token_type") in ("input", "output")
    )


def _first_model(client: DaemonClient, api_key: str | None) -> str | None:
    response = client.request("GET", "/v1/models", key=api_key)
    if response.status != 200:
        return None
    data = response.json().get("data") or []
    return str(data[0]["id"]) if data else None


def run_smoke(
    client: DaemonClient, *, api_key: str | None, model: str | None, fail_on: str
) -> list[Check]:
    checks: list[Check] = []
    try:
        _, body = client.health()
        bad = {"unhealthy"} | ({"degraded"} if fail_on == "degraded" else set())
        checks.append(("health", body["status"] not in bad, body["status"]))
    except (Unreachable, NotChatVault) as exc:
        return [("health", False, str(exc))]
    if not api_key:
        return [
            *checks,
            (
                "api key",
                False,
                "no API key: pass --key or set CHATVAULT_API_KEY (smoke never uses the admin key)",
            ),
        ]
    try:
        model = model or _first_model(client, api_key)
    except (Unreachable, NotChatVault, *_BAD_ANSWER) as exc:
        return [*checks, ("model", False, f"GET /v1/models failed: {exc}")]
    if model is None:
        return [*checks, ("model", False, "the key may use no model (GET /v1/models)")]
    try:
        before: float | None = token_count(client, model)
    except (PermissionError, Unreachable, NotChatVault, *_BAD_ANSWER) as exc:
        before = None
        checks.append(("metrics readable", False, str(exc)))
    expected = [0]
    checks.append(_step("completion", lambda: _completion(client, api_key, model, expected)))
    checks.append(_step("streamed completion", lambda: _stream(client, api_key, model, expected)))
    if before is not None:
        start = before
        checks.append(
            _step("accounted in /metrics", lambda: _accounted(client, model, start, expected[0]))
        )
    return checks


def _step(name: str, run: Callable[[], tuple[bool, str]]) -> Check:
    """One check; whatever the daemon answers, a failure is a line, never a traceback."""
    try:
        ok, detail = run()
    except (Unreachable, NotChatVault, PermissionError, *_BAD_ANSWER) as exc:
        return (name, False, str(exc) or type(exc).__name__)
    return (name, ok, detail)


def _completion(
    client: DaemonClient, key: str, model: str, expected: list[int]
) -> tuple[bool, str]:
    started = time.perf_counter()
    body = {"model": model, "messages": MESSAGES, "max_tokens": 16}
    response = client.request("POST", "/v1/chat/completions", key=key, body=body)
    elapsed = (time.perf_counter() - started) * 1000
    if response.status != 200:
        return False, f"HTTP {response.status}: {_error_message(response.body)}"
    answer = response.json()
    usage = answer.get("usage") or {}
    expected[0] += int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
    content = ((answer.get("choices") or [{}])[0].get("message") or {}).get("content")
    return bool(content), f"{model}, {usage.get('total_tokens', '?')} tokens, {elapsed:.0f} ms"


def _stream(client: DaemonClient, key: str, model: str, expected: list[int]) -> tuple[bool, str]:
    started = time.perf_counter()
    chunks, done, tokens, text = 0, False, 0, ""
    body = {
        "model": model,
        "messages": MESSAGES,
        "max_tokens": 16,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    for line in client.stream_lines("/v1/chat/completions", key=key, body=body):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise NotChatVault(f"error event: {chunk['error'].get('message')}")
        chunks += 1
        for choice in chunk.get("choices") or []:
            text += (choice.get("delta") or {}).get("content") or ""
        usage = chunk.get("usage") or {}
        tokens = (
            int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
            or tokens
        )
    expected[0] += tokens
    elapsed = (time.perf_counter() - started) * 1000
    return done and bool(text), f"{chunks} chunks, {tokens} tokens, {elapsed:.0f} ms"


def _accounted(client: DaemonClient, model: str, before: float, expected: int) -> tuple[bool, str]:
    moved = 0.0
    for _ in range(20):  # with several workers the last one may still be finishing up
        moved = token_count(client, model) - before
        if moved >= expected > 0:
            break
        time.sleep(0.1)
    return moved >= expected > 0, f"token counter +{moved:g}, answers reported {expected}"


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace")
