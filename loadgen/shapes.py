"""Load shapes: which prompt goes to which arm, and when.

A run is a list of steps (one, or several for a sweep). Each step is

- `sequential`: one request at a time (closed loop);
- `concurrency N`: N requests in flight, the next sent as one ends (closed loop);
- `poisson RATE`: arrivals at RATE per second with exponential gaps, sent
  whether or not earlier requests have ended (open loop).

Arms are ordered in one of two ways:

- `rotate`: every prompt goes to every arm, in an order that rotates from one
  prompt to the next (A B C, then B C A, then C A B, ...), so that the arms
  are paired by prompt and by time. A step ends after one pass. Where an arm
  has two slots (the baseline's repeat), the rotation may step by more than
  one (`rotation_step`), so that no arm is sent two requests in a row: a vLLM
  server answers faster right after its own previous request (a request that
  followed its own server's ran at 0.955 of the prompt's median TPOT, against
  1.000 for the rest, cpu-eagle3 on 2026-12-03), so a slot that follows
  itself would be timed warm.
- `blocks`: time is cut into blocks of `block_seconds` and all requests of a
  block go to one arm (A B A B ...); under load this pairs arms in time, where
  rotating would mix arms within a batch. Each arm keeps its own cursor through
  the prompts (in workload order, cycling), so every arm is sent the same
  prompts in the same order and the analysis can pair them by prompt.

The default is `rotate` for sequential steps and `blocks` otherwise.

Every step is bounded in requests and in time: no request starts after the
step's (or the run's) deadline, requests in flight may finish for up to
`drain_seconds` more, then the step ends regardless.

`Scheduler` holds this plan in one process (Locust's master, or the only
process) and hands out jobs one at a time, so the bounds, the rotation and
the arrival times are exact however many workers run the users.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from core.config import LoadRegime
from core.contracts import regime_label, step_regime

STEP_KINDS = ("sequential", "concurrency", "poisson")
SHAPES = (*STEP_KINDS, "sweep")
ROTATE, BLOCKS = "rotate", "blocks"


class ShapeError(ValueError):
    """A shape that cannot run; the message says why."""


@dataclass(frozen=True)
class Step:
    kind: str
    users: int = 1  # closed loop: requests in flight
    rate: float = 0.0  # open loop: arrivals per second
    max_seconds: float | None = None  # None: bounded by the run only
    max_requests: int | None = None

    def __post_init__(self):
        if self.kind not in STEP_KINDS:
            raise ShapeError(f"unknown step kind {self.kind!r}; known: {', '.join(STEP_KINDS)}")
        if self.kind == "poisson" and not self.rate > 0:
            raise ShapeError("a poisson step needs a rate above 0")
        if self.users < 1:
            raise ShapeError("a step needs at least 1 user")

    @property
    def open_loop(self) -> bool:
        return self.kind == "poisson"

    @property
    def label(self) -> str:
        return regime_label(self.kind, self.users, self.rate)


STEP_PATTERN = re.compile(
    r"^(?P<kind>[a-z]+)(?::(?P<value>[0-9.]+))?(?::(?P<seconds>[0-9.]+)s)?(?::(?P<requests>[0-9]+)r)?$")


def parse_step(text: str) -> Step:
    """`KIND[:VALUE][:SECONDSs][:REQUESTSr]`, e.g. `sequential`,
    `concurrency:4:60s`, `poisson:2.5:120s:200r`. VALUE is the concurrency or
    the rate."""
    match = STEP_PATTERN.match(text.strip())
    if not match:
        raise ShapeError(f"cannot read step {text!r}; expected KIND[:VALUE][:SECONDSs][:REQUESTSr]")
    kind, value = match["kind"], match["value"]
    seconds = float(match["seconds"]) if match["seconds"] else None
    requests = int(match["requests"]) if match["requests"] else None
    if kind == "concurrency":
        if not value or not value.isdigit():
            raise ShapeError(f"step {text!r}: concurrency needs a whole number of users")
        return Step("concurrency", users=int(value), max_seconds=seconds, max_requests=requests)
    if kind == "poisson":
        if not value:
            raise ShapeError(f"step {text!r}: poisson needs a rate")
        return Step("poisson", rate=float(value), max_seconds=seconds, max_requests=requests)
    if value:
        raise ShapeError(f"step {text!r}: {kind} takes no value")
    return Step(kind, max_seconds=seconds, max_requests=requests)


def format_step(step: Step) -> str:
    parts = [step.kind]
    if step.kind == "concurrency":
        parts.append(str(step.users))
    elif step.kind == "poisson":
        parts.append(f"{step.rate:g}")
    if step.max_seconds is not None:
        parts.append(f"{step.max_seconds:g}s")
    if step.max_requests is not None:
        parts.append(f"{step.max_requests}r")
    return ":".join(parts)


def parse_sweep(text: str) -> list[Step]:
    steps = [parse_step(part) for part in text.split(",") if part.strip()]
    if not steps:
        raise ShapeError("a sweep needs at least one step")
    return steps


def steps_for(shape: str, concurrency: int = 1, rate: float = 0.0, sweep: str = "") -> list[Step]:
    """The steps of a shape chosen on the command line."""
    if shape == "sequential":
        return [Step("sequential")]
    if shape == "concurrency":
        return [Step("concurrency", users=concurrency)]
    if shape == "poisson":
        return [Step("poisson", rate=rate)]
    if shape == "sweep":
        return parse_sweep(sweep)
    raise ShapeError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def regime_step(regime: LoadRegime) -> Step:
    if regime.kind == "sweep":
        raise ShapeError("a sweep cannot be a step of a sweep")
    return Step(regime.kind, users=regime.users or 1, rate=regime.rate or 0.0,
                max_seconds=regime.max_seconds, max_requests=regime.max_requests)


def locust_shape_options(regime: LoadRegime) -> list[str]:
    """The locustfile options that select this regime's shape (its overall
    bounds go in --max-requests and --run-time)."""
    if regime.kind == "sweep":
        return ["--shape", "sweep", "--sweep", ",".join(format_step(regime_step(s)) for s in regime.steps)]
    if regime.kind == "concurrency":
        return ["--shape", "concurrency", "--concurrency", str(regime.users)]
    if regime.kind == "poisson":
        return ["--shape", "poisson", "--rate", f"{regime.rate:g}"]
    return ["--shape", "sequential"]


# --- the scheduler --------------------------------------------------------------

def _rotation(arms: list[str], shift: int) -> list[str]:
    return arms[shift:] + arms[:shift]


def rotation_step(arms: list[str]) -> int:
    """The shift from one prompt's arm order to the next: among the steps coprime with the number of
    slots (so every order comes round once per cycle), the smallest under which the fewest requests go
    to the arm that answered the one before, across prompts and cycles too."""
    n = len(arms)

    def self_follows(step: int) -> int:
        sequence = [arm for i in range(n) for arm in _rotation(arms, i * step % n)]
        return sum(a == b for a, b in zip(sequence, sequence[1:] + sequence[:1]))

    return min((step for step in range(1, max(n, 2)) if math.gcd(step, n) == 1),
               key=lambda step: (self_follows(step), step))


@dataclass
class StepState:
    step: Step
    started: float
    deadline: float  # no request starts after this
    limit: float  # most requests this step may send
    jobs: Iterator[tuple[dict, str]] | None  # rotate order; None under blocks
    cursors: dict[str, int] = field(default_factory=dict)  # blocks: each arm's next prompt
    issued: int = 0
    in_flight: set[int] = field(default_factory=set)
    next_arrival: float = 0.0
    exhausted: bool = False


class Scheduler:
    """Hands out jobs for a list of steps, one at a time.

    `rows` are workload rows (id, task, stratum, messages, max_tokens).
    `done` counts (regime label, prompt id, arm) already recorded, so that a
    resumed run skips them: in rotate order each done (prompt, arm) pair; under
    blocks each arm's cursor starts past the requests it already has (the caller
    also lowers `max_requests`). `clock` is monotonic seconds (a test may pass its own).
    """

    def __init__(self, rows: list[dict], arms: list[str], steps: list[Step], *, arm_order: str | None = None,
                 block_seconds: float = 30.0, run_seconds: float = 600.0, max_requests: int = 1000,
                 drain_seconds: float = 60.0, seed: int = 0, regime_label: str | None = None,
                 done: Counter | None = None, clock=time.monotonic):
        if not rows:
            raise ShapeError("no prompts to send")
        if not arms:
            raise ShapeError("no arms to send to")
        if arm_order not in (None, ROTATE, BLOCKS):
            raise ShapeError(f"arm order must be {ROTATE!r} or {BLOCKS!r}")
        if block_seconds <= 0 or run_seconds <= 0 or drain_seconds < 0 or max_requests < 1:
            raise ShapeError("block and run seconds must be positive, drain seconds not negative, max requests >= 1")
        self.rows, self.arms, self.steps = rows, list(arms), list(steps)
        self.arm_order, self.block_seconds = arm_order, block_seconds
        self.drain_seconds, self.max_requests = drain_seconds, max_requests
        self.regime_label, self.done = regime_label, done or Counter()
        self.clock = clock
        self.rng = random.Random(f"{seed}:arrivals")
        self.started = clock()
        self.run_deadline = self.started + run_seconds
        self.issued_total = 0
        self.abandoned = 0  # in flight when a step hit its hard stop
        self.index = -1
        self.state: StepState | None = None
        self._next_seq = 0
        self._advance(self.started)

    # -- which arm, which prompt --------------------------------------------
    def order_of(self, step: Step) -> str:
        return self.arm_order or (ROTATE if step.kind == "sequential" else BLOCKS)

    def regime_of(self, step: Step) -> str:
        return step_regime(self.regime_label, step.label, len(self.steps))

    def _rotated(self, regime: str) -> Iterator[tuple[dict, str]]:
        done = Counter({(p, a): n for (r, p, a), n in self.done.items() if r == regime})
        step = rotation_step(self.arms)
        for i, row in enumerate(self.rows):
            for arm in _rotation(self.arms, i * step % len(self.arms)):
                if done[(row["id"], arm)] > 0:
                    done[(row["id"], arm)] -= 1
                    continue
                yield row, arm

    def _cursors(self, regime: str) -> dict[str, int]:
        done = Counter()
        for (r, _, arm), n in self.done.items():
            if r == regime:
                done[arm] += n
        return {arm: done[arm] for arm in self.arms}

    def _block_arm(self, state: StepState, at: float) -> str:
        return self.arms[int((at - state.started) // self.block_seconds) % len(self.arms)]

    # -- steps ----------------------------------------------------------------
    def _advance(self, now: float) -> None:
        if self.state is not None:
            self.abandoned += len(self.state.in_flight)
        self.index += 1
        if self.index >= len(self.steps) or now >= self.run_deadline or self.issued_total >= self.max_requests:
            self.state = None
            return
        step = self.steps[self.index]
        regime = self.regime_of(step)
        deadline = min(self.run_deadline, now + step.max_seconds if step.max_seconds else math.inf)
        limit = min(self.max_requests - self.issued_total, step.max_requests or math.inf)
        if self.order_of(step) == ROTATE:
            self.state = StepState(step, now, deadline, max(0, limit), self._rotated(regime))
        else:
            self.state = StepState(step, now, deadline, max(0, limit), None, self._cursors(regime))
        if step.open_loop:
            self.state.next_arrival = now + self.rng.expovariate(step.rate)

    def _issuing(self, state: StepState, now: float) -> bool:
        return not state.exhausted and state.issued < state.limit and now < state.deadline

    def demand(self, generators: int = 1) -> int | None:
        """How many users the current step wants (its concurrency, or
        `generators` for an open loop: any number keeps the same arrival
        times), or None when the run is over. Moves to the next step when this one is finished: nothing
        more to send and nothing in flight, or `drain_seconds` past its deadline."""
        now = self.clock()
        state = self.state
        while state is not None:
            issuing = self._issuing(state, now)
            if state.step.open_loop and issuing and state.next_arrival >= state.deadline:
                issuing = False  # the next arrival would fall after the deadline
            drained = not issuing and not state.in_flight
            if not (drained or now >= state.deadline + self.drain_seconds):
                break
            self._advance(now)
            state = self.state
        if state is None:
            return None
        return max(1, generators) if state.step.open_loop else state.step.users

    def next_job(self) -> dict | None:
        """The next job, or None (nothing to send now). An open-loop job
        carries `delay_s`: how long to wait before sending it."""
        now = self.clock()
        state = self.state
        if state is None or not self._issuing(state, now):
            return None
        open_loop = state.step.open_loop
        if open_loop:
            at = state.next_arrival
            if at >= state.deadline:
                return None
        elif len(state.in_flight) >= state.step.users:
            return None
        if state.jobs is not None:
            try:
                row, arm = next(state.jobs)
            except StopIteration:
                state.exhausted = True
                return None
        else:
            arm = self._block_arm(state, at if open_loop else now)
            row = self.rows[state.cursors[arm] % len(self.rows)]
            state.cursors[arm] += 1
        delay = 0.0
        if open_loop:
            delay = max(0.0, at - now)
            state.next_arrival = at + self.rng.expovariate(state.step.rate)
        seq = self._next_seq
        self._next_seq += 1
        state.issued += 1
        state.in_flight.add(seq)
        self.issued_total += 1
        return {
            "seq": seq, "arm": arm, "regime": self.regime_of(state.step), "open_loop": open_loop, "delay_s": delay,
            "row": {k: row[k] for k in ("id", "task", "stratum", "messages", "max_tokens")},
        }

    def finished(self, seq: int) -> None:
        if self.state is not None:
            self.state.in_flight.discard(seq)

    @property
    def current(self) -> Step | None:
        return self.state.step if self.state else None
