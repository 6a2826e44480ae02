"""Turn logits into tokens.

Per sequence, in this order (OpenAI / Hugging Face semantics):

0. ``logit_bias`` (OpenAI) is added to the logits of its tokens;
1. stop tokens (EOS unless ``ignore_eos``, and ``stop_token_ids``) are masked
   while fewer than ``min_tokens`` tokens have been generated;
2. repetition penalty (HF): over prompt + output tokens, a positive logit is
   divided by the penalty and a negative one multiplied;
3. presence / frequency penalties (OpenAI): ``logit -= presence * (count > 0)
   + frequency * count`` over output tokens;
4. ``allowed_token_ids``: every other token is masked; ``bad_words_token_ids``: a bad
   word's last token is masked where the sequence's tokens end with the rest of it;
   structured output: tokens the sequence's grammar does not allow next are masked;
5. greedy (``temperature == 0``): argmax. Otherwise divide by the temperature
   (at least ``MIN_TEMPERATURE``),
   keep ``top_k``, then the ``top_p`` nucleus, then tokens with
   ``prob >= min_p * max prob``, and draw by exponential race: argmax of
   ``probs / E`` with ``E ~ Exp(1)`` i.i.d. per vocab entry.

Seeding: the noise for output index ``t`` of a sequence is the counter-based
hash of ``kernels.sampling`` keyed by ``sample_seed(seq.seed, t)`` = xxh3-64 of
``(seed mod 2**64, t)`` packed as two unsigned 64-bit little-endian ints, masked
to 63 bits. The noise is the same on CPU and GPU, so a token depends only on
(logits, params, seed, t): not on the batch around it, the process or the device
that samples it (up to float rounding of the logits themselves).

Reported log-probabilities are those of the model's raw distribution
(``log_softmax`` of the unprocessed logits), with the top-``k`` alternatives when
``params.logprobs`` is ``k``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch
import xxhash

from baton.engine.attention import to_device
from baton.engine.sequence import Sequence, TokenLogprob
from baton.engine.structured_output import mask_logits
from baton.kernels import ops

_SEED_PAIR = struct.Struct("<QQ")
MIN_TEMPERATURE = 1e-5   # smaller positive temperatures are clamped to this (avoids inf / inf)


def sample_seed(seed: int, t: int) -> int:
    """The noise seed for output index ``t`` of a sequence seeded ``seed``."""
    return xxhash.xxh3_64_intdigest(_SEED_PAIR.pack(seed % 2**64, t)) & (2**63 - 1)


@dataclass
class SampledTokens:
    """One sampler call's results, still on the device: the chosen token ids
    (``token_ids``, which a next step may read as its inputs without a round trip
    through the host), their log-probs, and each row's top-``ks[i]`` alternatives.
    The copies to the host start at once; ``to_host`` waits only for them."""

    token_ids: torch.Tensor                       # [rows] int64
    ks: list[int]
    _host: list[torch.Tensor]                     # token ids, log-probs[, top ids, top log-probs] on the host
    _copied: torch.cuda.Event | None

    @classmethod
    def start(cls, token_ids: torch.Tensor, ks: list[int], *results: torch.Tensor) -> SampledTokens:
        if not token_ids.is_cuda:
            return cls(token_ids, ks, [token_ids, *results], None)
        host = [t.to("cpu", non_blocking=True) for t in (token_ids, *results)]
        copied = torch.cuda.Event()
        copied.record()
        return cls(token_ids, ks, host, copied)

    def to_host(self) -> list[TokenLogprob]:
        if self._copied is not None:
            self._copied.synchronize()
        ids, chosen, *top = (t.tolist() for t in self._host)
        if not top:
            return [TokenLogprob(token_id=token, logprob=lp) for token, lp in zip(ids, chosen)]
        top_ids, top_vals = top
        result = []
        for i, (token, lp) in enumerate(zip(ids, chosen)):
            k = self.ks[i]
            top_k = list(zip(top_ids[i][:k], top_vals[i][:k])) if k else []
            result.append(TokenLogprob(token_id=token, logprob=lp, top=top_k))
        return result


def _to_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, ks: Seq[int], lse: torch.Tensor,
                 chosen_logits: torch.Tensor | None = None) -> SampledTokens:
    """Log-probs (``logit - lse``, no ``[N, vocab]`` log-softmax written) of the chosen tokens,
    whose float32 logits the caller may pass, and each row's top-``ks[i]`` alternatives; ``lse``
    holds each row's log-sum-exp. ``logits`` may be in the model's dtype: only what is read
    from them is widened."""
    if chosen_logits is None:
        chosen_logits = logits.gather(1, token_ids.unsqueeze(1)).squeeze(1).float()
    max_k = min(max(ks, default=0), logits.shape[1])
    ks = [min(k, max_k) for k in ks]
    if max_k == 0:
        return SampledTokens.start(token_ids, ks, chosen_logits - lse)
    values, indices = logits.topk(max_k, dim=1)
    return SampledTokens.start(token_ids, ks, chosen_logits - lse, indices, values.float() - lse.unsqueeze(1))


def prompt_logprobs(prompt_logits: torch.Tensor, next_token_ids: Seq[int], k: int) -> list[TokenLogprob]:
    """Log-probs of the actual next tokens under ``prompt_logits`` (row ``j``
    predicts ``next_token_ids[j]``), with the top-``k`` alternatives and each actual token's
    rank: the number of logits at least as large as its own."""
    if prompt_logits.dim() != 2 or prompt_logits.shape[0] != len(next_token_ids):
        raise ValueError(f"prompt_logits {tuple(prompt_logits.shape)} do not match {len(next_token_ids)} next tokens")
    targets = torch.tensor(list(next_token_ids), dtype=torch.long, device=prompt_logits.device)
    logits = prompt_logits.float()
    chosen = logits.gather(1, targets.unsqueeze(1))
    ranks = (logits >= chosen).sum(1).tolist()
    out = _to_logprobs(logits, targets, [k] * len(next_token_ids), ops.max_logsumexp(logits)[2], chosen.squeeze(1)).to_host()
    for token, rank in zip(out, ranks):
        token.rank = rank
    return out


class Sampler:
    """Samples one token per row of logits for the matching sequences."""

    def __init__(self, eos_token_ids: Seq[int] = ()):
        self.eos_token_ids = list(eos_token_ids)

    def __call__(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> list[TokenLogprob]:
        return self.sample(logits, seqs).to_host()

    def sample(self, logits: torch.Tensor, seqs: Seq[Sequence], offsets: Seq[int] | None = None) -> SampledTokens:
        """Launch the sampling of one token per row (``logits`` in any float dtype, read as
        float32); the results stay on the device. Row ``i`` draws the token at output index
        ``len(seqs[i].output_token_ids) + offsets[i]`` (a speculative draft's rows: 0, 1, ...)."""
        if logits.dim() != 2 or logits.shape[0] != len(seqs):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(seqs)} sequences")
        ks = [s.params.logprobs or 0 for s in seqs]
        best, argmax, lse = ops.max_logsumexp(logits)   # one read of the logits for both
        if all(s.params.greedy and not self._needs_processing(s) for s in seqs):
            return _to_logprobs(logits, argmax, ks, lse, chosen_logits=best)
        processed = logits.to(torch.float32, copy=True)
        for i, seq in enumerate(seqs):
            if self._needs_processing(seq):
                self._process(processed[i], seq)
        mask_logits(processed, [seq.grammar for seq in seqs])
        return _to_logprobs(logits, self._sample(processed, seqs, offsets or [0] * len(seqs)), ks, lse)

    @staticmethod
    def _needs_processing(seq: Sequence) -> bool:
        p = seq.params
        return (
            bool(p.logit_bias)
            or p.repetition_penalty != 1.0
            or p.presence_penalty != 0.0
            or p.frequency_penalty != 0.0
            or len(seq.output_token_ids) < p.min_tokens
            or p.allowed_token_ids is not None
            or bool(p.bad_words_token_ids)
            or seq.grammar is not None
        )

    def _process(self, row: torch.Tensor, seq: Sequence) -> None:
        """Logit bias, stop-token masking, penalties, then the allowed and bad tokens' masks, in
        place on one row of logits (the grammar's mask is applied to all rows at once, after).
        The masks come after the penalties, which keep what they scale finite."""
        p, device = seq.params, row.device
        if p.logit_bias:
            biased = [(t, b) for t, b in p.logit_bias.items() if t < row.shape[0]]
            if biased:
                ids, values = zip(*biased)
                row[to_device(torch.tensor(ids, dtype=torch.long), device)] += to_device(torch.tensor(values), device)
        if len(seq.output_token_ids) < p.min_tokens:
            stops = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)
            stops = [t for t in stops if 0 <= t < row.shape[0]]
            row[to_device(torch.tensor(stops, dtype=torch.long), device)] = float("-inf")
        if p.repetition_penalty != 1.0:
            seen = to_device(torch.tensor(seq.token_ids, dtype=torch.long), device).unique()
            values = row[seen]
            penalized = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
            # An extreme penalty stays finite: -inf is for what may not be sampled at all (a grammar's mask).
            finite = torch.finfo(row.dtype)
            row[seen] = penalized.clamp(finite.min, finite.max)
        if (p.presence_penalty or p.frequency_penalty) and seq.output_token_ids:
            outputs = to_device(torch.tensor(seq.output_token_ids, dtype=torch.long), device)
            counts = torch.bincount(outputs, minlength=row.shape[0])[: row.shape[0]].to(row.dtype)
            row -= p.presence_penalty * (counts > 0).to(row.dtype) + p.frequency_penalty * counts
        if p.allowed_token_ids is not None:
            allowed = to_device(torch.tensor(p.allowed_token_ids, dtype=torch.long), device)
            kept = row[allowed]
            row.fill_(float("-inf"))
            row[allowed] = kept
        banned = banned_tokens(seq.token_ids, p.bad_words_token_ids)
        if banned:
            row[to_device(torch.tensor(banned, dtype=torch.long), device)] = float("-inf")

    @staticmethod
    def _sample(processed: torch.Tensor, seqs: Seq[Sequence], offsets: Seq[int]) -> torch.Tensor:
        """Greedy rows take the argmax; the others race seeded exponential noise
        against their filtered probabilities."""
        device = processed.device
        greedy = to_device(torch.tensor([s.params.greedy for s in seqs]), device)
        temps = to_device(torch.tensor([max(s.params.temperature, MIN_TEMPERATURE) for s in seqs]), device)
        probs = _filtered_probs(processed / temps.unsqueeze(1), seqs)
        seeds = [sample_seed(s.seed, len(s.output_token_ids) + offset) for s, offset in zip(seqs, offsets)]
        seeds = to_device(torch.tensor(seeds, dtype=torch.int64), device)
        return torch.where(greedy, processed.argmax(dim=-1), ops.exponential_race(probs, seeds))


