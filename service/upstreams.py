"""Arms and their replicas. Each request goes to the replica of its arm with
the fewest outstanding requests; ties go round-robin, so idle replicas share
sequential load too. A replica that refuses the connection is skipped for
that request and the next one is tried."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass(eq=False)
class Replica:
    arm: str
    url: str
    outstanding: int = 0
    # The model name the replica serves: the arm's name unless discovered
    # otherwise from its /v1/models (remote arms may serve any name).
    served_model: str | None = None


@dataclass
class Arm:
    name: str
    replicas: list[Replica]
    in_flight: int = 0
    _turn: itertools.count = field(default_factory=itertools.count)

    def by_preference(self) -> list[Replica]:
        """Replicas, least outstanding first; equal ones in rotating order."""
        start = next(self._turn) % len(self.replicas)
        rotated = self.replicas[start:] + self.replicas[:start]
        return sorted(rotated, key=lambda r: r.outstanding)  # stable: keeps the rotation among ties


def build_arms(upstreams: dict[str, list[str]]) -> dict[str, Arm]:
    return {name: Arm(name, [Replica(name, url) for url in urls]) for name, urls in upstreams.items()}
