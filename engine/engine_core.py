"""The engine loop shared by both worker roles: schedule, run the model, sample,
append, stop, cache, free.

A request enters with ``add_request`` (``n`` sequences ``{request_id}-{i}`` when
``n > 1``, else one sequence named ``request_id``). Children ``1..n-1`` wait
(``RequestTable``) until child 0's prompt is computed, so they reuse its full prompt
blocks through the prefix cache. Each ``step()`` runs one forward pass over the
scheduler's chunks and returns the sequences that gained a token or finished; what
its results do to each sequence (stops, prompt log-probs, embeddings) lives in ``step_outputs``.

With async scheduling (``EngineConfig.async_scheduling``, on by default on
CUDA) one step stays in flight: its sampled tokens are left on the device, the
next step is scheduled and launched reading them there, and the host reads them
back only then (vLLM v1 does the same). A sequence that the read-back finishes
has had one more row computed in vain; nothing else changes, outputs included.
With speculative decoding, a step is read back at once where the step after it
needs its tokens: where it verified drafts (how many were accepted sets the next
positions) or where the next step may propose (``disable_by_batch_size`` not reached).

Structured output: a sequence whose params carry a grammar gets a ``Grammar``
(``engine/structured_output.py``), advanced over each token appended, however it came
(sampled here, the prefill worker's first token, a resumed request's earlier ones); the
sampler masks what the grammar does not allow next, and a terminated grammar ends the
sequence ("stop").

LoRA: a request may name one of the runner's adapters (``lora``); its sequences run under it
and their blocks hash under it (``hashing.block_extra``), so the prefix cache never hands
a block computed under one adapter to another, or to the base model. A name the runner
has not loaded is refused with ``UnknownLoRA``. Adapters load and unload between steps
(``load_lora``, ``unload_lora``; a worker runs them on its engine thread). An unload is refused
(``LoRAInUse``) while an unfinished sequence runs under the adapter, so none ever computes a token
without it; it uncaches every block computed under it, since other weights may later load under
its name, and their blocks hash the same.

Cache salt (vLLM's ``cache_salt``): a request's salt goes into its blocks' hashes too, so it reuses
only blocks computed for requests with the same salt (and an unsalted one only unsalted blocks);
the ``n`` samples of one request share it, and with it their prompt's blocks.

Prefix-cache reset (vLLM's ``reset_prefix_cache``; a worker runs it on its engine thread between
steps): every cached block is uncached, so the next requests start cold. Blocks no sequence holds
become free; those unfinished (or kept) sequences hold stay theirs with their KV, and are never
found by a later request (``BlockManager.reset_prefix_cache``).

Roles: a decode worker ``reserve``s blocks for a prompt whose KV comes from a
prefill worker and ``activate``s it with the first token once the KV has landed;
a prefill worker builds the core with ``keep_finished_blocks=True`` and
``release``s a finished sequence's blocks once its KV has been sent.
"""

from __future__ import annotations

import math
import random
import time
from typing import TYPE_CHECKING

import torch

from baton.engine.attention import to_device
from baton.engine.block_manager import BlockEvent, BlockManager, PrefixCacheReset
from baton.engine.config import EngineConfig
from baton.engine.engine_api import (
    EngineStats, LayerHook, LoRAConflict, LoRAInUse, ModelOutputLike, ModelRunnerLike, UnknownLoRA,
)
from baton.engine.request_checks import RequestLimits, check_request
from baton.engine.request_table import RequestTable
from baton.engine.sampler import Sampler
from baton.engine.sampling_params import SamplingParams
from baton.engine.scheduler import Scheduler
from baton.engine.sequence import ScheduledChunk, Sequence, SequenceStatus, TokenLogprob
from baton.engine.speculative import SpeculationStats
from baton.engine.step_outputs import Launched, add_pooled, embedding, record_prompt_logprobs, stop_reason
from baton.engine.structured_output import StructuredOutputs

if TYPE_CHECKING:
    from baton.engine.lora_loader import LoRAAdapter
    from baton.engine.structured_output import Grammar


