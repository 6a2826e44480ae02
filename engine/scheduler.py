"""The scheduler: which tokens of which sequences the next forward pass computes.

One scheduler serves both worker roles with a unified token budget (vLLM v1
style): a step is a list of chunks, each ``seq.token_ids[num_computed:
num_computed + n]``, and prefill, chunked prefill and decode are the same thing
at different ``n``.

Queues and states:

- ``waiting`` (FCFS deque, ``WAITING``): new requests, and preempted ones at the
  front (their blocks were given back; they recompute prompt + outputs so far).
- ``running`` (``RUNNING``, in arrival order): hold blocks; prefilling or decoding.
- ``reserved`` (decode role, ``WAITING``): hold blocks for a prompt whose KV
  arrives from a prefill worker; never scheduled until ``activate``.
- ``kept`` (prefill role, ``FINISHED``): finished but keep their blocks while the
  KV is still being sent, until ``release``.

Each ``schedule()``: running decodes first (one generated token each), then continuing
prefills (a prompt's last token alone among them), then — when nothing was preempted —
waiting requests FCFS, within ``max_num_batched_tokens`` and ``max_num_seqs``. A waiting
request is admitted only when the pool has blocks for its chunk. A running sequence that
cannot get a block preempts the most recently arrived running sequence (possibly itself).

With the "priority" policy (vLLM's), a sequence's rank is ``(priority, arrival)``, lower
first, in place of its arrival alone: the best-ranked waiting sequence is admitted next
(nothing jumps it while it waits for blocks), and the worst-ranked running one is preempted.
Under "fcfs" every priority is 0, so both orders are the arrival order.

With speculative decoding (``EngineConfig.speculative``), a decode that proposes tokens
(``engine/speculative.py``) computes them after its own, as far as the step's budget and
the pool allow without preempting anyone for them, unless the running batch has reached
``disable_by_batch_size``.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections import deque
from dataclasses import dataclass

from baton.engine.block_manager import BlockManager
from baton.engine.config import EngineConfig, SpeculativeConfig
from baton.engine.sequence import ScheduledChunk, SchedulerOutput, Sequence, SequenceStatus, TokenLogprob
from baton.engine.speculative import propose


@dataclass
class _Budget:
    tokens: int   # tokens still schedulable this step


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, keep_finished_blocks: bool = False):
        self.config = config
        self.block_manager = block_manager
        self.keep_finished_blocks = keep_finished_blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.reserved: dict[str, Sequence] = {}
        self.kept: dict[str, Sequence] = {}
        self._order: dict[str, int] = {}          # seq_id -> arrival rank
        self._counter = itertools.count()
        self.preemptions = 0                      # sequences preempted since the start

    # -- admission ------------------------------------------------------------
    def check_fits(self, seq: Sequence) -> None:
        """Raise ValueError when ``seq`` could never get its blocks, even alone."""
        max_tokens = seq.num_prompt_tokens + seq.params.max_tokens
        needed = self.block_manager.blocks_needed(max_tokens)
        total = self.block_manager.num_total_blocks
        if needed > total:
            raise ValueError(
                f"request {seq.seq_id} needs up to {needed} KV blocks ({seq.num_prompt_tokens} prompt + "
                f"{seq.params.max_tokens} max_tokens at {self.block_manager.block_size} tokens per block) "
                f"but the pool has only {total}"
            )

    def add(self, seq: Sequence) -> None:
        if seq.seq_id in self._order:
            raise ValueError(f"sequence {seq.seq_id} is already scheduled")
        self.check_fits(seq)
        self._order[seq.seq_id] = next(self._counter)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        """Work for ``schedule()``: waiting or running sequences (not reserved ones)."""
        return bool(self.waiting or self.running)

    # -- one step ---------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = _Budget(self.config.max_num_batched_tokens)
        self._schedule_running(out, budget)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: _Budget) -> None:
        decodes, prefills = [], []
        for seq in self.running:
            todo = seq.num_tokens - seq.num_computed_tokens
            # A decode computes a generated token; a prompt's last token alone is still a prefill
            # chunk (the model runner gives the decode kernel only the leading decodes).
            if todo == 1 and seq.num_computed_tokens >= seq.num_prompt_tokens:
                decodes.append((seq, todo, True))
            elif todo >= 1:
                prefills.append((seq, todo, False))
        spec = self.config.speculative
        if spec is not None and not spec.drafts_at(len(self.running)):
            spec = None
        for seq, todo, decode in decodes + prefills:
            if budget.tokens == 0:
                return
            if seq.status is not SequenceStatus.RUNNING:
                continue                              # preempted earlier in this step
            draft = self._draft(seq, spec, budget) if decode and spec is not None else []
            num_new = min(todo, budget.tokens) + len(draft)
            if self._make_room(seq, num_new, out, budget):
                out.chunks.append(ScheduledChunk(seq, num_new, draft))
                budget.tokens -= num_new

    def _draft(self, seq: Sequence, spec: SpeculativeConfig, budget: _Budget) -> list[int]:
        """A decode's speculative proposal, cut to the step's budget; [] if it has none or the
        pool has no free slots for it."""
        draft = propose(seq, spec)[: budget.tokens - 1]
        if draft and not self.block_manager.append_slots(seq, 1 + len(draft)):
            return []
        return draft

    def _rank(self, seq: Sequence) -> tuple[int, int]:
        return seq.priority, self._order[seq.seq_id]

    def _make_room(self, seq: Sequence, num_new: int, out: SchedulerOutput, budget: _Budget) -> bool:
        """Get blocks for ``num_new`` more tokens of ``seq``, preempting the worst-ranked
        (latest arrived) running sequences as needed. False if ``seq`` itself went."""
        while not self.block_manager.append_slots(seq, num_new):
            victim = self.running[-1]
            self._preempt(victim, out, budget)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput, budget: _Budget) -> None:
        for chunk in out.chunks:
            if chunk.seq is seq:
                out.chunks.remove(chunk)
                budget.tokens += chunk.num_new_tokens
                break
        self.running.remove(seq)
        self.block_manager.free(seq)
        self.preemptions += 1
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def _schedule_waiting(self, out: SchedulerOutput, budget: _Budget) -> None:
        admitted = False
        while self.waiting and budget.tokens > 0 and len(self.running) < self.config.max_num_seqs:
            # The deque is in arrival order (the preempted back at its front): FCFS takes its head.
            seq = self.waiting[0] if self.config.scheduling_policy == "fcfs" else min(self.waiting, key=self._rank)
            cached = self.block_manager.cached_prefix_tokens(seq)
            num_new = min(seq.num_tokens - cached, budget.tokens)
            if not self.block_manager.allocate(seq, num_new):
                break                                 # nothing jumps the best-ranked
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            if seq.scheduled_time is None:
                seq.scheduled_time = time.monotonic()   # the end of its wait in the queue (vLLM's queue time)
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, num_new))
            budget.tokens -= num_new
            admitted = True
        if admitted:
            self.running.sort(key=self._rank)

    # -- leaving --------------------------------------------------------------
    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark a running sequence finished (or a waiting one: with async scheduling, a
        token read back after its sequence was preempted can end it); free its blocks
        unless they are kept for a transfer (prefill role)."""
        (self.running if seq.status is SequenceStatus.RUNNING else self.waiting).remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._order.pop(seq.seq_id, None)
        if self.keep_finished_blocks:
            self.kept[seq.seq_id] = seq
        else:
            self.block_manager.free(seq)

    def abort(self, seq_id: str) -> Sequence | None:
        """Drop a sequence wherever it is and free its blocks. None if unknown."""
        seq = self.reserved.pop(seq_id, None) or self.kept.pop(seq_id, None)
        if seq is None:
            seq = next((s for s in [*self.running, *self.waiting] if s.seq_id == seq_id), None)
            if seq is None:
                return None
            if seq in self.running:
                self.running.remove(seq)
            else:
                self.waiting.remove(seq)
        self.block_manager.free(seq)
        self._order.pop(seq.seq_id, None)
        if not seq.is_finished:
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = "abort"
        return seq

    def release(self, seq_id: str) -> None:
        """Free the blocks a finished sequence kept for its KV transfer."""
        seq = self.kept.pop(seq_id, None)
        if seq is None:
            raise KeyError(f"no finished sequence {seq_id} holds blocks")
        self.block_manager.free(seq)

    # -- decode role ------------------------------------------------------------
    def reserve(self, seq: Sequence) -> bool:
        """Allocate blocks for the tokens of ``seq`` (its prompt, and a resumed sequence's
        outputs so far), whose KV will arrive from elsewhere, reusing the cached prefix the
        pool holds (``seq.num_cached_tokens``: that part need not arrive); park it. False
        (nothing held) when the pool is short now."""
        if seq.seq_id in self._order or seq.seq_id in self.reserved:
            raise ValueError(f"sequence {seq.seq_id} is already scheduled")
        self.check_fits(seq)
        cached = self.block_manager.cached_prefix_tokens(seq)
        if not self.block_manager.allocate(seq, seq.num_tokens - cached):
            return False
        seq.status = SequenceStatus.WAITING
        self.reserved[seq.seq_id] = seq
        return True

    def activate(self, seq_id: str, first_token: TokenLogprob) -> Sequence:
        """The reserved tokens' KV has landed: mark it computed, append the first token
        and start decoding. The caller applies stop checks to that token."""
        seq = self.reserved.pop(seq_id, None)
        if seq is None:
            raise KeyError(f"no reserved sequence {seq_id}")
        seq.num_computed_tokens = seq.num_tokens
        seq.output_token_ids.append(first_token.token_id)
        seq.output_logprobs.append(first_token)
        seq.status = SequenceStatus.RUNNING
        self._order[seq.seq_id] = next(self._counter)
        bisect.insort(self.running, seq, key=self._rank)
        self.block_manager.cache_full_blocks(seq, seq.num_computed_tokens)
        return seq
