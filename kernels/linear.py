"""Small-batch linear layer (GEMV) for decode: ``x @ weight.T + bias`` for a few rows of ``x``,
optionally of ``act_and_mul(x, activation)`` (``gated_linear``: the MLP's activation fused into ``down_proj``).

One program owns ``block_n`` output columns for every row of ``x``, so each weight
element is read from memory once, and walks K in ``block_k`` chunks, accumulating
in fp32. There is no split over K (on an H100, splitting the 1B model's o and down
projections in 2 or 4 with fp32 atomics measured slower) and no workspace: the
launch allocates only its output, so it can be captured in a CUDA graph.

With FP8 weights (E4M3 and a scale per output column: ``kernels/fp8.py``), ``fp8.quantize_rows``
first rounds the rows of x to E4M3 (the activation made there, for ``gated_linear``) in a launch of
its own, once, rather than in each of the GEMV's thousands of programs, unless the RMSNorm that made
x rounded them in its launch (``x_fp8``); the GEMV then reads half a bf16 weight's bytes and x in
E4M3, and scales its sums by the row's and the column's scales (with block scales, each group's sum
by its row's and its block's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from baton.kernels import pdl
from baton.kernels.activation import act_mul, check_activation, ref_act_and_mul
from baton.kernels.checks import check_contiguous, check_device, check_dtype, check_last_dim_contiguous, check_same_dtype, check_shape
from baton.kernels.fp8 import check_fp8_weight, check_x_fp8, fp8_input

MAX_GEMV_ROWS = 4  # the most rows of x the kernel takes: it keeps an fp32 accumulator per row

# The most rows for which ``ops.linear`` picks this kernel over cuBLAS. On an H100 (bf16,
# CUDA-graph replay, bench_kernels.py --linear-only) it beat cuBLAS on every Llama-3.2-1B and
# Llama-3-8B projection at 1 row and on all but the 1B qkv projection at 2 (7.4 vs 7.2 us);
# at 4 rows cuBLAS won on 7 of the 8.
MAX_DISPATCH_ROWS = 2


@dataclass(frozen=True)
class LinearConfig:
    """Launch parameters: output columns per program, K per loop step, warps, pipeline depth."""

    block_n: int = 2
    block_k: int = 2048
    num_warps: int = 4
    num_stages: int = 1


# At one row on an H100, the fastest or within 2% of it for each 1B projection, in sweeps over
# block_n 1-32, block_k 256-4096, 4 or 8 warps, 1 or 3 stages (a tl.dot version, 2-4 warps and
# 3-6 stages, was slower at one row and level with cuBLAS at four). FP8 weights over quantized
# rows too: on an H200 (bench_kernels.py --fp8-linear) two columns were the fastest of 2-16, or tied,
# for 14 of the 16 1B and 8B projections at one and two rows (8B gate_up 35.2 us against four's 36.2).
DEFAULT_CONFIG = LinearConfig()


@triton.jit
def _load_w(w_ptrs, k0, K, ks, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(w_ptrs + k0)
    return tl.load(w_ptrs + k0, mask=(k0 + ks < K)[None, None, :], other=0.0)


@triton.jit
def _load_x(x_ptrs, k0, K, ks, row_ok, ACTIVATION: tl.constexpr, EVEN_K: tl.constexpr):
    """Rows of x from ``k0``; with an ``ACTIVATION`` name (None: none), ``act(x[:, :K]) * x[:, K:]``
    as ``act_and_mul`` rounds it."""
    mask = row_ok if EVEN_K else row_ok & (k0 + ks < K)[None, None, :]
    x = tl.load(x_ptrs + k0, mask=mask, other=0.0)
    if ACTIVATION is not None:
        x = act_mul(x, tl.load(x_ptrs + K + k0, mask=mask, other=0.0), x_ptrs.dtype.element_ty, ACTIVATION)
    return x.to(tl.float32)


@triton.jit
def _tile_sums(x, w, k0, x_scale_ptr, w_scale_ptr, rows, row_ok, cols, col_ok, GROUPS,
               M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
               GROUP_K: tl.constexpr):
    """``[M_PAD, BLOCK_N]``: the products of one K tile summed over it; with block scales (``GROUP_K``
    > 0: E4M3 rows scaled per token and ``GROUP_K`` features, ``x_scale`` ``[M, GROUPS]``, the weight
    per ``GROUP_N x GROUP_K`` block, ``w_scale`` ``[ceil(N / GROUP_N), GROUPS]``), each group's sum
    times its row's and its block's scales first."""
    if GROUP_K == 0:
        sums = tl.sum(x * w, 2)
    else:
        sums = tl.sum(tl.reshape(x * w, [M_PAD, BLOCK_N, BLOCK_K // GROUP_K, GROUP_K]), 3)
        g = k0 // GROUP_K + tl.arange(0, BLOCK_K // GROUP_K)
        x_scale = tl.load(x_scale_ptr + rows[:, None] * GROUPS + g[None, :],
                          mask=row_ok[:, None] & (g < GROUPS)[None, :], other=0.0)
        w_scale = tl.load(w_scale_ptr + (cols // GROUP_N)[:, None] * GROUPS + g[None, :],
                          mask=col_ok[:, None] & (g < GROUPS)[None, :], other=0.0)
        sums = tl.sum(sums * x_scale[:, None, :] * w_scale[None, :, :], 2)
    return sums


@triton.jit
def _scale_sums(acc, x_scale_ptr, w_scale_ptr, rows, row_ok, cols, col_ok):
    """E4M3 products' sums ``acc`` ``[rows, cols]`` times their rows' scales, then their columns'."""
    acc *= tl.load(x_scale_ptr + rows, mask=row_ok, other=0.0)[:, None]
    return acc * tl.load(w_scale_ptr + cols, mask=col_ok, other=0.0)[None, :]


