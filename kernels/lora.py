"""Grouped LoRA ("punica"-style, after vLLM's sgmv kernels): each token's adapter delta,
computed for that token's own adapter only.

A step's tokens each name an adapter (``adapters[t]`` in ``[0, n)``, -1: none). ``group_by_adapter``
sorts the token ids by adapter on the device (one launch of a counting sort, stable, with no host
sync: a CUDA graph that captures it groups whatever adapters its replay finds) into ``order`` and
the start of each group in it, ``starts`` (``[n + 2]``: group 0 holds the tokens without an
adapter, group ``g`` those of adapter ``g - 1``). A step computes it once and hands it to every
module's two launches:

- ``lora_shrink``: ``y[t] = x[t] @ a[adapters[t]]^T``, fp32 ``[T, w]`` (zeros for tokens without one);
- ``lora_expand_add``: ``out[t] += y[t] @ b[adapters[t]]^T`` in place (rows without one untouched).

Each launches one grid over (token blocks, output-column tiles, adapters) whose size depends only
on T, n and the widths. A program takes one row block of its adapter's tokens, gathered through
``order``; one whose block starts past its group's count exits at once, so the work follows the
tokens each adapter has, not ``n`` times them. Tiles have at least 16 rows and multiply with
``tl.dot`` (fp32 accumulate; fp32 inputs in full precision, not TF32). A decode step's few
tokens make few tiles, so shrink splits its long reduction (the model's hidden size) over
several programs a tile, which add their parts into ``y`` atomically: fp32 sums whose order
varies from run to run, by rounding only. Expand's reduction (the rank) is short: each output
row has one writer per column tile.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from baton.kernels.checks import (
    check_device, check_dtype, check_int_index, check_last_dim_contiguous, check_same_dtype, check_shape, num_sms,
)


class LoRAGroups(NamedTuple):
    """Tokens grouped by adapter: ``order`` ``[T]`` int64, token ids sorted by adapter (stable,
    tokens without one first); ``starts`` ``[n + 2]`` int64, group ``g`` (adapter ``g - 1``, none
    for ``g = 0``) is ``order[starts[g]:starts[g + 1]]``."""

    order: torch.Tensor
    starts: torch.Tensor


@triton.jit
def _token_groups(adapters_ptr, t, T, n):
    """The groups of tokens ``t``: 0 without an adapter, ``a + 1`` for adapter ``a``, and ``n + 2``
    (no program's group, below none) past the ``T`` tokens."""
    a = tl.load(adapters_ptr + t, mask=t < T, other=-1)
    return tl.where(t < T, tl.where((a >= 0) & (a < n), a + 1, 0), n + 2)


@triton.jit
def _group_kernel(adapters_ptr, order_ptr, starts_ptr, T, n, BLOCK: tl.constexpr):
    """Program ``g`` of ``n + 2``: ``starts[g]``, the tokens whose group is below ``g`` (group 0:
    no adapter; ``g``: adapter ``g - 1``), then, for ``g <= n``, its group's token ids in order."""
    g = tl.program_id(0)
    before = 0
    for t0 in range(0, T, BLOCK):
        before += tl.sum((_token_groups(adapters_ptr, t0 + tl.arange(0, BLOCK), T, n) < g).to(tl.int32))
    tl.store(starts_ptr + g, before.to(tl.int64))
    if g <= n:
        place = before
        for t0 in range(0, T, BLOCK):
            t = t0 + tl.arange(0, BLOCK)
            mine = _token_groups(adapters_ptr, t, T, n) == g
            rank = tl.cumsum(mine.to(tl.int32), 0) - 1
            tl.store(order_ptr + place + rank, t.to(tl.int64), mask=mine)
            place += tl.sum(mine.to(tl.int32))


def group_by_adapter(adapters: torch.Tensor, n: int) -> LoRAGroups:
    """Group ``adapters`` ``[T]`` (values in ``[0, n)``; -1 or any other value: no adapter) on its
    device: one launch of ``n + 2`` programs on CUDA, ``ref_group_by_adapter`` elsewhere."""
    check_int_index("adapters", adapters, (-1,), adapters)
    return launch_group_by_adapter(adapters, n) if adapters.is_cuda else ref_group_by_adapter(adapters, n)


def launch_group_by_adapter(adapters: torch.Tensor, n: int) -> LoRAGroups:
    """``group_by_adapter``'s kernel, whatever the device (the tests run it interpreted on CPU)."""
    tokens = adapters.shape[0]
    groups = LoRAGroups(torch.empty(tokens, dtype=torch.int64, device=adapters.device),
                        torch.empty(n + 2, dtype=torch.int64, device=adapters.device))
    _group_kernel[(n + 2,)](adapters, groups.order, groups.starts, tokens, n,
                            BLOCK=min(1024, triton.next_power_of_2(max(tokens, 16))), num_warps=4)
    return groups


def ref_group_by_adapter(adapters: torch.Tensor, n: int) -> LoRAGroups:
    """``group_by_adapter`` in fixed-shape torch ops (a counting sort over ``[T, n + 1]`` flags)."""
    device = adapters.device
    valid = (adapters >= 0) & (adapters < n)
    group = torch.where(valid, adapters.long() + 1, 0)
    member = group[:, None] == torch.arange(n + 1, device=device)      # [T, n + 1]
    seen = member.long().cumsum(0)                                     # members so far, this one included
    starts = torch.zeros(n + 2, dtype=torch.int64, device=device)
    starts[1:] = member.long().sum(0).cumsum(0)
    slot = starts[group] + seen.gather(1, group[:, None])[:, 0] - 1   # this token's place in its group
    tokens = torch.arange(adapters.shape[0], device=device)
    return LoRAGroups(torch.empty_like(tokens).scatter_(0, slot, tokens), starts)


@dataclass(frozen=True)
class LoRAConfig:
    """Launch parameters: token rows, output columns and reduction width per step of a program,
    warps, pipeline depth, and (shrink) how many programs share one tile's reduction, adding their
    parts into it. Rows, columns and width are powers of two of at least 16 (``tl.dot``)."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2
    splits: int | None = None   # shrink: slices of the reduction (None: enough programs for the device)


def _tile(width: int, most: int) -> int:
    return max(16, min(most, triton.next_power_of_2(width)))


def default_shrink_config(tokens: int, w: int) -> LoRAConfig:
    """Decode-sized steps: 16-row tiles; larger steps: 64 rows; the reduction split as
    ``shrink_splits`` says (``bench/bench_kernels.py --lora-only`` has the figures)."""
    if tokens <= 64:
        return LoRAConfig(block_m=16, block_n=_tile(w, 64), block_k=64)
    return LoRAConfig(block_m=64, block_n=_tile(w, 64), block_k=64, num_stages=3)


def shrink_splits(cfg: LoRAConfig, tokens: int, w: int, k: int, n: int, device: torch.device) -> tuple[int, int]:
    """(splits, reduction width of each, a whole number of ``block_k``): ``cfg.splits``, else as many
    as give about two programs an SM over the tiles that hold tokens (at most one row block a
    ``block_m`` tokens, plus one for each adapter present, its last partly filled); a few tokens'
    tiles read all of ``a``'s rows for them, so few tiles leave most SMs idle unless the
    reduction is split."""
    tiles = (triton.cdiv(tokens, cfg.block_m) + min(n, tokens)) * triton.cdiv(w, cfg.block_n)
    wanted = cfg.splits if cfg.splits is not None else triton.cdiv(2 * num_sms(device), tiles)
    split_k = triton.cdiv(triton.cdiv(k, max(1, min(wanted, triton.cdiv(k, cfg.block_k)))), cfg.block_k) * cfg.block_k
    return triton.cdiv(k, split_k), split_k


def default_expand_config(tokens: int, w: int) -> LoRAConfig:
    """As ``default_shrink_config``: the reduction is over the rank width ``w`` (one to three steps,
    so a decode step's tiles do not pipeline it), the columns the module's output."""
    if tokens <= 64:
        return LoRAConfig(block_m=16, block_n=128, block_k=_tile(w, 64), num_stages=1)
    return LoRAConfig(block_m=64, block_n=128, block_k=_tile(w, 64))


@triton.jit
def _group_tile(order_ptr, starts_ptr, group, width, splits, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile of ``group``: the token ids of its row block ``program_id(0)`` (int64;
    token 0 past the group's end, never stored), which rows are the group's, its columns (tile
    ``program_id(1) // splits``) and which lie below ``width``, and whether the block holds any of
    the group."""
    start = tl.load(starts_ptr + group)
    count = tl.load(starts_ptr + group + 1) - start
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < count
    tokens = tl.load(order_ptr + start + rows, mask=row_ok, other=0).to(tl.int64)
    cols = (tl.program_id(1) // splits) * BLOCK_N + tl.arange(0, BLOCK_N)
    return tokens, row_ok, cols, cols < width, tl.program_id(0) * BLOCK_M < count


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, y_ptr, order_ptr, starts_ptr,
    W, K, split_k, splits, stride_xt, stride_an, stride_aw, stride_yt,
    ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``y[t, cols] += x[t, ks] @ a[lora, cols, ks]^T`` for the tokens of adapter ``lora`` (group
    ``lora + 1``) over this program's slice of the reduction (``split_k`` wide, one of ``splits``;
    ``ATOMIC``: several, each adding its part into ``y``, which starts at zero)."""
    lora = tl.program_id(2)
    tokens, row_ok, cols, col_ok, live = _group_tile(order_ptr, starts_ptr, lora + 1, W, splits, BLOCK_M, BLOCK_N)
    if not live:
        return
    first = (tl.program_id(1) % splits) * split_k
    ks = first + tl.arange(0, BLOCK_K)
    # Rows past the group read token 0 and columns past W read a's row 0: never stored.
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + ks[None, :]
    a_rows = lora.to(tl.int64) * stride_an + tl.where(col_ok, cols, 0).to(tl.int64) * stride_aw
    a_ptrs = a_ptr + a_rows[None, :] + ks[:, None]                  # [BLOCK_K, BLOCK_N]: a^T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.minimum(split_k, K - first), BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs + k0)
            a = tl.load(a_ptrs + k0)
        else:
            k_ok = first + k0 + tl.arange(0, BLOCK_K) < K
            x = tl.load(x_ptrs + k0, mask=k_ok[None, :], other=0.0)
            a = tl.load(a_ptrs + k0, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(x, a, acc, input_precision=DOT_PRECISION)
    y_ptrs = y_ptr + tokens[:, None] * stride_yt + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if not ATOMIC:
        tl.store(y_ptrs, acc, mask=mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask, sem="relaxed")


@triton.jit
def _lora_expand_kernel(
    y_ptr, b_ptr, out_ptr, order_ptr, starts_ptr,
    N, W, stride_yt, stride_bn, stride_bo, stride_ot,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """``out[t, cols] += y[t] @ b[lora, cols]^T`` for the tokens of adapter ``lora`` (group ``lora + 1``)."""
    lora = tl.program_id(2)
    tokens, row_ok, cols, col_ok, live = _group_tile(order_ptr, starts_ptr, lora + 1, N, 1, BLOCK_M, BLOCK_N)
    if not live:
        return
    ks = tl.arange(0, BLOCK_K)
    b_rows = lora.to(tl.int64) * stride_bn + tl.where(col_ok, cols, 0).to(tl.int64) * stride_bo
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, W, BLOCK_K):
        k_ok = k0 + ks < W
        y = tl.load(y_ptr + tokens[:, None] * stride_yt + (k0 + ks)[None, :], mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + b_rows[None, :] + (k0 + ks)[:, None], mask=k_ok[:, None], other=0.0)
        acc = tl.dot(y.to(b.dtype), b, acc, input_precision=DOT_PRECISION)
    out_ptrs = out_ptr + tokens[:, None] * stride_ot + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    now = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (now + acc).to(out_ptr.dtype.element_ty), mask=mask)


def _check_groups(groups: LoRAGroups | None, adapters: torch.Tensor, n: int) -> LoRAGroups:
    """``groups`` checked against ``adapters`` and ``n`` adapters, or computed when None."""
    if groups is None:
        return group_by_adapter(adapters, n)
    check_int_index("groups.order", groups.order, adapters.shape, adapters)
    check_int_index("groups.starts", groups.starts, (n + 2,), adapters)
    return groups


def _check_lora_args(x: torch.Tensor, weights: torch.Tensor, adapters: torch.Tensor, names: tuple[str, str]) -> None:
    """``x`` ``[T, k]`` and ``weights`` ``[n, *, k]`` of float dtypes on one device, each contiguous
    in its last dim; ``adapters`` ``[T]``."""
    x_name, w_name = names
    check_shape(x_name, x, (-1, -1))
    check_dtype(x_name, x)
    check_last_dim_contiguous(x_name, x)
    check_shape(w_name, weights, (-1, -1, x.shape[1]))
    check_dtype(w_name, weights)
    check_device(w_name, weights, x)
    check_last_dim_contiguous(w_name, weights)
    check_int_index("adapters", adapters, (x.shape[0],), x)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def lora_shrink(x: torch.Tensor, a: torch.Tensor, adapters: torch.Tensor, groups: LoRAGroups | None = None) -> torch.Tensor:
    """``x`` ``[T, in]``, ``a`` ``[n, w, in]`` (x's dtype), ``adapters`` ``[T]`` (-1: none) -> fp32
    ``[T, w]``: ``x[t] @ a[adapters[t]]^T``, zeros where -1. ``groups``: ``group_by_adapter(adapters, n)``,
    computed here when None."""
    return launch_lora_shrink(x, a, adapters, groups)


def launch_lora_shrink(x: torch.Tensor, a: torch.Tensor, adapters: torch.Tensor, groups: LoRAGroups | None = None,
                       config: LoRAConfig | None = None) -> torch.Tensor:
    """``lora_shrink`` with explicit launch parameters (None: ``default_shrink_config``)."""
    _check_lora_args(x, a, adapters, ("x", "a"))
    check_same_dtype("a", a, "x", x)
    (tokens, k), (n, w, _) = x.shape, a.shape
    groups = _check_groups(groups, adapters, n)
    y = torch.zeros((tokens, w), dtype=torch.float32, device=x.device)   # the rows without an adapter stay 0
    if y.numel() == 0 or n == 0:
        return y
    cfg = config or default_shrink_config(tokens, w)
    splits, split_k = shrink_splits(cfg, tokens, w, k, n, x.device)
    grid = (triton.cdiv(tokens, cfg.block_m), triton.cdiv(w, cfg.block_n) * splits, n)
    _lora_shrink_kernel[grid](
        x, a, y, groups.order, groups.starts,
        w, k, split_k, splits, x.stride(0), a.stride(0), a.stride(1), y.stride(0),
        ATOMIC=splits > 1, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        EVEN_K=k % cfg.block_k == 0, DOT_PRECISION=_dot_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y


def lora_expand_add(y: torch.Tensor, b: torch.Tensor, adapters: torch.Tensor, out: torch.Tensor,
                    groups: LoRAGroups | None = None) -> torch.Tensor:
    """``y`` ``[T, w]`` (any float dtype), ``b`` ``[n, out, w]``, ``out`` ``[T, out]`` (b's dtype):
    ``out[t] += y[t] @ b[adapters[t]]^T`` in place where ``adapters[t]`` is not -1 (other rows
    untouched), summed in fp32 and rounded once; returns ``out``. ``groups`` as in ``lora_shrink``."""
    return launch_lora_expand_add(y, b, adapters, out, groups)


def launch_lora_expand_add(y: torch.Tensor, b: torch.Tensor, adapters: torch.Tensor, out: torch.Tensor,
                           groups: LoRAGroups | None = None, config: LoRAConfig | None = None) -> torch.Tensor:
    """``lora_expand_add`` with explicit launch parameters (None: ``default_expand_config``)."""
    _check_lora_args(y, b, adapters, ("y", "b"))
    (tokens, w), (n, width, _) = y.shape, b.shape
    check_shape("out", out, (tokens, width))
    check_device("out", out, y)
    check_same_dtype("out", out, "b", b)
    check_last_dim_contiguous("out", out)
    groups = _check_groups(groups, adapters, n)
    if out.numel() == 0 or n == 0:
        return out
    cfg = config or default_expand_config(tokens, w)
    grid = (triton.cdiv(tokens, cfg.block_m), triton.cdiv(width, cfg.block_n), n)
    _lora_expand_kernel[grid](
        y, b, out, groups.order, groups.starts,
        width, w, y.stride(0), b.stride(0), b.stride(1), out.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, DOT_PRECISION=_dot_precision(b.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def _adapter_rows(adapters: torch.Tensor, n: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(i, rows)`` for each adapter ``i`` that some token names: the int64 token ids."""
    for i in range(n):
        rows = (adapters == i).nonzero()[:, 0]
        if rows.numel():
            yield i, rows


def ref_lora_shrink(x: torch.Tensor, a: torch.Tensor, adapters: torch.Tensor, groups: LoRAGroups | None = None) -> torch.Tensor:
    """``x`` ``[T, in]``, ``a`` ``[n, w, in]``, ``adapters`` ``[T]`` (-1: none) -> fp32 ``[T, w]``:
    ``x[t] @ a[adapters[t]]^T``, zeros where -1. ``groups`` (the kernel's grouping) is not needed here."""
    y = torch.zeros((x.shape[0], a.shape[1]), dtype=torch.float32, device=x.device)
    for i, rows in _adapter_rows(adapters, a.shape[0]):
        y[rows] = x[rows].float() @ a[i].float().T
    return y


def ref_lora_expand_add(y: torch.Tensor, b: torch.Tensor, adapters: torch.Tensor, out: torch.Tensor,
                        groups: LoRAGroups | None = None) -> torch.Tensor:
    """``out[t] += y[t] @ b[adapters[t]]^T`` in place (fp32, rounded once) where ``adapters[t]`` is
    not -1; returns ``out``. ``groups`` is not needed here."""
    for i, rows in _adapter_rows(adapters, b.shape[0]):
        out[rows] = (out[rows].float() + y[rows].float() @ b[i].float().T).to(out.dtype)
    return out
