"""Small-batch linear layer (GEMV) for decode: ``x @ weight.T + bias`` for a few rows of ``x``.

One program owns ``block_n`` output columns for every row of ``x``, so each weight
element is read from memory once, and walks K in ``block_k`` chunks, accumulating
in fp32. There is no split over K (on an H100, splitting the 1B model's o and down
projections in 2 or 4 with fp32 atomics measured slower) and no workspace: the
launch allocates only its output, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from baton.kernels.checks import check_contiguous, check_device, check_dtype, check_last_dim_contiguous, check_same_dtype, check_shape

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
# 3-6 stages, was slower at one row and level with cuBLAS at four).
DEFAULT_CONFIG = LinearConfig()


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    N, K, stride_xm, stride_wn, stride_om,
    M: tl.constexpr, M_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rows = tl.arange(0, M_PAD)
    ks = tl.arange(0, BLOCK_K)
    # Tiles are [rows, cols, k]: weights [1, BLOCK_N, BLOCK_K], x [M_PAD, 1, BLOCK_K], so every
    # thread holds all rows of x for its slice of K and one reduction serves every row.
    # Columns past N re-read weight row 0 (their results are never stored): the weight
    # loads need no mask along N.
    w_rows = tl.where(col_ok, cols, 0).to(tl.int64) * stride_wn
    w_ptrs = w_ptr + w_rows[None, :, None] + ks[None, None, :]
    x_ptrs = x_ptr + rows[:, None, None] * stride_xm + ks[None, None, :]
    row_ok = (rows < M)[:, None, None]
    acc = tl.zeros([M_PAD, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs + k0)
            x = tl.load(x_ptrs + k0, mask=row_ok, other=0.0)
        else:
            k_ok = (k0 + ks < K)[None, None, :]
            w = tl.load(w_ptrs + k0, mask=k_ok, other=0.0)
            x = tl.load(x_ptrs + k0, mask=row_ok & k_ok, other=0.0)
        acc += tl.sum(x.to(tl.float32) * w.to(tl.float32), 2)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows < M)[:, None] & col_ok[None, :])


def _check_linear_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_shape("x", x, (-1, -1))
    if x.shape[0] > MAX_GEMV_ROWS:
        raise ValueError(f"x has {x.shape[0]} rows; this kernel takes at most MAX_GEMV_ROWS={MAX_GEMV_ROWS}")
    check_dtype("x", x)
    check_last_dim_contiguous("x", x)
    check_shape("weight", weight, (-1, x.shape[1]))
    check_device("weight", weight, x)
    check_same_dtype("weight", weight, "x", x)
    check_contiguous("weight", weight)
    if bias is not None:
        check_shape("bias", bias, (weight.shape[0],))
        check_device("bias", bias, x)
        check_same_dtype("bias", bias, "x", x)
        check_last_dim_contiguous("bias", bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``[M, K]`` (M <= ``MAX_GEMV_ROWS``), ``weight`` ``[N, K]``, ``bias`` ``[N]`` or None,
    all of one float dtype -> ``[M, N]`` in that dtype, accumulated in fp32."""
    return launch_linear(x, weight, bias, DEFAULT_CONFIG)


def launch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: LinearConfig) -> torch.Tensor:
    """``linear`` with explicit launch parameters (tests and benchmarks pick them)."""
    _check_linear_args(x, weight, bias)
    (m, k), n = x.shape, weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    _linear_kernel[(triton.cdiv(n, config.block_n),)](
        x, weight, weight if bias is None else bias, out,
        n, k, x.stride(0), weight.stride(0), out.stride(0),
        M=m, M_PAD=triton.next_power_of_2(m), HAS_BIAS=bias is not None,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN_K=k % config.block_k == 0,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def ref_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``[M, K]``, ``weight`` ``[N, K]``, ``bias`` ``[N]`` or None -> ``[M, N]``."""
    return F.linear(x, weight, bias)
