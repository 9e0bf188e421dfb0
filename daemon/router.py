"""Routing: a public model name to the deployments that serve it, in the order to try.

Several config entries may share one ``name``: they are one model served by several
deployments. Requests rotate over them, deployments currently marked down go last,
and a failed attempt that produced no output falls through to the next one.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from daemon.deployment import Deployment
from daemon.errors import ModelNotFound


def order_candidates(
    candidates: Sequence[Deployment], start: int, is_up: Callable[[Deployment], bool]
) -> list[Deployment]:
    """Rotate by ``start``; deployments that are up first, the rest after, as a last resort."""
    n = len(candidates)
    rotated = [candidates[(start + i) % n] for i in range(n)]
    return [d for d in rotated if is_up(d)] + [d for d in rotated if not is_up(d)]


class Router:
    def __init__(
        self,
        deployments: Sequence[Deployment],
        is_up: Callable[[Deployment], bool] = lambda d: True,
    ) -> None:
        self.deployments = list(deployments)
        self.is_up = is_up
        self._groups: dict[str, list[Deployment]] = {}
        for d in self.deployments:
            self._groups.setdefault(d.name, []).append(d)
        self._counters = {name: itertools.count() for name in self._groups}

    @property
    def names(self) -> list[str]:
        return list(self._groups)

    def knows(self, name: str) -> bool:
        return name in self._groups

    def plan(self, name: str) -> list[Deployment]:
        """The deployments to try for ``name``, best first. Raises ModelNotFound."""
        group = self._groups.get(name)
        if group is None:
            raise ModelNotFound(f"The model '{name}' does not exist.", param="model")
        if len(group) == 1:
            return group
        return order_candidates(group, next(self._counters[name]), self.is_up)
