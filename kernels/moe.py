"""Fused mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE): each token's ``k`` routed
experts' gated MLPs, weighted by the router and summed.

The model routes in torch and hands over ``topk_ids`` and ``topk_weights`` ``[T, k]``;
``fused_moe`` returns ``out[t] = sum_j topk_weights[t, j] * down[e] @ act_and_mul(gate_up[e] @ x[t])``
with ``e = topk_ids[t, j]``. It rounds where transformers' 16-bit experts do: the gate/up product
to x's dtype, ``act_and_mul`` in x's dtype; the down product accumulates in fp32, is scaled by the
fp32 weight and summed over the ``k`` experts in fp32, then rounded once.

Four launches; none syncs with the host or sizes anything by the routing, so a CUDA graph that
captures them serves whatever routing its replay finds:

- ``moe_align``: the ``T * k`` (token, expert) pairs, pair ``p = t * k + j``, sorted by expert into
  tiles of ``block_m`` rows, each expert's last tile padded (padding rows hold ``T * k``); with
  each tile's expert and the number of tiles in use. One program an expert counts every expert's
  pairs (``tl.histogram``), then writes its own at its first tile, in pair order.
- ``_moe_gate_up_kernel``: program ``(tile, n)`` multiplies its tile's rows of x (gathered by
  token) by ``block_n`` gate rows of its expert and the matching up rows, and stores
  ``act_and_mul`` of the two, rounded as ``activation.act_and_mul`` rounds, to ``h``
  ``[tiles * block_m, I]`` row for row.
- ``_moe_down_kernel``: program ``(tile, n)``: ``h``'s rows of its tile times ``block_n`` rows of
  its expert's ``down``, times each pair's weight, stored to the pair's fp32 row ``y[p]``.
- ``_moe_sum_kernel``: ``out[t] = sum_j y[t * k + j]`` in ``j`` order, rounded once.

The GEMM grids cover the most tiles any routing can fill (``max_tiles``); a program past the
tiles in use reads their count and returns. A tile's rows all belong to one expert, so each
program reads its expert's weight tile once for all of them: a call reads each hit expert's
weights once per tile of its pairs, not once per token. Tiles multiply with ``tl.dot`` (fp32
accumulate; fp32 inputs in full precision, not TF32); weight offsets are 64-bit.

The ids come from a top-k over the ``E`` experts and are trusted, as block tables are: checking
them would sync with the host. A pair whose id lies outside ``[0, E)`` adds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from baton.kernels.activation import act_mul, check_activation, ref_act_and_mul
from baton.kernels.checks import (
    check_contiguous, check_device, check_dtype, check_int_index, check_last_dim_contiguous, check_power_of_two,
    check_same_dtype, check_shape,
)

_SUM_BLOCK = 1024   # output columns per program of the sum over k


class MoEAlignment(NamedTuple):
    """Pairs tiled by expert: ``sorted_pairs`` ``[tiles * block_m]`` int32, pair ids ``t * k + j``,
    each expert's in pair order from the first row of its first tile, its last tile padded with
    ``T * k``; ``tile_expert`` ``[tiles]`` int32, each tile's expert; ``num_tiles`` ``[1]`` int32,
    the tiles in use (the kernel leaves the entries past them unwritten)."""

    sorted_pairs: torch.Tensor
    tile_expert: torch.Tensor
    num_tiles: torch.Tensor


@dataclass(frozen=True)
class MoEConfig:
    """Launch parameters of both grouped GEMMs: rows a tile (pairs of one expert), output columns
    a program (gate_up: that many gate columns and as many up columns), reduction width per step,
    warps, pipeline depth. Rows, columns and width are powers of two of at least 16 (``tl.dot``)."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 4


def default_config(tokens: int, topk: int, experts: int, dtype: torch.dtype) -> MoEConfig:
    """By the pairs an expert gets on average, ``tokens * topk / experts``: tiles of 16 rows (the
    fewest ``tl.dot`` takes) up to 16 pairs (decode steps), 32 up to 64, 64 past that, with wider
    column tiles and 8 warps past 256 (prefill). fp32 tiles pipeline two deep (shared memory).
    Decode steps reduce 128 wide, three deep: on an H100 (bf16, ``bench/results/kernels_h100.md``)
    the best of seven candidates or within 5% of it at Mixtral-8x7B's and Qwen3-30B-A3B's experts,
    1 to 256 tokens (against 64 wide, four deep: 85-93% of copy -> 89-98% at Mixtral's 1-64 tokens,
    65-90% -> 68-95% at Qwen3's 1-256); the larger tiles are not swept."""
    per_expert = tokens * topk / experts
    if per_expert <= 16:
        cfg = MoEConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3)
    elif per_expert <= 64:
        cfg = MoEConfig(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=4)
    elif per_expert <= 256:
        cfg = MoEConfig(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3)
    else:
        cfg = MoEConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3)
    return replace(cfg, num_stages=min(cfg.num_stages, 2)) if dtype == torch.float32 else cfg


