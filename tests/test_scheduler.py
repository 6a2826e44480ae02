"""Scheduler phases on a real block manager, no model: budget, chunked prefill,
decode-first order, admission control, preemption, and the role hooks."""

from __future__ import annotations

import pytest

from baton.engine.block_manager import BlockManager
from baton.engine.config import EngineConfig
from baton.engine.sampling_params import SamplingParams
from baton.engine.scheduler import Scheduler
from baton.engine.sequence import SchedulerOutput, Sequence, SequenceStatus, TokenLogprob

pytestmark = pytest.mark.unit

BS = 4


def make(num_blocks: int = 32, budget: int = 16, max_seqs: int = 8, keep: bool = False, policy: str = "fcfs") -> Scheduler:
    config = EngineConfig(block_size=BS, max_num_batched_tokens=budget, max_num_seqs=max_seqs, scheduling_policy=policy)
    return Scheduler(config, BlockManager(num_blocks, BS), keep_finished_blocks=keep)


def make_seq(seq_id: str, prompt_len: int, max_tokens: int = 8, first: int = 1, priority: int = 0) -> Sequence:
    prompt = [first + i for i in range(prompt_len)]
    return Sequence(seq_id, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), priority=priority)


def advance(out: SchedulerOutput, token: int = 0) -> None:
    """The engine's bookkeeping after a forward pass (without the model)."""
    sampling = [c.seq for c in out.chunks if c.samples]
    for chunk in out.chunks:
        chunk.seq.num_computed_tokens += chunk.num_new_tokens
    for seq in sampling:
        seq.output_token_ids.append(token)


def summary(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(c.seq.seq_id, c.start, c.num_new_tokens) for c in out.chunks]


def test_chunked_prefill_splits_a_long_prompt() -> None:
    sched = make(budget=16)
    seq = make_seq("a", 50)
    sched.add(seq)
    starts = []
    for _ in range(4):
        out = sched.schedule()
        starts.append(summary(out))
        advance(out)
    assert starts == [[("a", 0, 16)], [("a", 16, 16)], [("a", 32, 16)], [("a", 48, 2)]]
    assert seq.output_token_ids == [0]                         # only the last chunk samples
    assert summary(sched.schedule()) == [("a", 50, 1)]


def test_budget_and_max_seqs_respected() -> None:
    sched = make(budget=20, max_seqs=3)
    for i in range(6):
        sched.add(make_seq(f"s{i}", 9))
    out = sched.schedule()
    assert out.num_tokens <= 20
    assert summary(out) == [("s0", 0, 9), ("s1", 0, 9), ("s2", 0, 2)]
    advance(out)
    out = sched.schedule()
    assert len(sched.running) == 3 and out.num_tokens <= 20
    assert summary(out) == [("s0", 9, 1), ("s1", 9, 1), ("s2", 2, 7)]


def test_decodes_are_scheduled_first() -> None:
    sched = make(budget=8)
    sched.add(make_seq("old", 3))
    advance(sched.schedule())
    sched.add(make_seq("long", 30))
    out = sched.schedule()
    assert summary(out) == [("old", 3, 1), ("long", 0, 7)]
    advance(out)
    sched.add(make_seq("new", 2))
    out = sched.schedule()
    assert summary(out) == [("old", 4, 1), ("long", 7, 7)]     # budget spent before admitting "new"


def test_a_prompts_last_token_alone_is_scheduled_with_the_prefills() -> None:
    """An earlier sequence recomputing only its prompt's last token (after a preemption, say)
    goes after the later one's decode, so the step's decodes lead and take the decode kernel."""
    sched = make(budget=16)
    early, late = make_seq("early", 9), make_seq("late", 2)
    sched.add(early)
    sched.add(late)
    advance(sched.schedule())
    early.output_token_ids.clear()
    early.num_computed_tokens = 8
    assert summary(sched.schedule()) == [("late", 2, 1), ("early", 8, 1)]


def test_admission_waits_for_blocks() -> None:
    sched = make(num_blocks=6, budget=64)
    a, b = make_seq("a", 16, max_tokens=4), make_seq("b", 12, max_tokens=4)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert summary(out) == [("a", 0, 16)]                      # b needs 3 blocks, 2 are left
    assert list(sched.waiting) == [b] and b.block_table == [] and b.status is SequenceStatus.WAITING
    advance(out)
    sched.finish(a, "length")
    out = sched.schedule()
    assert summary(out) == [("b", 0, 12)]
    assert sched.block_manager.num_used_blocks == 3


def test_preemption_of_most_recent_and_recompute() -> None:
    sched = make(num_blocks=4, budget=64)
    a, b = make_seq("a", 7, max_tokens=8), make_seq("b", 7, max_tokens=8, first=50)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert summary(out) == [("a", 0, 7), ("b", 0, 7)]
    advance(out)                                               # each holds 2 blocks, 8 slots
    out = sched.schedule()
    assert summary(out) == [("a", 7, 1), ("b", 7, 1)]
    advance(out)
    out = sched.schedule()                                     # both need a 3rd block; none free
    assert summary(out) == [("a", 8, 1)]
    assert out.preempted == [b] and list(sched.waiting) == [b] and sched.preemptions == 1
    assert b.num_computed_tokens == 0 and b.block_table == [] and b.status is SequenceStatus.WAITING
    assert b.output_token_ids == [0, 0]                        # kept: recomputed with the prompt
    advance(out)
    sched.finish(a, "length")
    out = sched.schedule()
    assert summary(out) == [("b", 0, 9)]                       # prompt + outputs so far
    assert out.chunks[0].samples


