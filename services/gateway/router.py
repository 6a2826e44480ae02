"""Routing decisions: which prefill and which decode worker serve a request.

Pure logic, no I/O: the gRPC backend feeds it worker loads (polled ``GetLoad``
plus the gateway's own in-flight count), prefix-cache hits (from the Redis
index) and health marks, and asks for a choice. Workers are named by their
gRPC address.

Prefill: the cost of sending a prompt of ``P`` full blocks to worker ``w`` is::

    cost(w) = (P - cached(w)) / max(P, 1)  +  LOAD_WEIGHT * queued(w)

the fraction of the prompt ``w`` must still compute (0 when it holds the whole
prefix, 1 when it holds none) plus a penalty per request queued on it
(``queued = max(running + waiting, in_flight)``: the polled figure may be stale,
the gateway's own in-flight count never is). With ``LOAD_WEIGHT = 0.5``, a full
hit is worth two queued requests: a worker holding the whole prompt wins over
an idle cold one even with one request ahead, while a small hit (under half the
prompt) never outweighs one extra queued request. Ties go to the less loaded
worker, then the one with more free blocks, then the lower address.

Decode: the fewest queued requests, then the most room for the prompt (free KV
blocks plus the prompt's leading blocks the worker already holds: it reuses
those rather than taking new ones, and they need not be sent), among the workers
whose room is at least ``TIGHT_FRACTION`` of their pool; only when every worker
is that tight, the most room. Balancing requests keeps each decode batch, and so
each worker's time per token, even; room first would send a burst of requests
to whichever worker last reported a few more free blocks.

Health: a worker is skipped while it is *down* (its ``GetLoad`` failed or never
answered; cleared by the next answer) or *penalized* (an RPC to it failed with
UNAVAILABLE / DEADLINE_EXCEEDED; lasts ``PENALTY_S`` whatever the polls say).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

LOAD_WEIGHT = 0.5
PENALTY_S = 5.0
TIGHT_FRACTION = 0.1


@dataclass(frozen=True)
class Load:
    """What the router knows of one worker's load."""

    running: int = 0
    waiting: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    in_flight: int = 0          # requests this gateway has on the worker now
    used_blocks: int = 0        # held by requests (neither free nor only cached)

    @property
    def queued(self) -> int:
        return max(self.running + self.waiting, self.in_flight)


def prefill_cost(cached_blocks: int, num_prompt_blocks: int, load: Load) -> float:
    """The routing cost documented above; lower is better."""
    cached = min(max(cached_blocks, 0), num_prompt_blocks)
    uncached_fraction = (num_prompt_blocks - cached) / max(num_prompt_blocks, 1)
    return uncached_fraction + LOAD_WEIGHT * load.queued


def choose_prefill(
    candidates: Sequence[str],
    cached_blocks: Mapping[str, int],
    loads: Mapping[str, Load],
    num_prompt_blocks: int,
) -> str | None:
    """The candidate with the lowest ``prefill_cost``; None when there is none."""
    def key(worker: str) -> tuple[float, int, int, str]:
        load = loads.get(worker, Load())
        cost = prefill_cost(cached_blocks.get(worker, 0), num_prompt_blocks, load)
        return (cost, load.queued, -load.free_blocks, worker)

    return min(candidates, key=key, default=None)


def choose_decode(candidates: Sequence[str], cached_blocks: Mapping[str, int], loads: Mapping[str, Load]) -> str | None:
    """The candidate with the fewest queued requests, then the most room (free blocks plus
    cached prompt blocks), unless its room is under ``TIGHT_FRACTION`` of its pool: such
    workers come last, by room."""
    def key(worker: str) -> tuple[bool, int, int, str]:
        load = loads.get(worker, Load())
        room = load.free_blocks + cached_blocks.get(worker, 0)
        tight = room < TIGHT_FRACTION * load.total_blocks
        return (tight, 0 if tight else load.queued, -room, worker)

    return min(candidates, key=key, default=None)


@dataclass
class Health:
    """Which workers routing must skip, and until when. Times are monotonic seconds."""

    penalty_s: float = PENALTY_S
    _down: set[str] = field(default_factory=set)
    _penalized_until: dict[str, float] = field(default_factory=dict)

    def mark_down(self, worker: str) -> None:
        """Unreachable (its load poll failed): skipped until ``mark_up``."""
        self._down.add(worker)

    def mark_up(self, worker: str) -> None:
        """Its load poll answered. A pending penalty still applies."""
        self._down.discard(worker)

    def penalize(self, worker: str, now: float) -> None:
        """A request to it failed: skipped for ``penalty_s`` seconds from ``now``."""
        self._penalized_until[worker] = now + self.penalty_s

    def is_healthy(self, worker: str, now: float) -> bool:
        return worker not in self._down and now >= self._penalized_until.get(worker, now)

    def healthy(self, workers: Iterable[str], now: float) -> list[str]:
        return [w for w in workers if self.is_healthy(w, now)]

    def forget(self, worker: str) -> None:
        """The worker left the pool."""
        self._down.discard(worker)
        self._penalized_until.pop(worker, None)
