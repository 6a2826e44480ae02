"""The worker-side glue around the engine, without gRPC: the prefill/decode role
split gives what one process gives, and the engine thread survives callers that
give up (cancelled RPCs) and steps that fail."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import pytest
import torch

from baton.engine.block_manager import BlockEvent, BlockRemoved, BlockStored
from baton.engine.config import EngineConfig
from baton.engine.engine_core import EngineCore
from baton.engine.sampling_params import SamplingParams
from baton.engine.sequence import ScheduledChunk, TokenLogprob
from baton.protos import common_pb2
from baton.services.decode.server import DecodeServicer
from baton.services.engine_loop import EngineLoop, SeqUpdate
from baton.services.prefill.server import prefill_params
from baton.services.worker import WorkerRPCs

pytestmark = pytest.mark.unit
VOCAB, EOS = 8, 2
T = TypeVar("T")


@dataclass
class Output:
    logits: torch.Tensor
    prompt_logits: dict = field(default_factory=dict)
    pooled: dict = field(default_factory=dict)


@dataclass
class EosLovingRunner:
    """Logits that always prefer EOS, then token 5; optionally slow or failing."""

    num_blocks: int = 64
    max_model_len: int = 256
    vocab_size: int = VOCAB
    generates: bool = True
    delay_s: float = 0.0
    fail: bool = False

    def execute(self, chunks: list[ScheduledChunk], on_layer_done=None, fed=None) -> Output:
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("injected step failure")
        rows = sum(c.samples for c in chunks)
        logits = torch.zeros(rows, VOCAB)
        logits[:, EOS], logits[:, 5] = 9.0, 5.0
        return Output(logits)


def make_core(runner: EosLovingRunner, keep: bool = False, async_scheduling: bool = False, max_num_seqs: int = 128) -> EngineCore:
    config = EngineConfig(block_size=4, num_blocks=runner.num_blocks, async_scheduling=async_scheduling,
                          max_num_seqs=max_num_seqs)
    return EngineCore(runner, config, [EOS], "fp", keep_finished_blocks=keep)


def run_to_end(core: EngineCore) -> None:
    while core.has_unfinished():
        core.step()


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("min_tokens", [0, 1, 3])
@pytest.mark.parametrize("resumed", [0, 1, 3], ids=lambda k: f"resumed{k}")
def test_prefill_then_decode_equals_one_process(min_tokens, async_scheduling, resumed):
    """Also for a request resumed after ``resumed`` of its tokens (as the gateway resumes one
    whose workers failed): the prefill worker computes them with the prompt, and the decode
    worker reserves and receives them."""
    params = SamplingParams(temperature=0, max_tokens=6, min_tokens=min_tokens)
    prompt = [1, 3, 4, 5, 6, 7]
    one = make_core(EosLovingRunner(), async_scheduling=async_scheduling)
    (whole,) = one.add_request("r", prompt, params)
    run_to_end(one)
    assert len(whole.output_token_ids) == min_tokens + 1  # EOS as soon as min_tokens allows
    if resumed >= len(whole.output_token_ids):
        return
    earlier = whole.output_token_ids[:resumed]

    prefill = make_core(EosLovingRunner(), keep=True)
    (first,) = prefill.add_request("r", prompt, prefill_params(params, resumed), earlier)
    prefill.step()
    prefill.release("r")
    decode = make_core(EosLovingRunner(), async_scheduling=async_scheduling)
    reserved = decode.reserve("r", prompt, params, earlier)
    assert len(reserved.block_table) == -(-(len(prompt) + resumed) // 4)
    seq = decode.activate("r", first.output_logprobs[resumed])
    run_to_end(decode)
    assert seq.output_token_ids == whole.output_token_ids
    assert seq.finish_reason == whole.finish_reason
    assert prefill.stats().used_blocks == decode.stats().used_blocks == 0


async def test_async_engine_loop_streams_each_token_once():
    """With a step in flight, every update carries only tokens read back from the device."""
    core = make_core(EosLovingRunner(), async_scheduling=True)
    updates: list[SeqUpdate] = []
    loop = EngineLoop(core, updates.extend)
    loop.start()
    try:
        params = SamplingParams(temperature=0, max_tokens=8, min_tokens=3)
        (seq,) = await loop.call(lambda: core.add_request("r", [1, 3, 4], params))
        for _ in range(200):
            if updates and updates[-1].finish_reason is not None:
                break
            await asyncio.sleep(0.01)
        assert [t.token_id for u in updates for t in u.new_tokens] == seq.output_token_ids == [5, 5, 5, EOS]
        assert [u.finish_reason for u in updates][-1] == "stop" and core.stats().used_blocks == 0
    finally:
        loop.stop()


async def test_each_first_token_says_how_long_its_sequence_queued_and_prefilled():
    """One sequence a step, 50 ms a step: the first runs at once, its first token a step later;
    the second waits in the queue for the first's three steps, then prefills in one. A request
    that arrived earlier than the engine took it (a worker's RPC) waited from its arrival."""
    core = make_core(EosLovingRunner(delay_s=0.05), max_num_seqs=1)
    updates: list[SeqUpdate] = []
    loop = EngineLoop(core, updates.extend)
    loop.start()
    try:
        params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        await loop.call(lambda: [core.add_request(rid, [1, 3, 4], params) for rid in ("a", "b")])
        await loop.call(lambda: core.add_request("c", [1, 3, 4], params, arrival_time=time.monotonic() - 1.0))
        for _ in range(200):
            if sum(u.finish_reason is not None for u in updates) == 3:
                break
            await asyncio.sleep(0.01)
        first = {u.seq_id: u for u in reversed(updates) if u.new_tokens}   # each one's earliest update with tokens
        assert first["a"].queued_seconds < 0.05 <= first["a"].prefill_seconds
        assert first["b"].queued_seconds >= 0.15 and first["b"].prefill_seconds >= 0.05
        assert first["c"].queued_seconds >= 1.0 + 0.15   # and its wait for b's three steps at least
    finally:
        loop.stop()


async def test_updates_a_decode_stream_fell_behind_on_go_out_as_one():
    """Updates queued while a stream was busy: one chunk with every token in order, the latest
    figures and finish, the phase times of the first token's update; one at a time, each alone."""
    tokens = [TokenLogprob(i, -0.1 * i) for i in (5, 6, 7)]
    prompt_lp = [TokenLogprob(3, -1.0)]
    queue: asyncio.Queue[SeqUpdate] = asyncio.Queue()
    for update in [SeqUpdate("r", [], None, 0, []),                           # a prompt chunk, no token yet
                   SeqUpdate("r", tokens[:1], None, 4, prompt_lp, queued_seconds=0.25, prefill_seconds=0.5),
                   SeqUpdate("r", tokens[1:2], None, 4, prompt_lp, queued_seconds=0.25, prefill_seconds=0.75),
                   SeqUpdate("r", tokens[2:], "length", 4, prompt_lp, queued_seconds=0.25, prefill_seconds=1.0)]:
        queue.put_nowait(update)
    (merged,) = [u async for u in DecodeServicer._updates("r", queue, None)]
    assert merged == SeqUpdate("r", tokens, "length", 4, prompt_lp, queued_seconds=0.25, prefill_seconds=0.5)
    stream = DecodeServicer._updates("r", queue, None)
    for update in [SeqUpdate("r", tokens[:1], None, 4, []), SeqUpdate("r", tokens[1:], "stop", 4, [])]:
        queue.put_nowait(update)
        assert await anext(stream) == update
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_a_stream_interval_holds_tokens_back_but_the_first_and_the_last():
    """``--stream-interval 3``: a Generate stream (its first token sent by prefill) sends its tokens
    three at a time and the rest with the finish; a PrefillAndGenerate stream sends its first token
    at once."""
    tokens = [TokenLogprob(i, -0.1) for i in range(5, 12)]
    queue: asyncio.Queue[SeqUpdate] = asyncio.Queue()
    stream = DecodeServicer._updates("r", queue, None, interval=3, sent=1)
    sent = []
    pending = asyncio.ensure_future(anext(stream))
    for i, token in enumerate(tokens):
        queue.put_nowait(SeqUpdate("r", [token], "length" if i == len(tokens) - 1 else None, 4, []))
        await asyncio.sleep(0.05)     # the stream takes the update: out at once, or held back
        assert pending.done() == (i in (2, 5, 6)), i
        if pending.done():
            sent.append(pending.result())
            pending = asyncio.ensure_future(anext(stream))
    with pytest.raises(StopAsyncIteration):
        await pending
    assert [u.new_tokens for u in sent] == [tokens[:3], tokens[3:6], tokens[6:]]
    assert [u.finish_reason for u in sent] == [None, None, "length"]

    local = DecodeServicer._updates("l", queue, None, interval=3, sent=0)
    for update in (SeqUpdate("l", [], None, 0, []),              # a prompt chunk: passed on, the caller skips it
                   SeqUpdate("l", tokens[:1], None, 4, [])):
        queue.put_nowait(update)
        assert await asyncio.wait_for(anext(local), 5.0) == update


async def test_a_commands_wait_for_the_engine_thread_is_measured():
    """A command queued while a 50 ms step runs waits for it: the worker's metrics time each wait."""
    from prometheus_client import CollectorRegistry

    from baton.services.worker_metrics import EngineMetrics

    metrics = EngineMetrics(CollectorRegistry())
    core = make_core(EosLovingRunner(delay_s=0.05))
    loop = EngineLoop(core, lambda updates: None, metrics=metrics)
    loop.start()
    try:
        await loop.call(lambda: core.add_request("r", [1, 3, 4], SamplingParams(max_tokens=50, ignore_eos=True)))
        for _ in range(3):   # each queued as the thread goes back to stepping
            await loop.call(core.stats)
    finally:
        loop.stop()
    sample = lambda suffix: metrics.registry.get_sample_value(f"baton_worker_engine_command_wait_seconds_{suffix}")  # noqa: E731
    assert sample("count") == 4 and sample("sum") >= 0.05


async def test_cancelled_caller_does_not_kill_the_engine_thread():
    core = make_core(EosLovingRunner(delay_s=0.3))
    updates: list[SeqUpdate] = []
    loop = EngineLoop(core, updates.extend)
    loop.start()
    try:
        core_params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        await loop.call(lambda: core.add_request("busy", [1, 3, 4], core_params))
        await asyncio.sleep(0.05)  # a slow step is running now
        reserve = asyncio.create_task(loop.call(lambda: core.reserve("gone", [1, 3, 4, 5], core_params)))
        await asyncio.sleep(0.05)
        reserve.cancel()  # the RPC went away while the command was queued
        with pytest.raises(asyncio.CancelledError):
            await reserve
        assert await asyncio.wait_for(loop.call(lambda: "alive"), timeout=5) == "alive"
        assert "gone" not in core.requests  # it never ran
    finally:
        loop.stop()


async def test_release_hands_a_finished_prefill_to_the_prefix_cache(caplog):
    """The prefill worker releases without waiting for the step: the blocks reach the prefix cache
    before the next step, and a release the engine has overtaken (it aborted the request) is a no-op."""
    core = make_core(EosLovingRunner(delay_s=0.05), keep=True)
    updates: list[SeqUpdate] = []
    loop = EngineLoop(core, updates.extend)
    loop.start()
    try:
        params = prefill_params(SamplingParams(temperature=0, max_tokens=4))
        await loop.call(lambda: core.add_request("done", [1, 3, 4, 5, 6, 7, 1, 3, 4], params))
        for _ in range(100):
            if any(u.seq_id == "done" and u.new_tokens for u in updates):
                break
            await asyncio.sleep(0.01)
        assert await loop.call(lambda: core.stats().used_blocks) == 3   # kept for the KV transfer
        loop.release("done")
        loop.abort("gone")
        loop.release("gone")
        stats = await loop.call(core.stats)
        assert "done" not in core.requests and stats.used_blocks == 0 and stats.cached_blocks == 2
        assert not [r for r in caplog.records if r.levelname == "ERROR"]
    finally:
        loop.stop()


async def test_failed_step_aborts_running_requests_but_not_reserved_ones():
    runner = EosLovingRunner()
    core = make_core(runner)
    updates: list[SeqUpdate] = []
    loop = EngineLoop(core, updates.extend)
    loop.start()
    try:
        params = SamplingParams(temperature=0, max_tokens=3)
        assert await loop.call(lambda: core.reserve("parked", [1, 3, 4, 5], params)) is not None
        runner.fail = True
        await loop.call(lambda: core.add_request("doomed", [1, 3, 4], params))
        for _ in range(100):
            if any(u.seq_id == "doomed" for u in updates):
                break
            await asyncio.sleep(0.02)
        assert [(u.seq_id, u.finish_reason) for u in updates] == [("doomed", "abort")]
        assert "parked" in core.requests and core.stats().used_blocks == 1  # KV may still be arriving there
        loop.abort("parked")
        assert await loop.call(lambda: core.stats().used_blocks) == 0
    finally:
        loop.stop()


async def test_reset_prefix_cache_runs_between_steps_and_publishes_the_removals_at_once():
    """``ResetPrefixCache`` on an idle engine loop (a reservation awaiting its KV is all it holds):
    the cached blocks nobody holds are freed, those the reservation shares are uncached but stay its
    own, and every removal reaches the index publisher without waiting for a step."""
    core = make_core(EosLovingRunner())
    events: list[BlockEvent] = []
    loop = EngineLoop(core, lambda updates: None, on_block_events=events.extend)
    loop.start()
    try:
        params = SamplingParams(temperature=0, max_tokens=3)
        shared, other = [1, 3, 4, 5, 6, 7, 1, 3, 4], [6, 6, 6, 6, 7, 7, 7, 7, 1]
        for rid, prompt in (("a", shared), ("b", other)):
            await loop.call(lambda rid=rid, prompt=prompt: core.add_request(rid, prompt, params))
        stored = await wait_for(lambda: [h for e in events if isinstance(e, BlockStored) for h in e.block_hashes], 4)
        parked = await loop.call(lambda: core.reserve("parked", shared + [5], params))
        table = list(parked.block_table)
        assert parked.num_cached_tokens == 8
        rpcs = WorkerRPCs()
        rpcs.engine = loop
        reply = await rpcs.ResetPrefixCache(common_pb2.ResetPrefixCacheRequest(), None)
        assert (reply.freed_blocks, reply.held_blocks) == (2, 2)
        removed = await wait_for(lambda: [h for e in events if isinstance(e, BlockRemoved) for h in e.block_hashes], 4)
        assert sorted(removed) == sorted(stored)
        stats = await loop.call(core.stats)
        assert (stats.cached_blocks, stats.used_blocks) == (0, len(table)) and parked.block_table == table
        assert all(core.block_manager.blocks[b].ref_count == 1 for b in table)
        loop.abort("parked")
        stats = await loop.call(core.stats)
        assert (stats.used_blocks, stats.cached_blocks, stats.free_blocks) == (0, 0, stats.total_blocks)
    finally:
        loop.stop()


async def wait_for(read: Callable[[], list[T]], count: int, timeout: float = 2.0) -> list[T]:
    """Poll ``read()`` until it has ``count`` items (the event loop delivers them from the engine thread)."""
    deadline = time.monotonic() + timeout
    while len(items := read()) < count:
        assert time.monotonic() < deadline, f"{len(items)} of {count} items after {timeout} s"
        await asyncio.sleep(0.01)
    return items


def test_decode_worker_without_its_transports_package_exits_with_the_reason(monkeypatch) -> None:
    import argparse
    from unittest import mock

    from baton.kvtransfer import base
    from baton.services.decode.__main__ import make_receiver

    monkeypatch.setitem(base._BUILTIN_MODULES, "ucx", "baton_missing_backend_package")
    monkeypatch.delitem(base._REGISTRY, "ucx", raising=False)
    args = argparse.Namespace(kv_transport="ucx", advertise_host=None, host="127.0.0.1", kv_port=0)
    with pytest.raises(SystemExit, match=r"decode worker: KV transport 'ucx' needs the 'baton_missing_backend_package'"):
        make_receiver(args, mock.Mock(), server=None)


def test_worker_metrics_read_the_engines_load_when_scraped() -> None:
    from prometheus_client import CollectorRegistry

    from baton.engine.engine_api import EngineStats
    from baton.services.worker_metrics import EngineMetrics, LoadCollector

    registry = CollectorRegistry()
    metrics = EngineMetrics(registry)
    stats = [EngineStats(running=2, waiting=1, total_blocks=10, free_blocks=3, used_blocks=4, cached_blocks=3,
                         spec_proposed_tokens=40, spec_accepted_tokens=9, prompt_tokens=300, generated_tokens=20,
                         prefix_queried_tokens=280, prefix_hit_tokens=64, preemptions=5)]
    registry.register(LoadCollector(lambda: stats[0]))
    metrics.record_step(0.002, 17)
    metrics.record_step(0.003, 1)
    get = registry.get_sample_value
    assert (get("baton_worker_requests", {"state": "running"}), get("baton_worker_requests", {"state": "waiting"})) == (2, 1)
    assert [get("baton_worker_kv_blocks", {"state": s}) for s in ("used", "cached", "free")] == [4, 3, 3]
    assert get("baton_worker_kv_usage_ratio") == 0.4
    assert [get("baton_worker_spec_decode_tokens_total", {"kind": k}) for k in ("proposed", "accepted")] == [40, 9]
    assert (get("baton_worker_engine_steps_total"), get("baton_worker_tokens_total")) == (2, 18)
    assert [get(f"baton_worker_{name}_total") for name in ("prompt_tokens", "generation_tokens", "prefix_cache_queries",
                                                           "prefix_cache_hits", "preemptions")] == [300, 20, 280, 64, 5]
    assert get("baton_worker_engine_step_seconds_sum") == pytest.approx(0.005)
    stats[0] = EngineStats(running=0, waiting=0, total_blocks=10, free_blocks=10, used_blocks=0, cached_blocks=0)
    assert get("baton_worker_kv_usage_ratio") == 0 and get("baton_worker_requests", {"state": "running"}) == 0


def test_the_stats_line_says_what_the_engine_did_since_the_last_one(caplog: pytest.LogCaptureFixture) -> None:
    from baton.engine.engine_api import EngineStats
    from baton.services.worker_metrics import log_stats, stats_line

    idle = EngineStats(running=0, waiting=0, total_blocks=200, free_blocks=200, used_blocks=0, cached_blocks=0,
                       prompt_tokens=1000, generated_tokens=500, prefix_queried_tokens=900, prefix_hit_tokens=100)
    busy = EngineStats(running=3, waiting=1, total_blocks=200, free_blocks=150, used_blocks=50, cached_blocks=0,
                       prompt_tokens=3000, generated_tokens=600, prefix_queried_tokens=1300, prefix_hit_tokens=400)
    assert stats_line(idle, busy, 4.0) == (
        "prompt throughput 500.0 tokens/s, generation throughput 25.0 tokens/s, running 3, waiting 1, "
        "KV cache usage 25.0%, prefix cache hit rate 75.0%")
    assert stats_line(idle, idle, 10.0) is None                      # idle throughout: no line
    assert stats_line(busy, busy, 10.0).endswith("prefix cache hit rate no lookups")   # running, nothing computed
    reads = itertools.chain([idle, busy, busy], itertools.repeat(dataclasses.replace(busy, running=0, waiting=0)))

    async def log_a_while() -> None:
        task = asyncio.create_task(log_stats(lambda: next(reads), "decode worker d0", every_s=0.01))
        await asyncio.sleep(0.2)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.INFO, logger="baton.services.worker_metrics"):
        asyncio.run(log_a_while())
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(": ", 1)[0] for line in lines] == ["decode worker d0"] * 2
    assert lines[0].endswith("prefix cache hit rate 75.0%") and "running 3" in lines[1]