def test_priority_policy_admits_the_best_ranked_and_preempts_the_worst() -> None:
    """Lower priority first, then arrival: admission takes the best-ranked waiting sequence,
    nothing jumps it while it waits for blocks, and preemption takes the worst-ranked."""
    sched = make(num_blocks=8, budget=64, max_seqs=2, policy="priority")
    low, urgent, normal, late_urgent = (make_seq("low", 7, priority=5), make_seq("urgent", 7, first=20, priority=-1),
                                        make_seq("normal", 7, first=40), make_seq("late-urgent", 7, first=60, priority=-1))
    for seq in (low, urgent, normal, late_urgent):
        sched.add(seq)
    out = sched.schedule()                                     # max_seqs 2: the two urgent ones, by arrival
    assert summary(out) == [("urgent", 0, 7), ("late-urgent", 0, 7)]
    advance(out)
    sched.finish(urgent, "stop")
    out = sched.schedule()
    assert summary(out) == [("late-urgent", 7, 1), ("normal", 0, 7)]
    advance(out)
    sched.finish(late_urgent, "stop")
    big = make_seq("big", 20, first=80, priority=-2)            # needs 5 blocks; 6 are free
    sched.add(big)
    out = sched.schedule()
    assert summary(out) == [("normal", 7, 1), ("big", 0, 20)] and list(sched.waiting) == [low]
    advance(out)
    out = sched.schedule()                                     # the pool is full: normal (worst) makes room
    assert summary(out) == [("big", 20, 1)] and out.preempted == [normal]
    assert [s.seq_id for s in sched.running] == ["big"] and min(sched.waiting, key=sched._rank) is normal
    fcfs = make(num_blocks=8, budget=64, max_seqs=1)
    first, second = make_seq("first", 3, priority=0), make_seq("second", 3, first=20, priority=0)
    fcfs.add(first)
    fcfs.add(second)
    assert summary(fcfs.schedule()) == [("first", 0, 3)]
    with pytest.raises(ValueError, match="scheduling_policy"):
        EngineConfig(scheduling_policy="lifo")


def test_preempting_itself_when_alone_short() -> None:
    sched = make(num_blocks=3, budget=64)
    a = make_seq("a", 7, max_tokens=5)
    sched.add(a)
    advance(sched.schedule())
    other = make_seq("other", 3, max_tokens=1)
    assert sched.reserve(other)                                # a parked reservation takes the last block
    advance(sched.schedule())
    out = sched.schedule()                                     # a needs a 3rd block
    assert out.is_empty and out.preempted == [a] and list(sched.waiting) == [a]
    sched.abort("other")
    out = sched.schedule()
    assert summary(out) == [("a", 0, 9)]


def test_request_that_can_never_fit_is_rejected() -> None:
    sched = make(num_blocks=4)
    with pytest.raises(ValueError, match=r"needs up to 5 KV blocks \(12 prompt \+ 8 max_tokens .* only 4"):
        sched.add(make_seq("huge", 12, max_tokens=8))
    with pytest.raises(ValueError, match="already scheduled"):
        seq = make_seq("x", 2)
        sched.add(seq)
        sched.add(seq)


def test_reserve_activate_release() -> None:
    sched = make(num_blocks=4, budget=64, keep=True)
    seq = make_seq("d", 9, max_tokens=4)
    assert sched.reserve(seq)
    assert len(seq.block_table) == 3 and seq.num_computed_tokens == 0
    assert sched.schedule().is_empty and not sched.has_unfinished()
    assert not sched.reserve(make_seq("no-room", 8, max_tokens=1))
    sched.activate("d", TokenLogprob(token_id=42, logprob=-1.0))
    assert seq.num_computed_tokens == 9 and seq.output_token_ids == [42]
    assert summary(sched.schedule()) == [("d", 9, 1)]
    sched.finish(seq, "stop")
    assert sched.block_manager.num_used_blocks == 3            # kept for the KV transfer
    sched.release("d")
    assert sched.block_manager.num_used_blocks == 0
    with pytest.raises(KeyError):
        sched.release("d")
    with pytest.raises(KeyError):
        sched.activate("d", TokenLogprob(token_id=1, logprob=0.0))


def test_abort_everywhere() -> None:
    sched = make(num_blocks=8, budget=4)
    running, waiting = make_seq("r", 6), make_seq("w", 4)
    sched.add(running)
    sched.add(waiting)
    sched.schedule()
    assert sched.abort("w") is waiting and waiting.finish_reason == "abort"
    assert sched.abort("r") is running and running.block_table == []
    assert sched.abort("r") is None
    assert sched.block_manager.num_used_blocks == 0 and not sched.has_unfinished()