def banned_tokens(token_ids: Seq[int], bad_words: Seq[Seq[int]]) -> list[int]:
    """The last tokens of the ``bad_words`` whose other tokens ``token_ids`` ends with."""
    banned = []
    for word in bad_words:
        rest = len(word) - 1
        if rest == 0 or (rest <= len(token_ids) and list(token_ids[-rest:]) == list(word[:-1])):
            banned.append(word[-1])
    return banned


def _filtered_probs(scaled: torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
    """Softmax after top-k, then the top-p nucleus and min-p, row by row settings."""
    device, vocab = scaled.device, scaled.shape[1]
    top_k = [s.params.top_k if 0 < s.params.top_k < vocab else vocab for s in seqs]
    top_p = to_device(torch.tensor([s.params.top_p for s in seqs]), device)
    min_p = to_device(torch.tensor([s.params.min_p for s in seqs]), device)
    wants_top_p = [s.params.top_p < 1.0 for s in seqs]
    order = None
    if min(top_k) < vocab or any(wants_top_p):
        scaled, order = _top_k(scaled, top_k, wants_top_p)
    probs = torch.softmax(scaled, dim=-1)
    if any(wants_top_p):
        sorted_probs = probs.gather(1, order)
        outside = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p.unsqueeze(1)
        outside &= (top_p < 1.0).unsqueeze(1)
        outside[:, 0] = False
        probs = probs.scatter(1, order, sorted_probs.masked_fill(outside, 0.0))
    if any(s.params.min_p > 0 for s in seqs):
        probs = probs.masked_fill(probs < min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True), 0.0)
    return probs


