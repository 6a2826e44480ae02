"""Exponential-race sampling with counter-based noise: per row, the index that
maximises ``probs / E`` where ``E ~ Exp(1)`` is a pure function of (row seed,
vocab index). No generator state and no noise tensor: a token depends only on
(probs, seed), on any device and in any process.

The noise (a cross-process contract; ``tests/test_sampling_kernel.py`` pins it):

* ``M(x)``, on 32-bit unsigned ints wrapping mod 2**32: ``x ^= x >> 16;
  x *= 0x21F0AAAD; x ^= x >> 15; x *= 0x735A2D97; x ^= x >> 15``
  (Wellons' lowbias32 mixer).
* For a seed (64-bit two's complement) with halves ``lo = seed mod 2**32`` and
  ``hi = (seed >> 32) mod 2**32``: ``salt = M(hi ^ 0x9E3779B9)``, ``key = M(lo ^ salt)``,
  and for vocab index ``i``: ``h = M((M(i ^ key) + salt) mod 2**32)``.
* In float32, every step rounded to nearest even, no fused multiply-add:
  ``v = min(float(h) * 2**-32 + 2**-33, 1 - 2**-24)``, uniform in (0, 1).
* ``E = -log1p(-v)``, evaluated with basic operations only so that every back-end
  rounds alike: ``x = 1 - v``; split ``x = 2**k * m`` with ``m`` in [sqrt(1/2), sqrt(2))
  by its bits (``b = bits(x) + 0x4AFB0D``, ``k = (b >> 23) - 127``,
  ``m = float((b & 0x7FFFFF) + 0x3F3504F3)``); ``s = (v if k == 0 else 1 - m) / (1 + m)``,
  ``z = s * s``, ``t = (((C9 * z + C7) * z + C5) * z + C3) * z + 1`` with ``Cn`` the
  float32 nearest ``1/n``; ``E = (s + s) * t - float(k) * LN2`` with LN2 the float32
  nearest ``ln 2``. (``-log(m) = 2 atanh(s)``; for ``k == 0`` the numerator is ``v``
  itself, so small ``E``, the ones that win races, keep full relative precision.)

A zero probability scores 0, so rows are decided by their nonzero entries; a row
of zeros returns index 0. Ties go to the lowest index.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.kernels.checks import check_device, check_dtype, check_last_dim_contiguous, check_shape

_MASK32 = 0xFFFFFFFF
# Float32 values written exactly, so every back-end reads the same constants.
_C3 = tl.constexpr(0.3333333432674408)    # nearest 1/3
_C5 = tl.constexpr(0.20000000298023224)
_C7 = tl.constexpr(0.1428571492433548)
_C9 = tl.constexpr(0.1111111119389534)
_LN2 = tl.constexpr(0.6931471824645996)
_V_MAX = tl.constexpr(0.9999999403953552)  # 1 - 2**-24, the largest float32 below 1

TILE = 512              # vocab entries per loop step
PROGRAMS_PER_SM = 8     # split the vocab until the launch has about this many programs per SM


@triton.jit
def _mix(x):
    """lowbias32 on uint32, wrapping mod 2**32."""
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


@triton.jit
def _seed_keys(seed):
    """(key, salt) of an int64 seed (scalar or tensor)."""
    salt = _mix((seed >> 32).to(tl.uint32) ^ 0x9E3779B9)
    return _mix(seed.to(tl.uint32) ^ salt), salt


@triton.jit
def _exponential(index, key, salt):
    """Exp(1) noise, float32, for uint32 vocab ``index`` under a seed's (key, salt)."""
    h = _mix(_mix(index ^ key) + salt)
    v = tl.minimum(h.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10, _V_MAX)
    bits = (1.0 - v).to(tl.int32, bitcast=True) + 0x4AFB0D
    k = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) + 0x3F3504F3).to(tl.float32, bitcast=True)
    s = tl.math.div_rn(tl.where(k == 0, v, 1.0 - m), 1.0 + m)
    z = s * s
    t = (((_C9 * z + _C7) * z + _C5) * z + _C3) * z + 1.0
    return (s + s) * t - k.to(tl.float32) * _LN2


