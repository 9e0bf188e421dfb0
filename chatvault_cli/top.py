"""``chatvault metrics top``: live rates from two successive /metrics scrapes. Pure functions.

A scrape is cumulative (counters and histogram buckets since the daemon started); the
difference of two scrapes over the seconds between them gives rates, and the bucket
differences give the interval's latency quantiles the way Prometheus'
``histogram_quantile`` does. When no request arrived in the interval, quantiles and
the error rate fall back to the totals since start, so a quiet daemon still shows
something true.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from chatvault_cli.promtext import ParseError, Sample

GROUPS = ("model", "provider", "user_type")
DURATION = "chatvault_model_request_duration_seconds"
TTFT = "chatvault_time_to_first_token_seconds"
TOKENS = "chatvault_tokens_processed_total"
COST = "chatvault_requests_cost_total"


@dataclass
class GroupTotals:
    requests: float = 0.0
    errors: float = 0.0
    tokens_in: float = 0.0
    tokens_out: float = 0.0
    cost: float = 0.0
    duration_buckets: dict[float, float] = field(default_factory=lambda: defaultdict(float))
    ttft_buckets: dict[float, float] = field(default_factory=lambda: defaultdict(float))


@dataclass
class Snapshot:
    """One scrape, reduced to what top shows, grouped by one label."""

    at: float  # monotonic seconds when scraped
    groups: dict[str, GroupTotals]
    in_flight: float = 0.0


def _bound(sample: Sample) -> float:
    try:
        return float(sample.labels["le"])
    except (KeyError, ValueError):
        raise ParseError(f"{sample.name}: a bucket without a numeric le label") from None


def reduce(samples: Iterable[Sample], by: str, at: float) -> Snapshot:
    """Raises promtext.ParseError for a histogram bucket without a usable ``le``."""
    groups: dict[str, GroupTotals] = defaultdict(GroupTotals)
    in_flight = 0.0
    for s in samples:
        if s.name == "chatvault_http_requests_in_flight":
            in_flight += s.value
            continue
        key = s.labels.get(by)
        if key is None:
            continue
        g = groups[key]
        if s.name == DURATION + "_count":
            g.requests += s.value
            if s.labels.get("outcome") == "error":
                g.errors += s.value
        elif s.name == DURATION + "_bucket" and s.labels.get("outcome") == "success":
            g.duration_buckets[_bound(s)] += s.value
        elif s.name == TTFT + "_bucket":
            g.ttft_buckets[_bound(s)] += s.value
        elif s.name == TOKENS:
            if s.labels.get("token_type") == "input":
                g.tokens_in += s.value
            elif s.labels.get("token_type") == "output":
                g.tokens_out += s.value
        elif s.name == COST:
            g.cost += s.value
    return Snapshot(at, dict(groups), in_flight)


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """``histogram_quantile`` over cumulative buckets {le: count}; None without data."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    previous_bound, previous_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return previous_bound  # beyond the last finite bucket: its upper bound
            in_bucket = count - previous_count
            if in_bucket <= 0:
                return bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / in_bucket
        previous_bound, previous_count = bound, count
    return previous_bound


def _delta(after: dict[float, float], before: dict[float, float]) -> dict[float, float]:
    return {le: after[le] - before.get(le, 0.0) for le in after}


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def rows(first: Snapshot, second: Snapshot, by: str) -> list[dict[str, Any]]:
    """One row per group with totals since start and rates over the interval."""
    seconds = max(second.at - first.at, 1e-9)
    out = []
    for key, now in sorted(second.groups.items()):
        then = first.groups.get(key, GroupTotals())
        d_requests = now.requests - then.requests
        d_errors = now.errors - then.errors
        duration = _delta(now.duration_buckets, then.duration_buckets)
        ttft = _delta(now.ttft_buckets, then.ttft_buckets)
        if d_requests > 0:
            error_rate: float | None = d_errors / d_requests
        else:
            error_rate = now.errors / now.requests if now.requests else None
        if not any(duration.values()):
            duration = dict(now.duration_buckets)
        if not any(ttft.values()):
            ttft = dict(now.ttft_buckets)
        tokens_in = now.tokens_in - then.tokens_in
        tokens_out = now.tokens_out - then.tokens_out
        out.append(
            {
                by: key,
                "requests_total": int(now.requests),
                "errors_total": int(now.errors),
                "tokens_in_total": int(now.tokens_in),
                "tokens_out_total": int(now.tokens_out),
                "tokens_total": int(now.tokens_in + now.tokens_out),
                "cost_total_usd": round(now.cost, 10),
                "requests_per_s": round(d_requests / seconds, 3),
                "tokens_in_per_s": round(tokens_in / seconds, 3),
                "tokens_out_per_s": round(tokens_out / seconds, 3),
                "tokens_per_s": round((tokens_in + tokens_out) / seconds, 3),
                "cost_per_hour_usd": round((now.cost - then.cost) / seconds * 3600, 6),
                "error_rate": _round(error_rate, 4),
                "p50_latency_s": _round(quantile(0.5, duration), 4),
                "p95_latency_s": _round(quantile(0.95, duration), 4),
                "p50_ttft_s": _round(quantile(0.5, ttft), 4),
                "p95_ttft_s": _round(quantile(0.95, ttft), 4),
            }
        )
    return out


SORTABLE = (
    "requests_per_s",
    "tokens_per_s",
    "cost_per_hour_usd",
    "error_rate",
    "p50_latency_s",
    "p95_latency_s",
    "p50_ttft_s",
    "requests_total",
    "tokens_total",
    "cost_total_usd",
)


def sort_rows(rows_: Sequence[dict[str, Any]], column: str) -> list[dict[str, Any]]:
    """Largest first; rows without a value last."""
    return sorted(rows_, key=lambda r: (r.get(column) is None, -(r.get(column) or 0)))


class Trends:
    """Each group's req/s and $/h over the last ``size`` intervals of a watch."""

    def __init__(self, by: str, size: int = 16) -> None:
        self.by = by
        self.size = size
        self._series: dict[str, tuple[deque[float], deque[float]]] = {}

    def add(self, rows_: Sequence[dict[str, Any]]) -> None:
        for r in rows_:
            requests, cost = self._series.setdefault(
                str(r[self.by]), (deque(maxlen=self.size), deque(maxlen=self.size))
            )
            requests.append(float(r["requests_per_s"] or 0))
            cost.append(float(r["cost_per_hour_usd"] or 0))

    def view(self) -> dict[str, tuple[list[float], list[float]]]:
        return {k: (list(req), list(cost)) for k, (req, cost) in self._series.items()}