def max_tiles(pairs: int, experts: int, block_m: int) -> int:
    """The most tiles of ``block_m`` rows that ``pairs`` pairs over ``experts`` experts fill: each
    of the at most ``min(experts, pairs)`` experts hit pads its last tile with under ``block_m`` rows."""
    return min(pairs, (pairs + min(experts, pairs) * (block_m - 1)) // block_m)


@triton.jit
def _moe_align_kernel(ids_ptr, sorted_ptr, tile_expert_ptr, num_tiles_ptr, N, E,
                      BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """Program ``e`` of ``E``: every expert's pair count, then expert ``e``'s tiles (its first is
    after all tiles of the experts below it), its pairs in order and its padding rows; program 0
    also stores the tiles in use."""
    e = tl.program_id(0)
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for p0 in range(0, N, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + p, mask=p < N, other=-1)
        counts += tl.histogram(ids.to(tl.int32), E_PAD, mask=(p < N) & (ids >= 0) & (ids < E))
    experts = tl.arange(0, E_PAD)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    first = tl.sum(tl.where(experts < e, tiles, 0))
    mine = tl.sum(tl.where(experts == e, tiles, 0))
    if e == 0:
        tl.store(num_tiles_ptr, tl.sum(tiles))
    for t0 in range(0, mine, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        tl.store(tile_expert_ptr + first + t, tl.zeros_like(t) + e, mask=t < mine)
    place = first * BLOCK_M
    for p0 in range(0, N, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        hit = (tl.load(ids_ptr + p, mask=p < N, other=-1) == e) & (p < N)
        rank = tl.cumsum(hit.to(tl.int32), 0) - 1
        tl.store(sorted_ptr + place + rank, p, mask=hit)
        place += tl.sum(hit.to(tl.int32))
    pad = place + tl.arange(0, BLOCK_M)
    tl.store(sorted_ptr + pad, N, mask=pad < (first + mine) * BLOCK_M)


def moe_align(topk_ids: torch.Tensor, experts: int, block_m: int) -> MoEAlignment:
    """``topk_ids`` ``[T, k]`` tiled by expert (``MoEAlignment``) in one launch of ``experts``
    programs, sized by ``max_tiles``; ids outside ``[0, experts)`` join no tile."""
    check_int_index("topk_ids", topk_ids, (-1, -1), topk_ids)
    check_power_of_two("block_m", block_m, 16)
    pairs, device = topk_ids.numel(), topk_ids.device
    tiles = max_tiles(pairs, experts, block_m)
    align = MoEAlignment(torch.empty(tiles * block_m, dtype=torch.int32, device=device),
                         torch.empty(tiles, dtype=torch.int32, device=device),
                         torch.empty(1, dtype=torch.int32, device=device))
    _moe_align_kernel[(experts,)](topk_ids, *align, pairs, experts, BLOCK_M=block_m,
                                  E_PAD=triton.next_power_of_2(experts), BLOCK=min(1024, triton.next_power_of_2(max(pairs, 16))),
                                  num_warps=4)
    return align


def ref_moe_align(topk_ids: torch.Tensor, experts: int, block_m: int) -> MoEAlignment:
    """``moe_align`` in plain torch, the tiles in use only."""
    flat = topk_ids.reshape(-1).long()
    sorted_pairs, tile_expert = [], []
    for e in range(experts):
        pairs = (flat == e).nonzero()[:, 0]
        tiles = -(-pairs.numel() // block_m)
        padded = torch.full((tiles * block_m,), flat.numel(), dtype=torch.int64, device=flat.device)
        padded[: pairs.numel()] = pairs
        sorted_pairs.append(padded)
        tile_expert += [e] * tiles
    return MoEAlignment(torch.cat(sorted_pairs).int(), torch.tensor(tile_expert, dtype=torch.int32, device=flat.device),
                        torch.tensor([len(tile_expert)], dtype=torch.int32, device=flat.device))


@triton.jit
def _tile_rows(sorted_ptr, tile_expert_ptr, tile, N, BLOCK_M: tl.constexpr):
    """Tile ``tile`` (one in use): its expert (int64), its rows, their pair ids and which rows hold
    a pair (not padding)."""
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ptr + rows)
    return expert, rows.to(tl.int64), pairs, pairs < N


@triton.jit
def _moe_gate_up_kernel(
    x_ptr, w_ptr, h_ptr, sorted_ptr, tile_expert_ptr, num_tiles_ptr,
    N, I, H, stride_xt, stride_we, stride_wn, stride_ht,
    TOPK: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """``h[rows, cols] = act_and_mul([x[tokens] @ w[e, cols]^T, x[tokens] @ w[e, I + cols]^T])``
    for this program's tile (expert ``e``, its pairs' tokens) and column tile ``program_id(1)``."""
    tile = tl.program_id(0)
    if tile >= tl.load(num_tiles_ptr):
        return
    expert, rows, pairs, row_ok = _tile_rows(sorted_ptr, tile_expert_ptr, tile, N, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    ks = tl.arange(0, BLOCK_K)
    # Padding rows compute token 0's values (the down kernel stores nothing for them); columns past
    # I read gate row 0 and are not stored.
    tokens = tl.where(row_ok, pairs // TOPK, 0).to(tl.int64)
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + ks[None, :]
    gate_rows = tl.where(col_ok, cols, 0)
    gate_ptrs = w_ptr + (expert * stride_we + gate_rows.to(tl.int64) * stride_wn)[None, :] + ks[:, None]   # [BLOCK_K, BLOCK_N]
    up_ptrs = w_ptr + (expert * stride_we + (gate_rows + I).to(tl.int64) * stride_wn)[None, :] + ks[:, None]
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs + k0)
            wg = tl.load(gate_ptrs + k0)
            wu = tl.load(up_ptrs + k0)
        else:
            k_ok = k0 + ks < H
            x = tl.load(x_ptrs + k0, mask=k_ok[None, :], other=0.0)
            wg = tl.load(gate_ptrs + k0, mask=k_ok[:, None], other=0.0)
            wu = tl.load(up_ptrs + k0, mask=k_ok[:, None], other=0.0)
        gate = tl.dot(x, wg, gate, input_precision=DOT_PRECISION)
        up = tl.dot(x, wu, up, input_precision=DOT_PRECISION)
    dtype = h_ptr.dtype.element_ty
    h = act_mul(gate.to(dtype), up.to(dtype), dtype, ACTIVATION)
    tl.store(h_ptr + rows[:, None] * stride_ht + cols[None, :], h, mask=col_ok[None, :])


@triton.jit
def _moe_down_kernel(
    h_ptr, w_ptr, weights_ptr, y_ptr, sorted_ptr, tile_expert_ptr, num_tiles_ptr,
    N, H, I, stride_ht, stride_we, stride_wn, stride_yt,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``y[p, cols] = weights[p] * h[row] @ w[e, cols]^T`` (fp32) for each pair ``p`` of this
    program's tile (expert ``e``) and column tile ``program_id(1)``."""
    tile = tl.program_id(0)
    if tile >= tl.load(num_tiles_ptr):
        return
    expert, rows, pairs, row_ok = _tile_rows(sorted_ptr, tile_expert_ptr, tile, N, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    ks = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows[:, None] * stride_ht + ks[None, :]
    w_ptrs = w_ptr + (expert * stride_we + tl.where(col_ok, cols, 0).to(tl.int64) * stride_wn)[None, :] + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        if EVEN_K:
            h = tl.load(h_ptrs + k0)
            w = tl.load(w_ptrs + k0)
        else:
            k_ok = k0 + ks < I
            h = tl.load(h_ptrs + k0, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs + k0, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    acc *= tl.load(weights_ptr + pairs, mask=row_ok, other=0.0)[:, None]
    y_ptrs = y_ptr + pairs.to(tl.int64)[:, None] * stride_yt + cols[None, :]
    tl.store(y_ptrs, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _moe_sum_kernel(y_ptr, ids_ptr, out_ptr, H, E, stride_yt, stride_ot, TOPK: tl.constexpr, BLOCK: tl.constexpr):
    """``out[t, cols] = sum_j y[t * TOPK + j, cols]`` in fp32, ``j`` in order, over the pairs whose
    expert is in ``[0, E)``."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < H
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.static_range(TOPK):
        e = tl.load(ids_ptr + t * TOPK + j) + tl.zeros_like(cols)   # a vector: the interpreter takes no scalar in a mask
        acc += tl.load(y_ptr + (t * TOPK + j) * stride_yt + cols, mask=col_ok & (e >= 0) & (e < E), other=0.0)
    tl.store(out_ptr + t * stride_ot + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def _check_moe_args(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor, activation: str) -> None:
    """``x`` ``[T, H]``, ``gate_up`` ``[E, 2I, H]``, ``down`` ``[E, H, I]`` of one float dtype, the
    weights contiguous; ``topk_ids`` ``[T, k]`` and ``topk_weights`` ``[T, k]`` fp32 with ``1 <= k <= E``;
    all on one device."""
    check_activation(activation)
    check_shape("x", x, (-1, -1))
    check_dtype("x", x)
    check_last_dim_contiguous("x", x)
    tokens, hidden = x.shape
    for name, w in (("gate_up", gate_up), ("down", down)):
        check_same_dtype(name, w, "x", x)
        check_device(name, w, x)
    check_shape("gate_up", gate_up, (-1, -1, hidden))
    if gate_up.shape[1] == 0 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must have 2 * I > 0 rows an expert (gate then up), got {gate_up.shape[1]}")
    check_contiguous("gate_up", gate_up)
    experts, inter = gate_up.shape[0], gate_up.shape[1] // 2
    check_shape("down", down, (experts, hidden, inter))
    check_contiguous("down", down)
    check_int_index("topk_ids", topk_ids, (tokens, -1), x)
    topk = topk_ids.shape[1]
    if not 1 <= topk <= experts:
        raise ValueError(f"topk_ids must pick 1 to E={experts} experts a token, got {topk}")
    check_shape("topk_weights", topk_weights, (tokens, topk))
    check_dtype("topk_weights", topk_weights, (torch.float32,))
    check_device("topk_weights", topk_weights, x)
    check_contiguous("topk_weights", topk_weights)


def _check_config(cfg: MoEConfig) -> None:
    for name in ("block_m", "block_n", "block_k"):
        check_power_of_two(f"config.{name}", getattr(cfg, name), 16)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def fused_moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, activation: str = "silu", config: MoEConfig | None = None) -> torch.Tensor:
    """``x`` ``[T, H]``, ``gate_up`` ``[E, 2I, H]`` (each expert's gate rows, then its up rows),
    ``down`` ``[E, H, I]`` (x's dtype, contiguous), ``topk_weights`` ``[T, k]`` fp32, ``topk_ids``
    ``[T, k]`` int32/int64 -> ``[T, H]``: the routed experts' MLPs, weighted and summed (see the
    module docstring). ``config`` None: ``default_config``. Four launches, no host sync."""
    _check_moe_args(x, gate_up, down, topk_weights, topk_ids, activation)
    (tokens, hidden), (experts, _, inter), topk = x.shape, down.shape, topk_ids.shape[1]
    cfg = config or default_config(tokens, topk, experts, x.dtype)
    _check_config(cfg)
    out = torch.empty((tokens, hidden), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    align = moe_align(topk_ids, experts, cfg.block_m)
    tiles = align.tile_expert.shape[0]
    h = torch.empty((tiles * cfg.block_m, inter), dtype=x.dtype, device=x.device)
    y = torch.empty((tokens * topk, hidden), dtype=torch.float32, device=x.device)
    options = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, DOT_PRECISION=_dot_precision(x.dtype),
                   num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _moe_gate_up_kernel[(tiles, triton.cdiv(inter, cfg.block_n))](
        x, gate_up, h, *align, tokens * topk, inter, hidden, x.stride(0), gate_up.stride(0), gate_up.stride(1), h.stride(0),
        TOPK=topk, ACTIVATION=activation, EVEN_K=hidden % cfg.block_k == 0, **options,
    )
    _moe_down_kernel[(tiles, triton.cdiv(hidden, cfg.block_n))](
        h, down, topk_weights, y, *align, tokens * topk, hidden, inter, h.stride(0), down.stride(0), down.stride(1), y.stride(0),
        EVEN_K=inter % cfg.block_k == 0, **options,
    )
    block = min(_SUM_BLOCK, triton.next_power_of_2(hidden))
    _moe_sum_kernel[(tokens, triton.cdiv(hidden, block))](
        y, topk_ids, out, hidden, experts, y.stride(0), out.stride(0), TOPK=topk, BLOCK=block, num_warps=4,
    )
    return out


def ref_fused_moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``fused_moe`` in plain torch, rounded in the same places: one pass over each expert some
    pair picks (its tokens gathered, its weighted rows added back in fp32)."""
    check_activation(activation)
    tokens, topk = topk_ids.shape
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    bounds = torch.searchsorted(flat[order], torch.arange(gate_up.shape[0] + 1, dtype=flat.dtype, device=flat.device)).tolist()
    weights = topk_weights.reshape(-1).float()
    out = torch.zeros((tokens, x.shape[1]), dtype=torch.float32, device=x.device)
    for e, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        if lo == hi:
            continue
        pairs = order[lo:hi]
        rows = pairs // topk
        h = ref_act_and_mul(F.linear(x.index_select(0, rows), gate_up[e]), activation)
        out.index_add_(0, rows, F.linear(h.float(), down[e].float()) * weights[pairs, None])
    return out.to(x.dtype)
