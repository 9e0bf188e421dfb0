"""The health vocabulary: healthy, degraded, unhealthy, how they rank and combine.

Metrics and health both speak it; neither imports the other.
"""

from __future__ import annotations

from collections.abc import Mapping

HEALTHY, DEGRADED, UNHEALTHY = "healthy", "degraded", "unhealthy"
RANK = {HEALTHY: 0, DEGRADED: 1, UNHEALTHY: 2}
# Components whose trouble cannot make the whole instance unhealthy.
CAPPED = frozenset({"metrics", "tracing", "external_apis"})


def overall(statuses: Mapping[str, str]) -> str:
    """The worst component status, with the capped components counting as degraded at most."""
    worst = HEALTHY
    for name, status in statuses.items():
        if name in CAPPED and status == UNHEALTHY:
            status = DEGRADED
        if RANK[status] > RANK[worst]:
            worst = status
    return worst