@triton.jit
def _gemv_columns(
    x_ptr, w_ptr, cols, col_ok, K, stride_xm, stride_wn,
    M: tl.constexpr, M_PAD: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    PDL: tl.constexpr, FP8: tl.constexpr, x_scale_ptr, w_scale_ptr, GROUPS, GROUP_N: tl.constexpr,
    GROUP_K: tl.constexpr,
):
    """fp32 ``[M_PAD, len(cols)]``: rows of x (zeros past M) times the weight rows ``cols``, each
    widened to fp32. With ``FP8`` (E4M3 rows and weights), their scales applied: block scales
    (``GROUP_K`` > 0) group by group (``_tile_sums``), per-channel ones to the sums (``_scale_sums``).
    Loads the first weight tile, then waits for the kernel before (which wrote x)."""
    rows = tl.arange(0, M_PAD)
    ks = tl.arange(0, BLOCK_K)
    # Tiles are [rows, cols, k]: weights [1, cols, BLOCK_K], x [M_PAD, 1, BLOCK_K], so every
    # thread holds all rows of x for its slice of K and one reduction serves every row.
    # Columns past N re-read weight row 0 (their results are never stored): the weight
    # loads need no mask along N.
    w_rows = tl.where(col_ok, cols, 0).to(tl.int64) * stride_wn
    w_ptrs = w_ptr + w_rows[None, :, None] + ks[None, None, :]
    x_ptrs = x_ptr + rows[:, None, None] * stride_xm + ks[None, None, :]
    row_ok = (rows < M)[:, None, None]
    # The first weight tile loads while the kernel before may still run.
    w = _load_w(w_ptrs, 0, K, ks, EVEN_K).to(tl.float32)
    pdl.wait(PDL)
    pdl.launch_dependents(PDL)
    acc = _tile_sums(_load_x(x_ptrs, 0, K, ks, row_ok, ACTIVATION, EVEN_K), w, 0, x_scale_ptr, w_scale_ptr, rows,
                     rows < M, cols, col_ok, GROUPS, M_PAD, cols.shape[0], BLOCK_K, GROUP_N, GROUP_K)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        w = _load_w(w_ptrs, k0, K, ks, EVEN_K).to(tl.float32)
        acc += _tile_sums(_load_x(x_ptrs, k0, K, ks, row_ok, ACTIVATION, EVEN_K), w, k0, x_scale_ptr, w_scale_ptr,
                          rows, rows < M, cols, col_ok, GROUPS, M_PAD, cols.shape[0], BLOCK_K, GROUP_N, GROUP_K)
    if FP8 and GROUP_K == 0:
        acc = _scale_sums(acc, x_scale_ptr, w_scale_ptr, rows, rows < M, cols, col_ok)
    return acc


@triton.jit
def _linear_kernel(
    x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, b_ptr, out_ptr,
    N, K, GROUPS, stride_xm, stride_wn, stride_om,
    M: tl.constexpr, M_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr, FP8: tl.constexpr,
    GROUP_N: tl.constexpr, GROUP_K: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rows = tl.arange(0, M_PAD)
    acc = _gemv_columns(x_ptr, w_ptr, cols, col_ok, K, stride_xm, stride_wn, M, M_PAD, ACTIVATION, BLOCK_K, EVEN_K, PDL,
                        FP8, x_scale_ptr, w_scale_ptr, GROUPS, GROUP_N, GROUP_K)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows < M)[:, None] & col_ok[None, :])


def takes_block(block: tuple[int, int], config: LinearConfig = DEFAULT_CONFIG) -> bool:
    """Whether the GEMV applies block scales ``(bn, bk)`` itself: a ``bk`` that is a power of two and
    divides ``config.block_k`` (128 in every published block-wise checkpoint); else the reference."""
    bk = block[1]
    return bk & (bk - 1) == 0 and config.block_k % bk == 0


