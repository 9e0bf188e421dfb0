"""Routing: a public model name to the deployments that serve it, in the order to try.

Several config entries may share one ``name``: they are one model served by several
deployments, chosen by ``routing.strategy`` (docs/routing.md):

    weighted     smooth weighted round robin over ``weight`` (equal weights: round robin)
    least-busy   the fewest requests in flight
    latency      the lowest recent latency, exploring another one now and then

The choices are pure functions of the balancer's state and an injected random source,
so their shares can be tested statistically. A model's ``fallbacks`` (other public
names) follow it in the plan; ``attempts.py`` walks the plan.

    router = Router(deployments, fallbacks={"primary": ["backup"]}, strategy="weighted")
    plan = router.plan("primary")
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from daemon.deployment import Deployment
from daemon.errors import ModelNotFound

# Latency strategy: how much a new measurement moves the average, and how often a
# request goes to a deployment that is not the fastest (so a recovered one is seen).
LATENCY_ALPHA = 0.3
EXPLORE = 0.1


def smooth_weighted(current: list[float], weights: Sequence[float]) -> int:
    """Smooth weighted round robin (nginx's): each pick raises every deployment's
    credit by its weight and lowers the chosen one's by the total. Exact shares over
    any window of sum(weights) picks, interleaved; equal weights make plain round
    robin. Weights all 0: equal. ``current`` is updated in place."""
    if not any(weights):
        weights = [1.0] * len(weights)
    total = 0.0
    best = 0
    for i, w in enumerate(weights):
        current[i] += w
        total += w
        if current[i] > current[best]:
            best = i
    current[best] -= total
    return best


def least_busy(in_flight: Sequence[int], start: int) -> int:
    """The fewest requests in flight; ties go round, from ``start``."""
    n = len(in_flight)
    best = start % n
    for k in range(1, n):
        i = (start + k) % n
        if in_flight[i] < in_flight[best]:
            best = i
    return best


def lowest_latency(latency: Sequence[float | None], rand: float, explore: float = EXPLORE) -> int:
    """The lowest recent latency. Unmeasured deployments first (to measure them); with
    probability ``explore`` a uniformly random one, so a deployment that was slow once
    gets a chance to show it recovered. ``rand`` is uniform in [0, 1)."""
    n = len(latency)
    for i, value in enumerate(latency):
        if value is None:
            return i
    if rand < explore:
        return min(int(rand / explore * n), n - 1)
    return min(range(n), key=lambda i: latency[i] or 0.0)


def ewma(previous: float | None, sample: float, alpha: float = LATENCY_ALPHA) -> float:
    return sample if previous is None else previous + alpha * (sample - previous)


@dataclass
class Balancer:
    """One model's deployments and the state its strategy chooses from."""

    deployments: list[Deployment]
    strategy: str
    rand: Callable[[], float]
    credit: list[float] = field(default_factory=list)
    in_flight: list[int] = field(default_factory=list)
    latency: list[float | None] = field(default_factory=list)
    turn: int = 0

    def __post_init__(self) -> None:
        n = len(self.deployments)
        self.credit = [0.0] * n
        self.in_flight = [0] * n
        self.latency = [None] * n
        self.weights = [d.config.weight for d in self.deployments]
        self.position = {d.index: i for i, d in enumerate(self.deployments)}

    def pick(self) -> int:
        if self.strategy == "least-busy":
            self.turn += 1
            return least_busy(self.in_flight, self.turn)
        if self.strategy == "latency":
            return lowest_latency(self.latency, self.rand())
        return smooth_weighted(self.credit, self.weights)

    def order(self, is_up: Callable[[Deployment], bool]) -> list[Deployment]:
        """The chosen deployment first, the others after it in config order (for
        retries); deployments that are down go last, as a last resort."""
        first = self.pick()
        n = len(self.deployments)
        rotated = [self.deployments[(first + i) % n] for i in range(n)]
        up = [d for d in rotated if is_up(d)]
        if len(up) == n:
            return rotated
        return up + [d for d in rotated if not is_up(d)]


@dataclass(frozen=True, slots=True)
class Leg:
    """One public model of a plan and its deployments, best first."""

    model: str
    deployments: list[Deployment]


@dataclass(frozen=True, slots=True)
class Plan:
    """The model the client asked for, then its fallbacks, in the order to try."""

    legs: list[Leg]

    @property
    def model(self) -> str:
        return self.legs[0].model

    def deployments(self) -> list[Deployment]:
        return [d for leg in self.legs for d in leg.deployments]

    def within(self, models: frozenset[str]) -> Plan:
        """The plan without the fallbacks outside ``models`` (a key's allowed models):
        a fallback must not serve, or bill at its price, a model the key may not use."""
        if len(self.legs) == 1:  # no fallbacks, the common case: nothing to build
            return self
        legs = [leg for leg in self.legs[1:] if leg.model in models]
        return self if len(legs) == len(self.legs) - 1 else Plan([self.legs[0], *legs])


class Router:
    def __init__(
        self,
        deployments: Sequence[Deployment],
        is_up: Callable[[Deployment], bool] = lambda d: True,
        *,
        fallbacks: Mapping[str, list[str]] | None = None,
        strategy: str = "weighted",
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.deployments = list(deployments)
        self.is_up = is_up
        groups: dict[str, list[Deployment]] = {}
        for d in self.deployments:
            groups.setdefault(d.name, []).append(d)
        self.fallbacks = {name: list((fallbacks or {}).get(name, ())) for name in groups}
        self.balancers = {name: Balancer(group, strategy, rand) for name, group in groups.items()}
        self._by_index = {d.index: self.balancers[d.name] for d in self.deployments}
        # A single deployment without fallbacks has one plan, made once: the hot path
        # of the commonest config costs a dict lookup.
        self._fixed = {
            name: Plan([Leg(name, group)])
            for name, group in groups.items()
            if len(group) == 1 and not self.fallbacks[name]
        }

    @property
    def names(self) -> list[str]:
        return list(self.balancers)

    def knows(self, name: str) -> bool:
        return name in self.balancers

    def plan(self, name: str) -> Plan:
        """The model's deployments, best first, then its fallbacks'. Raises ModelNotFound."""
        fixed = self._fixed.get(name)
        if fixed is not None:
            return fixed
        if name not in self.balancers:
            raise ModelNotFound(f"The model '{name}' does not exist.", param="model")
        return Plan([Leg(m, self._order(m)) for m in (name, *self.fallbacks[name])])

    def _order(self, name: str) -> list[Deployment]:
        balancer = self.balancers[name]
        if len(balancer.deployments) == 1:
            return balancer.deployments
        return balancer.order(self.is_up)

    # -- what the strategies learn from traffic -----------------------------------------

    def started(self, d: Deployment) -> None:
        balancer = self._by_index[d.index]
        balancer.in_flight[balancer.position[d.index]] += 1

    def ended(self, d: Deployment, latency_s: float | None) -> None:
        balancer = self._by_index[d.index]
        i = balancer.position[d.index]
        balancer.in_flight[i] = max(balancer.in_flight[i] - 1, 0)
        if latency_s is not None:
            balancer.latency[i] = ewma(balancer.latency[i], latency_s)