def _top_k(scaled: torch.Tensor, top_k: list[int], wants_top_p: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask logits below each row's ``top_k``-th largest (``vocab``: no limit; ties
    with the k-th stay). Also returns token ids in descending logit order as far as
    the top-p rows need them, i.e. covering every token they keep: a full sort only
    when some top-p row has no top-k, else ``topk`` over the largest k, widened when
    ties with a row's k-th logit keep more tokens than that."""
    device, vocab = scaled.device, scaled.shape[1]
    if any(p and k == vocab for k, p in zip(top_k, wants_top_p)):
        values, order = scaled.sort(dim=-1, descending=True)
    else:
        values, order = scaled.topk(max(k for k in top_k if k < vocab), dim=-1)
    if min(top_k) == vocab:
        return scaled, order
    limited = to_device(torch.tensor([k < vocab for k in top_k]), device).unsqueeze(1)
    index = to_device(torch.tensor(top_k), device).clamp(max=values.shape[1]).unsqueeze(1) - 1
    kth = values.gather(1, index).masked_fill(~limited, float("-inf"))
    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if order.shape[1] < vocab and any(wants_top_p):
        nucleus = to_device(torch.tensor(wants_top_p), device)
        # Kept tokens reach past the candidates only where the last candidate ties with the k-th.
        if bool((nucleus & (values[:, -1] == kth[:, 0])).any()):
            widest = int((scaled > float("-inf")).sum(dim=-1).masked_fill(~nucleus, 0).max())
            if widest > order.shape[1]:
                order = scaled.topk(widest, dim=-1).indices
    return scaled, order