@triton.jit
def _exponential_race_kernel(
    probs_ptr, seeds_ptr, part_score_ptr, part_id_ptr,
    stride_p, vocab, split_len,
    TILE: tl.constexpr,
):
    """One program per (row, vocab split): the split's best score and its lowest index."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    key, salt = _seed_keys(tl.load(seeds_ptr + row))
    start = split * split_len
    end = tl.minimum(start + split_len, vocab)
    lanes = tl.arange(0, TILE)
    row_ptr = probs_ptr + row.to(tl.int64) * stride_p
    # Scores are >= 0: starting every lane at score 0 with the split's first ids keeps
    # lowest-index ties and lets a tile of zeros skip the noise.
    best = tl.zeros([TILE], tl.float32)
    best_id = start + lanes
    for first in range(start, end, TILE):
        cols = first + lanes
        p = tl.load(row_ptr + cols, mask=cols < end, other=0.0)
        if tl.max(p, 0) > 0:
            score = tl.math.div_rn(p, _exponential(cols.to(tl.uint32), key, salt))
            better = score > best
            best = tl.where(better, score, best)
            best_id = tl.where(better, cols, best_id)
    top = tl.max(best, 0)
    out = row * tl.num_programs(1) + split
    tl.store(part_score_ptr + out, top)
    tl.store(part_id_ptr + out, tl.min(tl.where(best == top, best_id, vocab), 0).to(tl.int64))


@triton.jit
def _race_merge_kernel(part_score_ptr, part_id_ptr, out_ptr, num_splits, vocab, SPLITS_PAD: tl.constexpr):
    """One program per row: the best split, the lowest index on ties."""
    row = tl.program_id(0)
    splits = tl.arange(0, SPLITS_PAD)
    ok = splits < num_splits
    score = tl.load(part_score_ptr + row * num_splits + splits, mask=ok, other=-1.0)
    ids = tl.load(part_id_ptr + row * num_splits + splits, mask=ok, other=vocab)
    tl.store(out_ptr + row, tl.min(tl.where(score == tl.max(score, 0), ids, vocab), 0))


def _check_race_args(probs: torch.Tensor, seeds: torch.Tensor) -> None:
    check_shape("probs", probs, (-1, -1))
    check_dtype("probs", probs, (torch.float32,))
    check_last_dim_contiguous("probs", probs)
    if probs.shape[1] == 0:
        raise ValueError("probs must have at least one column")
    check_shape("seeds", seeds, (probs.shape[0],))
    check_dtype("seeds", seeds, (torch.int64,))
    check_device("seeds", seeds, probs)
    check_last_dim_contiguous("seeds", seeds)


def vocab_splits(rows: torch.Tensor, tile: int, splits: int | None) -> tuple[int, int]:
    """(programs per row, entries per program) for a ``[batch, vocab]`` kernel over ``rows``:
    ``splits`` programs a row (None: about ``PROGRAMS_PER_SM`` programs per SM in all), each
    a whole number of ``tile``-entry tiles, which may leave fewer splits."""
    batch, vocab = rows.shape
    if splits is None:
        sms = torch.cuda.get_device_properties(rows.device).multi_processor_count if rows.is_cuda else 1
        splits = triton.cdiv(PROGRAMS_PER_SM * sms, max(batch, 1))
    split_len = triton.cdiv(triton.cdiv(vocab, splits), tile) * tile
    return triton.cdiv(vocab, split_len), split_len


def exponential_race(probs: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Per row of ``probs`` ``[batch, vocab]`` float32 (non-negative, finite), the
    index maximising ``probs / E(seeds[row], index)``; ``seeds`` ``[batch]`` int64.
    Returns ``[batch]`` int64."""
    return launch_exponential_race(probs, seeds, TILE)


