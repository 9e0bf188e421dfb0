"""Admission: may this key send this request now? Its rate limits, then its budget.

One call to the quota store decides both (``daemon/quota.py``): the request and token
buckets, then a reservation of the request's worst-case cost against the budget
(``daemon/budget.py``), settled to the real cost when the request ends. Refusals are
429s: rate limits with OpenAI's headers (``Retry-After``, ``retry-after-ms``,
``x-ratelimit-*``), budgets with ``insufficient_quota`` (nothing left) or
``budget_exceeded`` (this request's worst case does not fit what is left) and no
``Retry-After``: a budget does not come back in an hour. All are counted in metrics
and noted on the request's span.

    admission = Admission(quota, metrics, default_max_tokens=4096)
    decision = await admission.admit(principal, usage, body, body_bytes, prices)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from daemon.auth import Principal
from daemon.budget import Verdict, usd, worst_case_cost, worst_case_tokens
from daemon.errors import BudgetExceeded, RateLimited
from daemon.limits import Decision
from daemon.metrics import AnyMetrics
from daemon.pricing import Price
from daemon.quota import Ask, Quota
from daemon.tracing import instrument_rate_limiting
from daemon.usage import Usage


class Admission:
    def __init__(self, quota: Quota, metrics: AnyMetrics, *, default_max_tokens: int) -> None:
        self.quota = quota
        self.metrics = metrics
        self.default_max_tokens = default_max_tokens

    async def admit(
        self,
        principal: Principal,
        usage: Usage,
        body: dict[str, Any],
        body_bytes: int,
        prices: Sequence[Price],
    ) -> Decision:
        """Reserve what the request may cost and count it against the limits; raise 429
        when over. The reservation rides on ``usage`` to its settlement."""
        worst = 0.0
        if principal.budget_usd is not None:
            tokens = worst_case_tokens(body, body_bytes, usage.operation, self.default_max_tokens)
            worst = worst_case_cost(tokens, prices)
        admitted = await self.quota.admit(Ask(principal.limits, principal.budget_usd, worst))
        if admitted.fail_open:
            self.metrics.record_limits_fail_open()
        decision = admitted.decision
        instrument_rate_limiting(decision.allowed, decision.limit_type, decision.retry_after_s)
        if not decision.allowed:
            raise self._rate_limited(decision, principal)
        if admitted.budget is not None and not admitted.budget.allowed:
            self.metrics.record_rate_limit("budget", principal.user_type)
            raise _over_budget(principal, admitted.budget, worst)
        usage.quota_ticket = admitted.ticket
        return decision

    def _rate_limited(self, decision: Decision, principal: Principal) -> RateLimited:
        limit = "rpm" if decision.limit_type == "requests" else "tpm"
        self.metrics.record_rate_limit(limit, principal.user_type)
        wait = max(decision.retry_after_s, 0.001)
        headers = dict(decision.headers)
        headers["Retry-After"] = str(max(math.ceil(wait), 1))
        headers["retry-after-ms"] = str(math.ceil(wait * 1000))
        return RateLimited(
            f"Rate limit reached for {decision.limit_type} per minute on this key. "
            f"Please try again in {wait:.1f}s.",
            headers=headers,
            error_type=decision.limit_type or "requests",
        )


def _over_budget(principal: Principal, verdict: Verdict, worst: float) -> BudgetExceeded:
    budget = principal.budget_usd or 0.0
    headers = {"x-should-retry": "false"}
    if verdict.exhausted:
        return BudgetExceeded(
            f"This key has used its budget of {usd(budget)}; nothing is left. "
            "Ask the gateway's operator for a larger budget or a new key.",
            headers=headers,
        )
    return BudgetExceeded(
        f"This request could cost up to {usd(worst)}, more than this key has left: "
        f"{usd(verdict.remaining_usd)} of its {usd(budget)} budget, counting requests "
        "still in flight. Lower max_tokens (or n), or retry when they have finished.",
        code="budget_exceeded",
        headers=headers,
    )
