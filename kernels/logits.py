"""Row statistics of logits for the sampler, in one read of each row: the largest
logit, its index (the lowest on ties, as ``torch.max`` returns it) and the row's
log-sum-exp (a token's log-prob is its logit minus that). The logits may be in the
model's dtype: each is widened to float32 as it is loaded, so the statistics equal
those of the float32 copy the engine no longer writes (47 us of a batch-128 step at a
128,256-entry vocabulary on an H200).

torch computes them in about six passes over the rows (max, then logsumexp's max,
subtract, exp, sum and log): at 128 rows of a 128,256-entry vocabulary that is 197 us
on an H200 against 27.5 us here, and the 1B model's batch-128 decode step went from
2.17 to 2.00 ms (``bench/results/model_h200.md``). Each row's vocabulary is split over
several programs as the exponential race splits it (``sampling.vocab_splits``); each
keeps its split's maximum, the first index of it and the sum of ``exp(logit - maximum)``,
and a second launch merges the splits of each row.

``-inf`` logits (masked tokens) count as probability 0; a row of ``-inf`` has
maximum ``-inf``, index 0 and log-sum-exp ``-inf``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.kernels.checks import check_dtype, check_last_dim_contiguous, check_shape
from baton.kernels.sampling import vocab_splits

TILE = 1024  # vocab entries per loop step


@triton.jit
def _split_stats_kernel(
    logits_ptr, part_max_ptr, part_id_ptr, part_sum_ptr,
    stride, vocab, split_len,
    TILE: tl.constexpr,
):
    """One program per (row, vocab split): the split's maximum, its first index, and the
    sum of exp(logit - maximum) over the split."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    start = split * split_len
    end = tl.minimum(start + split_len, vocab)
    lanes = tl.arange(0, TILE)
    row_ptr = logits_ptr + row.to(tl.int64) * stride
    best = tl.full([], float("-inf"), tl.float32)
    best_id = start
    total = tl.zeros([], tl.float32)
    for first in range(start, end, TILE):
        cols = first + lanes
        x = tl.load(row_ptr + cols, mask=cols < end, other=float("-inf")).to(tl.float32)
        tile_max = tl.max(x, 0)
        # Strictly greater: an equal maximum in a later tile keeps the earlier index.
        best_id = tl.where(tile_max > best, first + tl.argmax(x, 0, tie_break_left=True), best_id)
        new_best = tl.maximum(best, tile_max)
        shift = tl.where(new_best == float("-inf"), 0.0, new_best)  # all -inf so far: every exp is 0
        total = total * tl.exp(best - shift) + tl.sum(tl.exp(x - shift), 0)
        best = new_best
    out = row * tl.num_programs(1) + split
    tl.store(part_max_ptr + out, best)
    tl.store(part_id_ptr + out, best_id.to(tl.int64))
    tl.store(part_sum_ptr + out, total)


@triton.jit
def _merge_stats_kernel(
    part_max_ptr, part_id_ptr, part_sum_ptr, max_ptr, id_ptr, lse_ptr,
    num_splits, vocab,
    SPLITS_PAD: tl.constexpr,
):
    """One program per row: the largest split maximum (the lowest index on ties) and the
    splits' sums rescaled to it."""
    row = tl.program_id(0)
    splits = tl.arange(0, SPLITS_PAD)
    ok = splits < num_splits
    part_max = tl.load(part_max_ptr + row * num_splits + splits, mask=ok, other=float("-inf"))
    part_id = tl.load(part_id_ptr + row * num_splits + splits, mask=ok, other=vocab)
    part_sum = tl.load(part_sum_ptr + row * num_splits + splits, mask=ok, other=0.0)
    best = tl.max(part_max, 0)
    shift = tl.where(best == float("-inf"), 0.0, best)
    total = tl.sum(part_sum * tl.exp(part_max - shift), 0)
    tl.store(max_ptr + row, best)
    tl.store(id_ptr + row, tl.min(tl.where(part_max == best, part_id, vocab), 0))
    tl.store(lse_ptr + row, tl.where(total > 0, shift + tl.log(total), float("-inf")))


def _check_logits(logits: torch.Tensor) -> None:
    check_shape("logits", logits, (-1, -1))
    check_dtype("logits", logits)
    check_last_dim_contiguous("logits", logits)
    if logits.shape[1] == 0:
        raise ValueError("logits must have at least one column")


def max_logsumexp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``logits`` ``[batch, vocab]`` (float32, bfloat16 or float16): the largest
    logit (``[batch]`` float32), its lowest index (``[batch]`` int64) and the log-sum-exp
    (``[batch]`` float32)."""
    return launch_max_logsumexp(logits, TILE)


def launch_max_logsumexp(logits: torch.Tensor, tile: int, splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``max_logsumexp`` with each row's vocab in ``splits`` programs (``sampling.vocab_splits``;
    ``tile`` a power of two). Tests and benchmarks pick them."""
    _check_logits(logits)
    batch, vocab = logits.shape
    splits, split_len = vocab_splits(logits, tile, splits)
    part_max = torch.empty((batch, splits), dtype=torch.float32, device=logits.device)
    part_id = torch.empty((batch, splits), dtype=torch.int64, device=logits.device)
    part_sum = torch.empty((batch, splits), dtype=torch.float32, device=logits.device)
    best = torch.empty(batch, dtype=torch.float32, device=logits.device)
    index = torch.empty(batch, dtype=torch.int64, device=logits.device)
    lse = torch.empty(batch, dtype=torch.float32, device=logits.device)
    if batch == 0:
        return best, index, lse
    _split_stats_kernel[(batch, splits)](
        logits, part_max, part_id, part_sum, logits.stride(0), vocab, split_len,
        TILE=tile, num_warps=max(1, min(8, tile // 256)),
    )
    _merge_stats_kernel[(batch,)](part_max, part_id, part_sum, best, index, lse, splits, vocab, SPLITS_PAD=triton.next_power_of_2(splits))
    return best, index, lse


def ref_max_logsumexp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``logits`` ``[batch, vocab]``: the largest logit, its lowest index and the
    log-sum-exp, in float32."""
    logits = logits.float()
    best, index = logits.max(dim=-1)
    return best, index, torch.logsumexp(logits, dim=-1)