def _check_linear_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gated: bool,
                       weight_scale: torch.Tensor | None = None, block: tuple[int, int] | None = None,
                       config: LinearConfig = DEFAULT_CONFIG, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    check_shape("x", x, (-1, -1))
    if x.shape[0] > MAX_GEMV_ROWS:
        raise ValueError(f"x has {x.shape[0]} rows; this kernel takes at most MAX_GEMV_ROWS={MAX_GEMV_ROWS}")
    check_dtype("x", x)
    check_last_dim_contiguous("x", x)
    if gated and x.shape[1] % 2:
        raise ValueError(f"a gated x has gate then up halves: its width must be even, got {x.shape[1]}")
    check_shape("weight", weight, (-1, x.shape[1] // 2 if gated else x.shape[1]))
    if weight_scale is None:
        check_device("weight", weight, x)
        check_same_dtype("weight", weight, "x", x)
        check_contiguous("weight", weight)
    else:
        check_fp8_weight(weight, weight_scale, x, weight.shape[1], block)
        if block is not None and not takes_block(block, config):
            raise ValueError(f"block {tuple(block)} is not taken by tiles of block_k={config.block_k}: its bk must be a "
                             "power of two that divides block_k")
    if bias is not None:
        check_shape("bias", bias, (weight.shape[0],))
        check_device("bias", bias, x)
        check_same_dtype("bias", bias, "x", x)
        check_last_dim_contiguous("bias", bias)
    check_x_fp8(x_fp8, x, weight_scale, block, gated)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           weight_scale: torch.Tensor | None = None, block: tuple[int, int] | None = None,
           x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``x`` ``[M, K]`` (M <= ``MAX_GEMV_ROWS``), ``weight`` ``[N, K]``, ``bias`` ``[N]`` or None,
    all of one float dtype -> ``[M, N]`` in that dtype, accumulated in fp32. With ``weight_scale``
    ``[N]`` (fp32), ``weight`` is E4M3 and this is ``fp8.ref_fp8_linear``; with a ``block`` too
    (``takes_block``), ``weight_scale`` has one scale per block and this is ``fp8.ref_fp8_block_linear``.
    ``x_fp8``: FP8 weights' rows of ``x`` quantized before (per token, or per group with a ``block``:
    ``fp8.check_x_fp8``), read as they are. With PDL, the weights load before the kernel just before
    this one has finished: it must not write them."""
    return launch_linear(x, weight, bias, DEFAULT_CONFIG, weight_scale=weight_scale, block=block, x_fp8=x_fp8)


def gated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 activation: str = "silu", weight_scale: torch.Tensor | None = None,
                 block: tuple[int, int] | None = None) -> torch.Tensor:
    """``linear(act_and_mul(x, activation), weight, bias, weight_scale, block)`` in one launch (two with
    FP8 weights: the rows' quantization makes the activation): ``x`` ``[M, 2K]`` (gate then up)."""
    return launch_linear(x, weight, bias, DEFAULT_CONFIG, gated=True, activation=activation, weight_scale=weight_scale,
                         block=block)


def launch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: LinearConfig,
                  gated: bool = False, activation: str = "silu", weight_scale: torch.Tensor | None = None,
                  block: tuple[int, int] | None = None, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``linear`` (or ``gated_linear``) with explicit launch parameters (tests and benchmarks pick them)."""
    check_activation(activation)
    _check_linear_args(x, weight, bias, gated, weight_scale, block, config, x_fp8)
    (m, _), (n, k) = x.shape, weight.shape
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x_scale = weight
    if weight_scale is not None:
        x, x_scale = fp8_input(x, block, activation if gated else None, x_fp8)
        gated = False
    group_n, group_k = (0, 0) if block is None else block
    _linear_kernel[(triton.cdiv(n, config.block_n),)](
        x, x_scale, weight, weight if weight_scale is None else weight_scale, weight if bias is None else bias, out,
        n, k, -(-k // group_k) if group_k else 0, x.stride(0), weight.stride(0), out.stride(0),
        M=m, M_PAD=triton.next_power_of_2(m), HAS_BIAS=bias is not None, ACTIVATION=activation if gated else None,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN_K=k % config.block_k == 0, FP8=weight_scale is not None,
        GROUP_N=group_n, GROUP_K=group_k, num_warps=config.num_warps, num_stages=config.num_stages,
        **pdl.launch_options(x),
    )
    return out


def ref_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``[M, K]``, ``weight`` ``[N, K]``, ``bias`` ``[N]`` or None -> ``[M, N]``."""
    return F.linear(x, weight, bias)


def ref_gated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     activation: str = "silu") -> torch.Tensor:
    """``x`` ``[M, 2K]`` (gate then up), ``weight`` ``[N, K]``, ``bias`` ``[N]`` or None -> ``[M, N]``."""
    return F.linear(ref_act_and_mul(x, activation), weight, bias)
