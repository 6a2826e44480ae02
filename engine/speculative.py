"""Speculative decoding by n-gram prompt lookup (vLLM's "ngram" method). Pure Python.

Each step, a decoding sequence whose text ends with an n-gram it has written before (in the
prompt or its output; the longest n in ``[prompt_lookup_min, prompt_lookup_max]``, its latest
earlier occurrence) proposes the ``k`` tokens that followed it there. The step computes the
sequence's last token and the proposal together, one logits row per position, and the sampler
draws a token from each row as it would have in a step of its own (same seeded noise, same
output index). Proposed token ``j`` is accepted while it equals what row ``j - 1`` drew; the
output gains every drawn token up to the first that differs from the proposal (that one too),
so it is exactly what decoding one token a step gives, in fewer steps.

That holds only where a row's processing does not depend on the tokens before it in the same
step: ``can_speculate`` leaves out sequences with penalties, bad words, a grammar or
``min_tokens`` still to reach.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

from baton.engine.config import SpeculativeConfig
from baton.engine.sequence import Sequence


@dataclass
class SpeculationStats:
    """What the drafts verified so far proposed and what of it was accepted."""

    proposed_tokens: int = 0
    accepted_tokens: int = 0

    def record(self, proposed: int, accepted: int) -> None:
        self.proposed_tokens += proposed
        self.accepted_tokens += accepted


class NgramIndex:
    """Where each n-gram of one sequence's tokens last occurred with a token after it. The
    tokens are only ever appended to: ``extend`` takes the new ones, so a step costs what it
    adds, not the whole context."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self._last: dict[tuple[int, ...], int] = {}   # n-gram -> its latest start with a token after it

    def extend(self, new_tokens: Seq[int]) -> None:
        tokens = self.tokens
        for token in new_tokens:
            end = len(tokens)                            # the n-grams ``token`` follows
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self._last[tuple(tokens[end - n:end])] = end - n
            tokens.append(token)

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the longest n-gram
        the tokens end with; [] if they end with none written before."""
        tokens = self.tokens
        for n in range(min(self.max_n, len(tokens)), self.min_n - 1, -1):
            start = self._last.get(tuple(tokens[len(tokens) - n:]))
            if start is not None:
                return tokens[start + n:start + n + k]
        return []


def can_speculate(seq: Sequence) -> bool:
    """Whether every row of a proposal can be sampled as its own step would sample it."""
    p = seq.params
    return (
        seq.grammar is None
        and p.repetition_penalty == 1.0
        and p.presence_penalty == 0.0
        and p.frequency_penalty == 0.0
        and not p.bad_words_token_ids
        and len(seq.output_token_ids) >= p.min_tokens
        and seq.num_pending_tokens == 0
    )


def propose(seq: Sequence, config: SpeculativeConfig) -> list[int]:
    """The tokens ``seq`` proposes to compute after its last one this step ([] for none): no more
    than would take its output past ``max_tokens``."""
    k = min(config.num_speculative_tokens, seq.params.max_tokens - len(seq.output_token_ids) - 1)
    if k <= 0 or not can_speculate(seq):
        return []
    index = seq.ngram_index
    if index is None:
        index = seq.ngram_index = NgramIndex(config.prompt_lookup_min, config.prompt_lookup_max)
        index.extend(seq.prompt_token_ids)
    index.extend(seq.output_token_ids[len(index.tokens) - seq.num_prompt_tokens:])
    return index.propose(k)