def launch_exponential_race(probs: torch.Tensor, seeds: torch.Tensor, tile: int, splits: int | None = None) -> torch.Tensor:
    """``exponential_race`` with each row's vocab in ``splits`` programs (rounded to
    whole tiles of ``tile`` entries, a power of two; None: about ``PROGRAMS_PER_SM``
    programs per SM in all). Tests and benchmarks pick them."""
    _check_race_args(probs, seeds)
    batch, vocab = probs.shape
    splits, split_len = vocab_splits(probs, tile, splits)
    part_score = torch.empty((batch, splits), dtype=torch.float32, device=probs.device)
    part_id = torch.empty((batch, splits), dtype=torch.int64, device=probs.device)
    if batch == 0:
        return part_id.view(0)
    # Without fused multiply-adds the noise rounds exactly as the reference does.
    _exponential_race_kernel[(batch, splits)](
        probs, seeds, part_score, part_id, probs.stride(0), vocab, split_len,
        TILE=tile, num_warps=max(1, min(8, tile // 256)), enable_fp_fusion=False,
    )
    if splits == 1:
        return part_id.view(batch)
    out = torch.empty(batch, dtype=torch.int64, device=probs.device)
    _race_merge_kernel[(batch,)](part_score, part_id, out, splits, vocab, SPLITS_PAD=triton.next_power_of_2(splits))
    return out


def _ref_mix_(x: torch.Tensor) -> torch.Tensor:
    """lowbias32, in place, on an int64 tensor holding values in [0, 2**32): each
    product stays below 2**63."""
    x ^= x >> 16
    x.mul_(0x21F0AAAD).bitwise_and_(_MASK32)
    x ^= x >> 15
    x.mul_(0x735A2D97).bitwise_and_(_MASK32)
    x ^= x >> 15
    return x


def exponential_noise(seeds: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``E(seed, index)`` (the module docstring's function), float32, for int64
    ``seeds`` and integer ``index`` tensors that broadcast together. In-place steps
    keep the large temporaries few (they dominate the CPU time)."""
    salt = _ref_mix_(((seeds >> 32) & _MASK32) ^ 0x9E3779B9)
    key = _ref_mix_((seeds & _MASK32) ^ salt)
    h = _ref_mix_(_ref_mix_(index.long() ^ key).add_(salt).bitwise_and_(_MASK32))
    v = h.float().mul_(2**-32).add_(2**-33).clamp_(max=_V_MAX.value)
    bits = (1.0 - v).view(torch.int32).add_(0x4AFB0D)
    k = (bits >> 23).sub_(127)
    m = bits.bitwise_and_(0x7FFFFF).add_(0x3F3504F3).view(torch.float32)
    s = torch.where(k == 0, v, 1.0 - m)
    s.div_(m.add_(1.0))
    z = s * s
    t = z.mul(_C9.value).add_(_C7.value).mul_(z).add_(_C5.value).mul_(z).add_(_C3.value).mul_(z).add_(1.0)
    return s.add_(s).mul_(t).sub_(k.float().mul_(_LN2.value))


def ref_exponential_race(probs: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Per row of ``probs`` ``[batch, vocab]`` float32 (non-negative, finite), the
    index maximising ``probs / E(seeds[row], index)``; ``seeds`` ``[batch]`` int64.
    Returns ``[batch]`` int64."""
    if 3 * int(torch.count_nonzero(probs)) < probs.numel():
        # Mostly zeros (top-k / top-p filtered): noise only where it can win.
        rows, cols = probs.nonzero(as_tuple=True)
        scores = torch.zeros_like(probs)
        scores[rows, cols] = probs[rows, cols] / exponential_noise(seeds[rows], cols)
    else:
        scores = probs / exponential_noise(seeds.unsqueeze(1), torch.arange(probs.shape[1], device=probs.device))
    return scores.argmax(dim=-1)
