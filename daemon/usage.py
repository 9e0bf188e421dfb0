"""The one per-request record that the ledger, the metrics and the spans derive from.

Because all three read the same ``Usage``, they cannot disagree about a request's
tokens or cost.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any


def new_row_id() -> str:
    """A server-generated unique id for a ledger row: what makes writes idempotent.

    128 random bits (the ``random`` module reseeds itself in forked children), about
    0.3 µs: cheaper than uuid4, and unique for any ledger that will ever exist.
    """
    return f"{random.getrandbits(128):032x}"


@dataclass(slots=True)
class TokenCounts:
    input: int = 0
    output: int = 0
    cached: int = 0  # part of input served from the provider's prompt cache
    reasoning: int = 0  # part of output spent on hidden reasoning

    @property
    def total(self) -> int:
        return self.input + self.output

    @classmethod
    def from_openai(cls, usage: Any) -> TokenCounts:
        """Read an OpenAI-shaped ``usage`` object; tolerate what servers leave out."""
        if not isinstance(usage, dict):
            return cls()
        prompt_details = usage.get("prompt_tokens_details") or {}
        completion_details = usage.get("completion_tokens_details") or {}
        return cls(
            input=_int(usage.get("prompt_tokens")),
            output=_int(usage.get("completion_tokens")),
            cached=_int(
                prompt_details.get("cached_tokens") if isinstance(prompt_details, dict) else 0
            ),
            reasoning=_int(
                completion_details.get("reasoning_tokens")
                if isinstance(completion_details, dict)
                else 0
            ),
        )


def _int(value: Any) -> int:
    # Bounded: a bogus count from an upstream must not overflow a database column.
    return (
        min(value, 10**12)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0
        else 0
    )


@dataclass(slots=True)
class Usage:
    """Everything recorded about one authenticated model request."""

    request_id: str
    started_at: float  # unix seconds
    key_id: str
    user_type: str
    operation: str  # "chat" | "embeddings"
    model: str  # the public model name the client sent
    provider: str = ""
    upstream_model: str = ""
    stream: bool = False
    status_code: int = 200
    error_type: str | None = None
    tokens: TokenCounts = field(default_factory=TokenCounts)
    cost_usd: float = 0.0
    latency_s: float = 0.0
    upstream_latency_s: float | None = None
    ttft_s: float | None = None
    trace_id: str = ""
    # Unique per row, whatever the client sent as its request id: a batch written twice
    # (retried after a lost commit, replayed from the journal) inserts each row once.
    row_id: str = field(default_factory=new_row_id)
    # Why the token counts are an estimate (e.g. "stream_cut_before_usage"); None: counted
    # by the upstream. Stored as the row's ``estimated`` flag and reason.
    estimated_reason: str | None = None
    # Known deployment? Unknown model names must not become metric label values.
    known_model: bool = True
    response_model: str = ""
    response_id: str = ""
    finish_reasons: tuple[str, ...] = ()
    # Routing and the cache (docs/routing.md): the public model and the deployment
    # ("models[2]") that answered, upstream attempts made, hit | miss | bypass (None: no
    # cache), and what a hit would have cost.
    served_model: str = ""
    deployment: str = ""
    attempts: int = 0
    cache_result: str | None = None
    saved_usd: float = 0.0
    # Not stored: perf_counter() at arrival, for durations; the deployment that served;
    # the open upstream span, ended with the outcome; captured output (capture_content).
    perf_start: float = 0.0
    deployment_index: int = -1
    upstream_span: Any = None
    quota_ticket: Any = None  # what admission reserved, settled when the request ends
    output_text: str | None = None
    output_body: bytes | None = None  # a non-streamed reply, kept for its span (capture_content)
    in_flight: Any = None  # the deployment counted in flight, released when the request ends
    cache_write: Any = None  # what to store in the response cache if the answer completes
    attempt_started: float = 0.0  # perf_counter() when the serving attempt began (span timings)
    finished: bool = False  # accounted once, whatever path ends the request
    # Read back from a journal left by an earlier process: its spend was never pending
    # in this process's budget book.
    recovered: bool = False

    @property
    def ok(self) -> bool:
        return self.error_type is None