class EngineCore:
    def __init__(
        self,
        runner: ModelRunnerLike,
        config: EngineConfig,
        eos_token_ids: list[int],
        hash_extra: str,
        keep_finished_blocks: bool = False,
        structured_outputs: StructuredOutputs | None = None,
    ):
        self.runner = runner
        self.structured_outputs = structured_outputs   # None: requests with a grammar are refused
        self.config = config
        self.eos_token_ids = set(eos_token_ids)
        self.max_model_len = runner.max_model_len
        self.vocab_size = runner.vocab_size
        max_logprobs = self.vocab_size if config.max_logprobs == -1 else config.max_logprobs
        self.limits = RequestLimits(self.vocab_size, self.max_model_len, max_logprobs, config.scheduling_policy == "priority")
        self.block_manager = BlockManager(runner.num_blocks, config.block_size, hash_extra, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager, keep_finished_blocks)
        self.sampler = Sampler(eos_token_ids)
        self.table = RequestTable()
        self.last_step_tokens = 0                          # tokens the last step computed (0: nothing to run)
        self.spec_stats = SpeculationStats()
        self.prompt_tokens = self.generated_tokens = 0   # computed and generated since the start
        spec = config.speculative
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else config.device.startswith("cuda") and (spec is None or spec.disable_by_batch_size is not None))
        self._in_flight: Launched | None = None            # a launched step whose tokens the host has not read
        self._seeds = random.Random(config.seed)           # draws unseeded requests' sampling seeds

    # -- requests ---------------------------------------------------------------
    def _new_sequences(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, output_token_ids: list[int],
        priority: int, lora: str | None = None, cache_salt: str | None = None, arrival_time: float | None = None,
    ) -> list[Sequence]:
        if request_id in self.table:
            raise ValueError(f"request {request_id} already exists")
        if lora is not None and lora not in self.runner.lora_names:  # a wrong model name first, as vLLM's 404
            loaded = ", ".join(sorted(self.runner.lora_names)) or "none"
            raise UnknownLoRA(f"request {request_id}: LoRA adapter {lora!r} is not loaded here (loaded: {loaded})")
        params = params.with_vocabulary(self.vocab_size)
        check_request(request_id, prompt_token_ids, params, output_token_ids, priority, cache_salt, self.limits)
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        grammars = [self._grammar(request_id, params, output_token_ids) for _ in range(params.n)]
        now = time.monotonic() if arrival_time is None else arrival_time
        ids = [request_id] if params.n == 1 else [f"{request_id}-{i}" for i in range(params.n)]
        taken = self.table.taken(ids)
        if taken:
            raise ValueError(f"request {request_id}: sequence ids {taken} are already in use")
        # A resumed sequence's earlier tokens were sampled elsewhere: their log-probs are not known here.
        resumed = [TokenLogprob(t, math.nan) for t in output_token_ids]
        return [
            Sequence(seq_id, list(prompt_token_ids), params, seed=seed + i, arrival_time=now,
                     output_token_ids=list(output_token_ids), output_logprobs=list(resumed), grammar=grammar,
                     priority=priority, lora=lora, cache_salt=cache_salt)
            for i, (seq_id, grammar) in enumerate(zip(ids, grammars))
        ]

    def _grammar(self, request_id: str, params: SamplingParams, output_token_ids: list[int]) -> Grammar | None:
        """The request's structured output, past ``output_token_ids`` (None without one)."""
        if params.structured_output is None:
            return None
        if self.structured_outputs is None:
            raise ValueError(f"request {request_id}: this engine has no tokenizer for structured output")
        try:
            return self.structured_outputs.grammar(params.structured_output, output_token_ids)
        except ValueError as exc:
            raise ValueError(f"request {request_id}: {exc}") from exc

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, output_token_ids: list[int] | None = None,
        priority: int = 0, lora: str | None = None, cache_salt: str | None = None, arrival_time: float | None = None,
    ) -> list[Sequence]:
        """Queue a request (under LoRA adapter ``lora``, None: the base model; its blocks' hashes
        salted with ``cache_salt``, None: unsalted; arrived at ``time.monotonic()`` reading
        ``arrival_time``, None: now, where its wait in the queue starts); raises ValueError
        for one that can never be served (``UnknownLoRA`` for an adapter not loaded). ``output_token_ids``
        resumes a sequence that generated them elsewhere: they count as its output (penalties,
        ``min_tokens`` / ``max_tokens``, the sampling seed's index), so it goes on exactly as it would
        have there; their KV is computed with the prompt's. ``priority`` (lower first) needs the
        "priority" scheduling policy."""
        self._check_generates(request_id)
        seqs = self._new_sequences(request_id, prompt_token_ids, params, output_token_ids or [], priority, lora,
                                   cache_salt, arrival_time)
        self.scheduler.add(seqs[0])
        self.table.add(request_id, seqs, held_back=True)
        return seqs

    @property
    def requests(self) -> dict[str, list[Sequence]]:
        """The requests not yet forgotten: request_id -> its sequences."""
        return self.table.requests

    def abort(self, request_id: str) -> list[Sequence]:
        """Stop every sequence of a request and free its blocks; returns them."""
        seqs = self.table.forget(request_id)
        for seq in seqs:
            self.scheduler.abort(seq.seq_id)
            if not seq.is_finished:                   # a child never handed to the scheduler
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
        return seqs

    def abort_active(self) -> list[Sequence]:
        """Abort every request with a waiting or running sequence (after a failed
        step); reserved and kept requests, whose KV is in transit, stay."""
        self._in_flight = None
        seqs = [*self.scheduler.running, *self.scheduler.waiting]
        active = {self.table.request_of(s.seq_id) for s in seqs} - {None}
        return [seq for request_id in active for seq in self.abort(request_id)]

    def finish(self, seq: Sequence, reason: str) -> None:
        """End an unfinished sequence from outside the step (the offline ``LLM``'s stop strings)."""
        self.scheduler.finish(seq, reason)
        self._forget_if_done(seq)

    def has_unfinished(self) -> bool:
        # A sequence of the step in flight is running (or waiting, if preempted) until its token is read.
        return self.scheduler.has_unfinished() or bool(self.table.pending)

    # -- roles --------------------------------------------------------------------
    def _check_generates(self, request_id: str) -> None:
        if not self.runner.generates:
            raise ValueError(f"request {request_id}: this model is a base model's checkpoint, with no LM head: "
                             "it serves embeddings only")

    def add_embedding_request(
        self, request_id: str, prompt_token_ids: list[int], priority: int = 0, cache_salt: str | None = None,
    ) -> Sequence:
        """Queue an embedding request: its prompt is computed (chunked, and under LAST pooling
        over the prefix cache like any other, salted with ``cache_salt``) and its final hidden states,
        pooled as the runner's ``pooler`` says, become ``seq.embedding``; it then finishes ("stop")
        with no output."""
        (seq,) = self._new_sequences(request_id, prompt_token_ids, SamplingParams(max_tokens=1), [], priority,
                                     cache_salt=cache_salt)
        seq.pooling = self.runner.pooler
        self.scheduler.add(seq)
        self.table.add(request_id, [seq])
        return seq

    def reserve(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, output_token_ids: list[int] | None = None,
        priority: int = 0, lora: str | None = None, cache_salt: str | None = None,
    ) -> Sequence | None:
        """Decode role: hold blocks for a prompt (and a resumed request's ``output_token_ids``,
        and ``priority``, ``lora`` and ``cache_salt`` as in ``add_request``) computed elsewhere. None when the pool is short now; ValueError
        when the request can never be served."""
        if params.n != 1:
            raise ValueError(f"request {request_id}: reserve takes one sequence (n=1), got n={params.n}")
        self._check_generates(request_id)
        seq = self._new_sequences(request_id, prompt_token_ids, params, output_token_ids or [], priority, lora,
                                  cache_salt)[0]
        if not self.scheduler.reserve(seq):
            return None
        self.table.add(request_id, [seq])
        return seq

    def activate(self, request_id: str, first_token: TokenLogprob) -> Sequence:
        """Decode role: the reserved tokens' KV has landed; start decoding after ``first_token``
        (the token the prefill worker sampled after them)."""
        seq = self.scheduler.activate(request_id, first_token)
        self._check_stop(seq)
        return seq

    def release(self, request_id: str) -> None:
        """Prefill role: free the blocks a finished request kept for its KV transfer."""
        if request_id not in self.table:
            raise KeyError(f"no request {request_id}")
        for seq in self.table.forget(request_id):
            self.scheduler.release(seq.seq_id)

    # -- LoRA adapters (between steps) ----------------------------------------------
    def load_lora(self, name: str, path: str) -> bool:
        """Read, check and add the adapter in ``path`` under ``name`` (``add_lora``)."""
        return self.add_lora(self.runner.read_lora(name, path))

    def add_lora(self, adapter: LoRAAdapter) -> bool:
        """Serve an adapter read by ``runner.read_lora`` from the next step on. False, changing
        nothing, where the same adapter (by ``digest``) is loaded under its name already;
        ``LoRAConflict`` where other weights are; ValueError where ``max_loras`` are loaded."""
        loaded = self.runner.adapters.get(adapter.name)
        if loaded is not None:
            if loaded.digest == adapter.digest:
                return False
            raise LoRAConflict(f"LoRA adapter {adapter.name!r} is loaded here with other weights ({loaded.path}, "
                               f"digest {loaded.digest}; {adapter.path} has digest {adapter.digest})")
        self.runner.add_lora(adapter)
        return True

    def unload_lora(self, name: str) -> LoRAAdapter:
        """Drop adapter ``name`` and uncache every block computed under it; returns it.
        ``UnknownLoRA`` where it is not loaded, ``LoRAInUse`` while unfinished sequences run under it."""
        if name not in self.runner.lora_names:
            loaded = ", ".join(sorted(self.runner.lora_names)) or "none"
            raise UnknownLoRA(f"LoRA adapter {name!r} is not loaded here (loaded: {loaded})")
        users = self.table.unfinished_under(name)
        if users:
            raise LoRAInUse(f"LoRA adapter {name!r} is in use by {users} unfinished sequence(s); unload it once they "
                            "finish")
        adapter = self.runner.remove_lora(name)
        self.block_manager.forget_lora(name)
        return adapter

    # -- the prefix cache (between steps) --------------------------------------------
    def reset_prefix_cache(self) -> PrefixCacheReset:
        """Uncache every block: none is reused by a later request (see the module docs)."""
        return self.block_manager.reset_prefix_cache()

    # -- the step -----------------------------------------------------------------
    def step(self, on_layer_done: LayerHook | None = None) -> list[Sequence]:
        """One forward pass. Returns the sequences that gained a token or finished.
        ``on_layer_done(layer, chunks)`` runs as soon as each layer's KV for the
        step's ``chunks`` is in the cache (the prefill worker pushes it from there).

        With async scheduling (and no hook), a step's sampled tokens stay on the
        device: the next step is scheduled and launched first, reading them there,
        and only then does the host wait for them. So the host's scheduling and
        bookkeeping overlap the device's work, and a step returns the sequences that
        the step before it changed."""
        out = self.scheduler.schedule()
        self.last_step_tokens = out.num_tokens
        previous, self._in_flight = self._in_flight, None
        result = None
        if not out.is_empty:
            hook = None if on_layer_done is None else (lambda layer: on_layer_done(layer, out.chunks))
            fed = previous.feed(out.chunks) if previous is not None else None
            result = self.runner.execute(out.chunks, hook, fed)
        changed = self._read_back(previous) if previous is not None else []
        launched = self._sample(out.chunks, result) if result is not None else None
        if result is not None:
            changed += self._pool(out.chunks)
        if launched is not None:
            if self.async_scheduling and on_layer_done is None and self._next_step_may_wait(launched):
                self._in_flight = launched
            else:
                changed += self._read_back(launched)
        for child in self.table.release_children():
            self.scheduler.add(child)
        return changed

    def _next_step_may_wait(self, launched: Launched) -> bool:
        """Whether the next step can run before ``launched``'s tokens are read: not when it
        verified drafts or the next step may propose some (both need the tokens on the host)."""
        spec = self.config.speculative
        if spec is None:
            return True
        return not any(launched.drafts) and not spec.drafts_at(len(self.scheduler.running))

    def _sample(self, chunks: list[ScheduledChunk], result: ModelOutputLike) -> Launched | None:
        """Launch the sampling of a computed step and advance its chunks; the tokens
        stay on the device. A sequence the last read-back finished takes nothing (the
        step computed its row in vain)."""
        sampled: list[ScheduledChunk] = []    # read before num_computed_tokens moves
        rows: list[int] = []                  # the logits rows sampled
        row_seqs: list[Sequence] = []
        offsets: list[int] = []               # each row's output index past the sequence's last
        first = 0
        for chunk in (c for c in chunks if c.samples):
            width = 1 + len(chunk.draft)
            if not chunk.seq.is_finished:
                sampled.append(chunk)
                rows += range(first, first + width)
                row_seqs += [chunk.seq] * width
                offsets += range(width)
            first += width
        logits = result.logits
        if len(rows) < logits.shape[0]:
            logits = logits.index_select(0, to_device(torch.tensor(rows, dtype=torch.int64), logits.device))
        tokens = self.sampler.sample(logits, row_seqs, offsets) if sampled else None
        for chunk in chunks:
            seq = chunk.seq
            if seq.is_finished:
                continue
            if result.prompt_logits:
                record_prompt_logprobs(chunk, result.prompt_logits.get(seq.seq_id))
            if seq.seq_id in result.pooled:
                add_pooled(chunk, result.pooled[seq.seq_id])
            self.prompt_tokens += max(0, min(chunk.start + chunk.num_own_tokens, seq.num_prompt_tokens) - chunk.start)
            seq.num_computed_tokens += chunk.num_own_tokens     # a draft's part counts once accepted
            self.block_manager.cache_full_blocks(seq, seq.num_computed_tokens)
        for chunk in sampled:
            chunk.seq.num_pending_tokens = 1
        if tokens is None:
            return None
        return Launched([c.seq for c in sampled], [c.draft for c in sampled], tokens)

    def _pool(self, chunks: list[ScheduledChunk]) -> list[Sequence]:
        """Finish the embedding requests whose prompts this step completed."""
        done = [c.seq for c in chunks if c.seq.pooling is not None and not c.seq.is_finished
                and c.seq.num_computed_tokens == c.seq.num_prompt_tokens]
        for seq in done:
            seq.embedding, seq.pooled = embedding(seq), None
            self.scheduler.finish(seq, "stop")
            self._forget_if_done(seq)
        return done

    def _read_back(self, launched: Launched) -> list[Sequence]:
        """Wait for a launched step's tokens, append them and apply the stop checks.
        A sequence aborted meanwhile takes nothing. A drafted sequence appends its rows'
        tokens while each equals its draft's next token, and the first that does not; the
        KV of the draft tokens so accepted counts as computed."""
        changed = []
        tokens = iter(launched.tokens.to_host())
        for seq, draft in zip(launched.seqs, launched.drafts):
            rows = [next(tokens) for _ in range(1 + len(draft))]
            seq.num_pending_tokens = 0
            if seq.is_finished:
                continue
            changed.append(seq)
            accepted = 0
            for token, proposed in zip(rows, [*draft, None]):
                seq.output_token_ids.append(token.token_id)
                seq.output_logprobs.append(token)
                self.generated_tokens += 1
                self._check_stop(seq)
                if seq.is_finished or token.token_id != proposed:
                    break
                accepted += 1
            if draft:
                self.spec_stats.record(len(draft), accepted)
            if accepted and not seq.is_finished:
                seq.num_computed_tokens += accepted
                self.block_manager.cache_full_blocks(seq, seq.num_computed_tokens)
        return changed

    def _check_stop(self, seq: Sequence) -> None:
        """After a token is appended: finish the sequence if it ends it (``stop_reason``)."""
        reason = stop_reason(seq, self.eos_token_ids, self.max_model_len)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self._forget_if_done(seq)

    def _forget_if_done(self, seq: Sequence) -> None:
        """Drop the request's bookkeeping once all its sequences are finished
        (a prefill-role core keeps it until ``release``)."""
        if not self.scheduler.keep_finished_blocks:
            self.table.forget_if_done(seq)

    # -- observability --------------------------------------------------------------
    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting) + self.table.num_held_back(),
            total_blocks=bm.num_total_blocks,
            free_blocks=bm.num_free_blocks,
            used_blocks=bm.num_used_blocks,
            cached_blocks=bm.num_cached_blocks,
            spec_proposed_tokens=self.spec_stats.proposed_tokens,
            spec_accepted_tokens=self.spec_stats.accepted_tokens,
            prompt_tokens=self.prompt_tokens,
            generated_tokens=self.generated_tokens,
            prefix_queried_tokens=bm.prefix_queried_tokens,
            prefix_hit_tokens=bm.prefix_hit_tokens,
            preemptions=self.scheduler.preemptions,
        )

    def drain_block_events(self) -> list[BlockEvent]:
        return self.block_manager.drain_events()
