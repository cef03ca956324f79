"""Where the gateway sends each arm's requests: an arm's `Upstream` is its
replicas and the requests it is serving. Each request goes to the replica
with the fewest outstanding requests; ties go round-robin, so idle replicas
share sequential load too. A replica that refuses the connection is skipped
for that request and the next one is tried; for a few seconds afterwards it
is tried last."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

# How long a replica that refused a connection goes to the back of the queue.
COOL_OFF_S = 2.0


@dataclass(eq=False)
class Replica:
    arm: str
    url: str
    outstanding: int = 0
    # The model name the replica serves: the arm's name unless discovered
    # otherwise from its /v1/models (remote arms may serve any name).
    served_model: str | None = None
    refused_until: float = 0.0

    def refused(self) -> None:
        self.refused_until = time.monotonic() + COOL_OFF_S


@dataclass
class Upstream:
    """One arm as the gateway routes to it."""

    name: str
    replicas: list[Replica]
    in_flight: int = 0
    _turn: itertools.count = field(default_factory=itertools.count)

    def by_preference(self) -> list[Replica]:
        """Replicas, least outstanding first (recently refused ones last); equal ones in rotating order."""
        if len(self.replicas) == 1:
            return self.replicas
        now = time.monotonic()
        start = next(self._turn) % len(self.replicas)
        rotated = self.replicas[start:] + self.replicas[:start]
        # sorted() is stable: it keeps the rotation among ties.
        return sorted(rotated, key=lambda r: (r.refused_until > now, r.outstanding))


def build_upstreams(urls_by_arm: dict[str, list[str]]) -> dict[str, Upstream]:
    """Arm name -> its Upstream, from arm name -> replica base URLs."""
    return {name: Upstream(name, [Replica(name, url) for url in urls]) for name, urls in urls_by_arm.items()}
