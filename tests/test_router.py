"""Routing decisions: prefix hits against load, decode by load then room, health."""

from __future__ import annotations

import random

import pytest

from baton.services.gateway.router import (
    LOAD_WEIGHT,
    PENALTY_S,
    Health,
    Load,
    choose_decode,
    choose_prefill,
    prefill_cost,
)

pytestmark = pytest.mark.unit


def shuffled(items: list[str]) -> list[str]:
    items = list(items)
    random.shuffle(items)
    return items


def test_longest_cached_prefix_wins_when_loads_are_similar() -> None:
    for _ in range(50):
        workers = [f"10.0.0.{i}:50051" for i in range(random.randint(2, 6))]
        blocks = random.randint(max(4, len(workers)), 200)       # room for a distinct hit length per worker
        hits = random.sample(range(blocks + 1), len(workers))
        cached = dict(zip(workers, hits))
        running = random.randint(0, 3)
        loads = {w: Load(running=running, free_blocks=random.randint(0, 100)) for w in workers}
        assert choose_prefill(shuffled(workers), cached, loads, blocks) == max(workers, key=cached.__getitem__)


def test_load_wins_over_a_small_hit() -> None:
    blocks = random.randint(10, 100)
    small_hit = random.randint(1, blocks // 2 - 1)
    cached = {"hot:1": small_hit, "idle:1": 0}
    loads = {"hot:1": Load(running=1), "idle:1": Load()}
    assert choose_prefill(["hot:1", "idle:1"], cached, loads, blocks) == "idle:1"
    # ... but a whole-prompt hit is worth one queued request.
    assert choose_prefill(["hot:1", "idle:1"], {"hot:1": blocks}, loads, blocks) == "hot:1"
    # The gateway's own in-flight count counts even before the next load poll.
    busy = {"hot:1": Load(in_flight=4), "idle:1": Load()}
    assert choose_prefill(["hot:1", "idle:1"], {"hot:1": blocks}, busy, blocks) == "idle:1"


def test_prefill_cost_formula() -> None:
    for _ in range(100):
        blocks = random.randint(0, 64)
        hit = random.randint(0, blocks)
        load = Load(running=random.randint(0, 5), waiting=random.randint(0, 5), in_flight=random.randint(0, 12))
        expected = (blocks - hit) / max(blocks, 1) + LOAD_WEIGHT * max(load.running + load.waiting, load.in_flight)
        assert prefill_cost(hit, blocks, load) == pytest.approx(expected)
    assert prefill_cost(999, 4, Load()) == 0.0                      # a stale over-long hit is capped


def test_ties_go_to_the_less_loaded_then_more_free_worker() -> None:
    loads = {"a:1": Load(free_blocks=5), "b:1": Load(free_blocks=50)}
    assert choose_prefill(["a:1", "b:1"], {}, loads, 8) == "b:1"
    assert choose_prefill([], {}, loads, 8) is None


def test_decode_balances_requests_then_prefers_room() -> None:
    for _ in range(50):
        workers = [f"d{i}:1" for i in range(random.randint(1, 6))]
        loads = {w: Load(free_blocks=random.randint(100, 1000), total_blocks=1000, running=random.randint(0, 9),
                         in_flight=random.randint(0, 9)) for w in workers}
        best = min(workers, key=lambda w: (loads[w].queued, -loads[w].free_blocks, w))
        assert choose_decode(shuffled(workers), {}, loads) == best
    tied = {"x:1": Load(free_blocks=10, running=1), "y:1": Load(free_blocks=20, running=1)}
    assert choose_decode(["x:1", "y:1"], {}, tied) == "y:1"
    assert choose_decode([], {}, tied) is None


def test_decode_counts_the_prompt_blocks_a_worker_holds_as_room() -> None:
    loads = {"hot:1": Load(free_blocks=40, total_blocks=100), "cold:1": Load(free_blocks=45, total_blocks=100)}
    assert choose_decode(["hot:1", "cold:1"], {}, loads) == "cold:1"
    assert choose_decode(["hot:1", "cold:1"], {"hot:1": 4}, loads) == "cold:1"   # 44 < 45
    assert choose_decode(["hot:1", "cold:1"], {"hot:1": 6}, loads) == "hot:1"    # 46 > 45
    # ... but it does not outweigh a request more on that worker.
    assert choose_decode(["hot:1", "cold:1"], {"hot:1": 6}, {**loads, "hot:1": Load(free_blocks=40, total_blocks=100, in_flight=1)}) == "cold:1"


def test_a_tight_decode_worker_comes_last() -> None:
    """Under a tenth of its pool free, a worker is chosen only when every worker is, by room."""
    loads = {"busy:1": Load(free_blocks=500, total_blocks=1000, running=12), "tight:1": Load(free_blocks=90, total_blocks=1000)}
    assert choose_decode(["busy:1", "tight:1"], {}, loads) == "busy:1"
    assert choose_decode(["busy:1", "tight:1"], {"tight:1": 20}, loads) == "tight:1"   # 110 blocks of room is not tight
    both = {**loads, "busy:1": Load(free_blocks=60, total_blocks=1000)}
    assert choose_decode(["busy:1", "tight:1"], {}, both) == "tight:1"


def test_health_skips_down_and_penalized_workers() -> None:
    health = Health()
    workers = ["a:1", "b:1", "c:1"]
    now = 1000.0
    assert health.healthy(workers, now) == workers
    health.mark_down("a:1")
    health.penalize("b:1", now)
    assert health.healthy(workers, now) == ["c:1"]
    health.mark_up("a:1")
    health.mark_up("b:1")                                           # a poll answer does not lift a penalty
    assert health.healthy(workers, now + PENALTY_S / 2) == ["a:1", "c:1"]
    assert health.healthy(workers, now + PENALTY_S) == workers
    health.mark_down("c:1")
    health.forget("c:1")
    assert health.is_healthy("c:1", now)
    # Routing over the healthy list only.
    health.penalize("a:1", now)
    loads = {w: Load(free_blocks=100 if w == "a:1" else 1) for w in workers}
    assert choose_decode(health.healthy(workers, now), {}, loads) != "a:1"
