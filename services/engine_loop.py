"""Runs an ``EngineCore`` on its own thread and lets asyncio code talk to it.

The core is not thread-safe, so every mutation (add, abort, reserve, activate,
release, a LoRA adapter's load or unload, a prefix-cache reset) is queued as a command
and executed on the engine thread between steps. After each step the thread hands the
sequences that changed to the event loop, where ``on_outputs`` fans them out to the
waiting RPCs, and the block events to ``on_block_events``; with nothing to step, the
block events the commands queued (an unload's, a reset's) are handed over at once.

    commands ──> [engine thread: run commands → step() → publish] ──> on_outputs (event loop)
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from baton.engine.block_manager import BlockEvent
from baton.engine.engine_api import EngineStats, LayerHook
from baton.engine.engine_core import EngineCore
from baton.engine.sequence import Sequence, TokenLogprob
from baton.services.worker_metrics import EngineMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class SeqUpdate:
    """What a step did to one sequence, copied on the engine thread."""

    seq_id: str
    new_tokens: list[TokenLogprob]
    finish_reason: str | None
    num_cached_tokens: int
    prompt_logprobs: list[TokenLogprob]
    embedding: list[float] | None = None     # an embedding request's, once computed
    # Its wait in this worker's queue, and the time from its first step to this update: on the
    # update with its first token, its prefill (vLLM's queue and prefill times). 0 before a step ran it.
    queued_seconds: float = 0.0
    prefill_seconds: float = 0.0


def _tokens_since(seq: Sequence, start: int) -> list[TokenLogprob]:
    return [
        seq.output_logprobs[i] if i < len(seq.output_logprobs) else TokenLogprob(seq.output_token_ids[i], 0.0)
        for i in range(start, len(seq.output_token_ids))
    ]


class EngineLoop:
    def __init__(
        self,
        core: EngineCore,
        on_outputs: Callable[[list[SeqUpdate]], None],
        on_layer_done: LayerHook | None = None,
        on_block_events: Callable[[list[BlockEvent]], None] | None = None,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self.core = core
        self._metrics = metrics
        self._on_outputs = on_outputs
        self._on_layer_done = on_layer_done
        self._on_block_events = on_block_events
        self._commands: list[tuple[Callable[[], Any], Future | None, float]] = []   # with when each was queued
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.stats: EngineStats = core.stats()
        self._sent: dict[str, int] = {}  # seq_id -> output tokens already handed out

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the engine thread before the next step; return its result.
        If the caller is cancelled before ``fn`` runs, it never runs; if after, its
        result is dropped, so a command that takes resources needs undoing (``abort``)."""
        future: Future = Future()
        self._enqueue(fn, future)
        return await asyncio.wrap_future(future)

    def abort(self, request_id: str) -> None:
        """Abort a request and free its blocks before the next step. Not awaited, so
        it runs even when its caller is being cancelled (cleanup paths use it)."""
        self._enqueue(lambda: self._abort(request_id), None)

    def _abort(self, request_id: str) -> None:
        for seq in self.core.abort(request_id):
            self._sent.pop(seq.seq_id, None)

    def release(self, request_id: str) -> None:
        """Prefill role: hand a finished request's blocks to the prefix cache before the
        next step. Not awaited: the caller need not wait for the step running now."""
        self._enqueue(lambda: self._release(request_id), None)

    def _release(self, request_id: str) -> None:
        if request_id in self.core.requests:  # else the engine aborted it, which freed its blocks
            self.core.release(request_id)

    def _enqueue(self, fn: Callable[[], object], future: Future | None) -> None:
        with self._lock:
            self._commands.append((fn, future, time.perf_counter()))
        self._wake.set()

    def _run_commands(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, []
        for fn, future, queued in commands:
            if future is not None and not future.set_running_or_notify_cancel():
                continue  # the caller gave up before it ran
            if self._metrics is not None:
                self._metrics.command_wait_seconds.observe(time.perf_counter() - queued)
            try:
                result = fn()
            except Exception as exc:  # handed to the caller, which turns it into an RPC status
                if future is None:
                    log.exception("engine command failed")
                else:
                    future.set_exception(exc)
                continue
            if future is not None:
                future.set_result(result)

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._iterate()
            except Exception:  # the thread must outlive any one bad iteration
                log.exception("engine loop iteration failed")

    def _iterate(self) -> None:
        self._wake.clear()
        self._run_commands()
        if not self.core.has_unfinished():
            self.stats = self.core.stats()
            self._publish([], self.core.drain_block_events())
            self._wake.wait(timeout=0.5)
            return
        started = time.perf_counter()
        try:
            changed = self.core.step(on_layer_done=self._on_layer_done)
        except Exception:
            log.exception("engine step failed; aborting the requests it ran")
            changed = self.core.abort_active()
        else:
            if self._metrics is not None:
                self._metrics.record_step(time.perf_counter() - started, self.core.last_step_tokens)
        if not self.core.last_step_tokens:
            # Only parked work (blocks held for transfers): wait for a command rather than spin.
            self._wake.wait(timeout=0.005)
        self.stats = self.core.stats()
        now = time.monotonic()
        self._publish([self._update(seq, now) for seq in changed], self.core.drain_block_events())

    def _publish(self, updates: list[SeqUpdate], events: list[BlockEvent]) -> None:
        """Hand a step's updates and block events to the event loop."""
        if self._loop is None:
            return
        if updates:
            self._loop.call_soon_threadsafe(self._on_outputs, updates)
        if events and self._on_block_events is not None:
            self._loop.call_soon_threadsafe(self._on_block_events, events)

    def mark_sent(self, seq_id: str, num_tokens: int) -> None:
        """Engine thread only: ``num_tokens`` outputs of ``seq_id`` were delivered elsewhere."""
        self._sent[seq_id] = num_tokens

    def _update(self, seq: Sequence, now: float) -> SeqUpdate:
        start = self._sent.get(seq.seq_id, 0)
        if seq.is_finished:
            self._sent.pop(seq.seq_id, None)
        else:
            self._sent[seq.seq_id] = len(seq.output_token_ids)
        scheduled = seq.scheduled_time
        return SeqUpdate(
            seq_id=seq.seq_id,
            new_tokens=_tokens_since(seq, start),
            finish_reason=seq.finish_reason if seq.is_finished else None,
            num_cached_tokens=seq.num_cached_tokens,
            prompt_logprobs=list(seq.prompt_logprobs) if start == 0 else [],
            embedding=seq.embedding,
            queued_seconds=0.0 if scheduled is None else scheduled - seq.arrival_time,
            prefill_seconds=0.0 if scheduled is None else now - scheduled,
        )
