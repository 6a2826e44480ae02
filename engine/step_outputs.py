"""What a step's results do to one sequence, apart from the engine's bookkeeping: why a
token just appended ends it, the prompt log-probs a chunk's logits give, an embedding's
parts added up, and the step whose sampled tokens are still on the device.

Pure functions of a sequence and its chunk (no scheduler, no block manager): the engine
core (``engine_core``) calls them and then finishes, frees or forgets what they say.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass

import torch

from baton.engine.model_runner import FedTokens
from baton.engine.sampler import SampledTokens, prompt_logprobs
from baton.engine.sequence import ScheduledChunk, Sequence

log = logging.getLogger(__name__)


@dataclass
class Launched:
    """A step whose sampled tokens are still on the device: one row per sequence, or with a
    speculative draft one per draft token and one more (``engine/speculative.py``)."""

    seqs: list[Sequence]      # the sequences it sampled, in row order
    drafts: list[list[int]]   # each one's draft
    tokens: SampledTokens

    def feed(self, chunks: list[ScheduledChunk]) -> FedTokens | None:
        """Where the next step's ``chunks`` find their input tokens on the device: a chunk
        of a sequence this step sampled computes that (pending) token. Only async scheduling
        feeds, and it never drafts: rows are sequences."""
        index = {seq: i for i, seq in enumerate(self.seqs)}
        rows = [index.get(chunk.seq, -1) for chunk in chunks]
        return FedTokens(self.tokens.token_ids, rows) if any(r >= 0 for r in rows) else None


def stop_reason(seq: Sequence, eos_token_ids: Collection[int], max_model_len: int) -> str | None:
    """After a token is appended: advance the sequence's grammar over it, then say why the token
    ends the sequence ("stop", "length", or "abort" for a token its grammar refuses), if it does."""
    params, outputs = seq.params, seq.output_token_ids
    last, count = outputs[-1], len(outputs)
    if seq.grammar is not None and not seq.grammar.accept(last):
        # Sampled under the grammar's mask, so only a foreign first token gets here.
        log.error("sequence %s: token %d is not allowed by its grammar; aborting it", seq.seq_id, last)
        return "abort"
    if seq.grammar is not None and seq.grammar.is_terminated():
        return "stop"
    if count > params.min_tokens and ((last in eos_token_ids and not params.ignore_eos) or last in params.stop_token_ids):
        return "stop"
    if count >= params.max_tokens or seq.num_tokens >= max_model_len:
        return "length"
    return None


def record_prompt_logprobs(chunk: ScheduledChunk, logits: torch.Tensor | None) -> None:
    """Append prompt log-probs for the chunk's rows (``logits``) that predict prompt tokens not
    yet recorded (``seq.prompt_logprobs[i]`` is for prompt token ``i + 1``)."""
    seq, k = chunk.seq, chunk.seq.params.prompt_logprobs
    if logits is None or k is None:
        return
    first = len(seq.prompt_logprobs) - chunk.start      # rows before this were recorded earlier
    stop = min(chunk.num_new_tokens, seq.num_prompt_tokens - 1 - chunk.start)
    if first < 0 or stop <= first:
        return
    targets = seq.prompt_token_ids[chunk.start + first + 1 : chunk.start + stop + 1]
    seq.prompt_logprobs.extend(prompt_logprobs(logits[first:stop], targets, k))


def add_pooled(chunk: ScheduledChunk, part: torch.Tensor) -> None:
    """Add a chunk's part of its sequence's embedding (``model_runner.pooled_part``) to the parts
    so far, before the chunk advances the sequence. A chunk that starts the prompt starts them
    over: a preempted sequence computes its prompt again."""
    seq = chunk.seq
    seq.pooled = part if chunk.start == 0 or seq.pooled is None else seq.pooled + part


def embedding(seq: Sequence) -> list[float]:
    """A pooling sequence's embedding from its chunks' parts added up: MEAN divides their sum by
    the prompt's length; normalized (L2) when its pooler says so."""
    pooled = seq.pooled.float()
    if seq.pooling.pooling_type == "MEAN":
        pooled = pooled / seq.num_prompt_tokens
    if seq.pooling.normalize:
        pooled = torch.nn.functional.normalize(pooled, dim=0)
    return pooled.tolist()
