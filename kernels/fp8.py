"""FP8 (E4M3) linear layers: weights quantized per output channel, activations per token as they
come (vLLM's "fp8" with dynamic per-token scales, W8A8).

What an FP8 linear layer computes (``ref_fp8_linear`` defines it), on every path: each row of ``x``
is multiplied by the reciprocal of its scale (its largest magnitude times the float32 of 1/448, E4M3's
largest finite value) and rounded to E4M3 (``quantize_rows``); the E4M3 products accumulate in fp32
and are scaled back by the row's and the output channel's scales, then the bias is added, and the
result rounded once to ``x``'s dtype. Weights are quantized the same way along their output channels
(``ref_quantize_rows``, at load).

On CUDA, the rows are quantized by ``quantize_rows``' kernel (the MLP's activation made in the same
launch), or by the RMSNorm that makes them (``norm.rms_norm_fp8``; the products take them as
``x_fp8``: ``check_x_fp8``), then multiplied: a decode step's few rows (``linear.MAX_DISPATCH_ROWS``) by the Triton
GEMV, which reads half a bf16 weight's bytes; more rows by cuBLAS's FP8 GEMM (``torch._scaled_mm``,
row-wise scales) where it takes them (bf16, dims multiples of 16) and is the faster (past a decode
batch's ``TRITON_GEMM_ROWS``), else by a Triton GEMM on FP8 tensor cores that scales its sums once
(``fp8_linear``). Both need a GPU with 8-bit float arithmetic (compute capability 8.9+: the engine
refuses FP8 weights on older ones). On the CPU the torch reference runs.

Block-wise FP8 (DeepSeek-V3's and Qwen3-*-FP8's checkpoints): the weight has one scale per
``bn x bk`` block (``weight_scale`` ``[ceil(N / bn), ceil(K / bk)]``), and each row of ``x`` is
quantized per group of ``bk`` consecutive features, each group scaled as a row is above
(``ref_quantize_groups``). ``ref_fp8_block_linear`` defines what such a layer computes: the sum over
``k`` of the dequantized product ``(xq[m, k] * xs[m, k // bk]) * (wq[n, k] * ws[n // bn, k // bk])``
in fp32, plus the bias, rounded once to ``x``'s dtype. On CUDA the rows are quantized by
``quantize_groups``' kernel (or per group by the RMSNorm that makes them, taken as ``x_fp8``), then
multiplied: a decode step's few rows by the Triton GEMV, which scales each group's sum by its row's
and its block's scales (a ``bk`` that is a power of two: ``linear.takes_block``); past a decode
batch's ``TRITON_GEMM_ROWS`` by cuBLAS's block-scaled FP8 GEMM where it takes DeepSeek's recipe
(``CUBLAS_BLOCK``, bf16, Hopper; on an H100 right, and at 512 and 4,096 rows 1.25-1.6x bf16's speed
on Llama-3-8B's shapes, the rows' quantization included: ``bench/results/kernels_h100.md``), else by
a Triton GEMM on FP8 tensor cores that scales each group's product the same way
(``block_fp8_linear``; at prefill's rows slower than cuBLAS's on every Llama-3-8B shape on an H200:
``bench/results/kernels_h200.md``). Elsewhere the reference runs: correct, not fast (it dequantizes
the whole weight on each call).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from baton.kernels import pdl
from baton.kernels.activation import act_mul, check_activation, ref_act_and_mul
from baton.kernels.checks import check_contiguous, check_device, check_dtype, check_shape

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0             # E4M3's largest finite value
MIN_SCALE_AMAX = 1e-12      # a row of zeros still gets a positive scale


@triton.jit
def quantize_value(x, inv_scale):
    """fp32 ``x`` times its row's ``inv_scale``, saturated and rounded to E4M3 (to nearest even)."""
    return tl.clamp(x * inv_scale, -448.0, 448.0).to(tl.float8e4nv)


@triton.jit
def row_scale(amax):
    """The scale of a row whose largest magnitude is ``amax`` (times the float32 of 1/448, as the
    reference multiplies: torch on CUDA divides by a scalar so), and its reciprocal (IEEE)."""
    scale = tl.maximum(amax, 1e-12) * (1.0 / 448.0)
    return scale, tl.div_rn(1.0, scale)


@triton.jit
def _load_row(row_ptr, offs, K, ACTIVATION: tl.constexpr):
    """A row's values at ``offs`` in fp32; with an ``ACTIVATION`` name, of ``act(row[:K]) * row[K:]``
    as ``act_and_mul`` rounds it."""
    x = tl.load(row_ptr + offs, mask=offs < K, other=0.0)
    if ACTIVATION is not None:
        x = act_mul(x, tl.load(row_ptr + K + offs, mask=offs < K, other=0.0), row_ptr.dtype.element_ty, ACTIVATION)
    return x.to(tl.float32)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, K, stride_x, ACTIVATION: tl.constexpr, BLOCK_K: tl.constexpr,
                          ONE_TILE: tl.constexpr, PDL: tl.constexpr):
    row_ptr = x_ptr + tl.program_id(0).to(tl.int64) * stride_x
    q_row = q_ptr + tl.program_id(0).to(tl.int64) * K
    ks = tl.arange(0, BLOCK_K)
    pdl.wait(PDL)
    pdl.launch_dependents(PDL)
    if ONE_TILE:
        x = _load_row(row_ptr, ks, K, ACTIVATION)
        scale, inv_scale = row_scale(tl.max(tl.abs(x), 0))
        tl.store(scale_ptr + tl.program_id(0), scale)
        tl.store(q_row + ks, quantize_value(x, inv_scale), mask=ks < K)
    else:
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            amax = tl.maximum(amax, tl.abs(_load_row(row_ptr, k0 + ks, K, ACTIVATION)))
        scale, inv_scale = row_scale(tl.max(amax, 0))
        tl.store(scale_ptr + tl.program_id(0), scale)
        for k0 in range(0, K, BLOCK_K):
            x = _load_row(row_ptr, k0 + ks, K, ACTIVATION)
            tl.store(q_row + k0 + ks, quantize_value(x, inv_scale), mask=k0 + ks < K)


def _check_rows(x: torch.Tensor) -> None:
    check_shape("x", x, (-1, -1))
    check_dtype("x", x)
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"x must be contiguous in its last dim, got strides {tuple(x.stride())}")


def _check_group(group: int) -> None:
    if not isinstance(group, int) or group <= 0:
        raise ValueError(f"group must be a positive int, got {group!r}")


def _quantized_width(x: torch.Tensor, activation: str | None) -> int:
    """The width of the rows ``x`` quantizes to: its own, or with an ``activation`` half of it."""
    _check_rows(x)
    if activation is None:
        return x.shape[1]
    check_activation(activation)
    if x.shape[1] % 2:
        raise ValueError(f"a gated x has gate then up halves: its width must be even, got {x.shape[1]}")
    return x.shape[1] // 2


def quantize_rows(x: torch.Tensor, block_k: int = 16384, activation: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[M, K]`` (a float dtype, CUDA) -> its rows in E4M3 ``[M, K]`` and their fp32 scales
    ``[M]``: one program a row. A row of up to ``block_k`` features is one tile, loaded once and kept in
    registers (4 to 16 warps, 32 values a thread at most); a wider one is read twice, tile by tile (its
    largest magnitude, then the rounding). With an ``activation`` (``activation.ACTIVATIONS``), ``x`` is
    ``[M, 2K]`` (gate then up) and the rows quantized are ``act_and_mul(x, activation)``'s, made in the
    same launch."""
    m, k = x.shape[0], _quantized_width(x, activation)
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m and k:
        tile = min(block_k, triton.next_power_of_2(k))
        _quantize_rows_kernel[(m,)](x, q, scale, k, x.stride(0), ACTIVATION=activation, BLOCK_K=tile, ONE_TILE=tile >= k,
                                    num_warps=min(16, max(4, tile // 512)), **pdl.launch_options(x))
    return q, scale


@triton.jit
def _quantize_groups_kernel(x_ptr, q_ptr, scale_ptr, K, GROUPS, stride_x, stride_q, stride_sm, stride_sg,
                            GROUP: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr,
                            TILE_GROUPS: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    groups = tl.program_id(1) * TILE_GROUPS + tl.arange(0, TILE_GROUPS)
    ks = tl.arange(0, BLOCK)
    # [TILE_GROUPS, BLOCK] places in the row. BLOCK is GROUP rounded up to a power of two: a lane past
    # its group's end gets K, as one past the row has, and reads and writes nothing. A group of a power
    # of two needs no such lanes, and its offsets left plain keep the loads and stores vectorized.
    offs = groups[:, None] * GROUP + ks[None, :]
    if BLOCK != GROUP:
        offs = tl.where((ks < GROUP)[None, :], offs, K)
    pdl.wait(PDL)
    pdl.launch_dependents(PDL)
    x = _load_row(x_ptr + row * stride_x, offs, K, ACTIVATION)
    scale, inv_scale = row_scale(tl.max(tl.abs(x), 1))
    tl.store(scale_ptr + row * stride_sm + groups * stride_sg, scale, mask=groups < GROUPS)
    tl.store(q_ptr + row * stride_q + offs, quantize_value(x, inv_scale[:, None]), mask=offs < K)


def _launch_quantize_groups(x: torch.Tensor, group: int, activation: str | None, q: torch.Tensor,
                            scale: torch.Tensor) -> None:
    """Quantize ``x``'s rows per ``group`` into ``q`` ``[M, K]`` and ``scale`` ``[M, ceil(K / group)]``
    (any strides: cuBLAS reads its scales column by column)."""
    (m, k), groups = q.shape, scale.shape[1]
    if not (m and k):
        return
    block = triton.next_power_of_2(group)
    tile_groups = max(1, min(triton.next_power_of_2(groups), 4096 // block))
    _quantize_groups_kernel[(m, triton.cdiv(groups, tile_groups))](
        x, q, scale, k, groups, x.stride(0), q.stride(0), scale.stride(0), scale.stride(1), GROUP=group,
        ACTIVATION=activation, BLOCK=block, TILE_GROUPS=tile_groups, num_warps=min(8, max(4, tile_groups * block // 512)),
        **pdl.launch_options(x))


def quantize_groups(x: torch.Tensor, group: int, activation: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``ref_quantize_groups`` on CUDA (``x`` of a float dtype): ``x`` ``[M, K]`` -> E4M3 ``[M, K]`` and
    fp32 scales ``[M, ceil(K / group)]``, one program per row and run of up to 4,096 features' groups.
    With an ``activation``, ``x`` is ``[M, 2K]`` and ``act_and_mul(x, activation)``'s rows are
    quantized, as ``quantize_rows`` does."""
    k = _quantized_width(x, activation)
    _check_group(group)
    q = torch.empty((x.shape[0], k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((x.shape[0], -(-k // group)), dtype=torch.float32, device=x.device)
    _launch_quantize_groups(x, group, activation, q, scale)
    return q, scale


def check_x_fp8(x_fp8: tuple[torch.Tensor, torch.Tensor] | None, x: torch.Tensor, weight_scale: torch.Tensor | None,
                block: tuple[int, int] | None, gated: bool = False) -> None:
    """``x_fp8`` is None, or ``x``'s rows quantized before (``norm.rms_norm_fp8``, ``quantize_rows``,
    ``quantize_groups``: E4M3 ``[M, K]`` and fp32 scales, contiguous, on ``x``'s device) for a product
    that takes them: an FP8 weight (``weight_scale``), not gated (a gated product makes its activation
    as it quantizes). Scaled per output channel, it takes rows scaled per token (scales ``[M]``); with
    a ``block`` ``(bn, bk)``, per token and group of ``bk`` (scales ``[M, ceil(K / bk)]``)."""
    if x_fp8 is None:
        return
    if weight_scale is None:
        raise ValueError("x_fp8 is for FP8 weights: this weight has no weight_scale")
    if gated:
        raise ValueError("x_fp8 holds rows quantized as they are: a gated product makes its activation as it quantizes")
    q, scale = x_fp8
    check_shape("x_fp8's rows", q, tuple(x.shape))
    check_dtype("x_fp8's rows", q, (FP8_DTYPE,))
    check_shape("x_fp8's scales", scale, (x.shape[0],) if block is None else (x.shape[0], -(-x.shape[1] // block[1])))
    check_dtype("x_fp8's scales", scale, (torch.float32,))
    for name, t in (("x_fp8's rows", q), ("x_fp8's scales", scale)):
        check_device(name, t, x)
        check_contiguous(name, t)


def fp8_input(x: torch.Tensor, block: tuple[int, int] | None, activation: str | None = None,
              x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The E4M3 rows and scales an FP8 product over ``x`` takes (CUDA): ``x_fp8`` where the rows were
    quantized before (its caller checked it: ``check_x_fp8``), else ``x`` quantized now, per token
    (``quantize_rows``) or with a ``block`` per group of ``block[1]`` (``quantize_groups``), with the
    ``activation`` made first where one is named."""
    if x_fp8 is not None:
        return x_fp8
    return quantize_rows(x, activation=activation) if block is None else quantize_groups(x, block[1], activation)


def ref_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[M, K]`` -> ``(E4M3 [M, K], fp32 scales [M])``: each row times the reciprocal of its
    scale (its largest magnitude times the float32 of 1/448), saturated and rounded to nearest even."""
    xf = x.float()
    scale = xf.abs().amax(dim=1).clamp(min=MIN_SCALE_AMAX) * (1.0 / FP8_MAX)
    return (xf * (1.0 / scale)[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def check_fp8_weight(weight: torch.Tensor, weight_scale: torch.Tensor, x: torch.Tensor, in_features: int,
                     block: tuple[int, int] | None = None) -> None:
    """An E4M3 ``weight`` ``[N, in_features]`` (contiguous, on ``x``'s device) and its fp32
    ``weight_scale``: ``[N]``, or with a ``block`` ``(bn, bk)`` of two positive ints one per block,
    ``[ceil(N / bn), ceil(in_features / bk)]``."""
    check_shape("weight", weight, (-1, in_features))
    check_dtype("weight", weight, (FP8_DTYPE,))
    check_device("weight", weight, x)
    check_contiguous("weight", weight)
    if block is None:
        check_shape("weight_scale", weight_scale, (weight.shape[0],))
    else:
        if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
            raise ValueError(f"block must be two positive ints (bn, bk), got {block!r}")
        check_shape("weight_scale", weight_scale, (-(-weight.shape[0] // block[0]), -(-in_features // block[1])))
    check_dtype("weight_scale", weight_scale, (torch.float32,))
    check_device("weight_scale", weight_scale, x)
    check_contiguous("weight_scale", weight_scale)


def ref_fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None = None, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``x`` ``[M, K]``, E4M3 ``weight`` ``[N, K]``, ``weight_scale`` ``[N]``, ``bias`` ``[N]`` or None
    -> ``[M, N]`` in ``x``'s dtype, as the module docstring defines it; ``x_fp8``: ``x``'s rows
    quantized before (``check_x_fp8``), taken as they are."""
    _check_rows(x)
    check_fp8_weight(weight, weight_scale, x, x.shape[1])
    check_x_fp8(x_fp8, x, weight_scale, None)
    q, scale = ref_quantize_rows(x) if x_fp8 is None else x_fp8
    out = (q.float() @ weight.float().t()) * scale[:, None] * weight_scale[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def ref_quantize_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[M, K]`` -> ``(E4M3 [M, K], fp32 scales [M, ceil(K / group)])``: each run of ``group``
    consecutive features of a row (the last one shorter where ``group`` does not divide ``K``)
    quantized as ``ref_quantize_rows`` quantizes a row."""
    _check_rows(x)
    _check_group(group)
    m, k = x.shape
    groups = -(-k // group)
    q, scale = ref_quantize_rows(F.pad(x.float(), (0, groups * group - k)).view(m * groups, group))
    return q.view(m, groups * group)[:, :k].contiguous(), scale.view(m, groups)


def _dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """E4M3 ``q`` ``[R, C]`` in fp32, each value times the scale of its ``block`` (rows x columns):
    ``scale`` ``[ceil(R / block[0]), ceil(C / block[1])]``."""
    (rows, cols), (br, bc), (sr, sc) = q.shape, block, scale.shape
    padded = F.pad(q.float(), (0, sc * bc - cols, 0, sr * br - rows)).view(sr, br, sc, bc)
    return (padded * scale[:, None, :, None]).view(sr * br, sc * bc)[:rows, :cols]


def ref_fp8_block_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, block: tuple[int, int],
                         bias: torch.Tensor | None = None, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
                         ) -> torch.Tensor:
    """``x`` ``[M, K]``, E4M3 ``weight`` ``[N, K]`` with a scale per ``block`` ``(bn, bk)``
    (``weight_scale`` ``[ceil(N / bn), ceil(K / bk)]``), ``bias`` ``[N]`` or None -> ``[M, N]`` in
    ``x``'s dtype: ``x`` quantized per token and group of ``bk`` features (``ref_quantize_groups``;
    ``x_fp8``: so quantized before, taken as they are), then
    ``out[m, n] = sum_k (xq[m, k] * xs[m, k // bk]) * (wq[n, k] * ws[n // bn, k // bk])`` in fp32,
    plus the bias, rounded once. The one path for block-scaled weights on every device (not fast)."""
    _check_rows(x)
    check_fp8_weight(weight, weight_scale, x, x.shape[1], block)
    check_x_fp8(x_fp8, x, weight_scale, block)
    q, scale = ref_quantize_groups(x, block[1]) if x_fp8 is None else x_fp8
    out = _dequantize_blocks(q, scale, (1, block[1])) @ _dequantize_blocks(weight, weight_scale, block).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


@functools.lru_cache(maxsize=8)
def _has_fp8_tensor_cores(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 9)


# Up to this many rows (a decode batch) the Triton GEMM in narrow tiles (``_launch_fp8_gemm``) reads
# the weight faster than cuBLAS's FP8 GEMMs: on an H100, Llama-3-8B's four projections at 16 and 64
# rows took 0.63-0.92x cuBLAS's time per channel (o_proj at 64 rows: 10.0 against 13.9 us), where
# 128-wide N tiles give a 4,096-wide output 32 programs for 132 SMs; per 128 x 128 block, with the
# group quantization, a layer's four took 1.0x cuBLAS's block-scaled GEMMs' time at 3-16 rows and
# 0.94-0.96x at 32-64 (down_proj alone 1.24-1.27x at 3-16 rows). (Shared memory: 96 KB a program on
# sm_90, 80 KB on sm_89, within Ada's 99 KB.)
TRITON_GEMM_ROWS = 64


def _cublas_takes_rows(x: torch.Tensor, n: int, k: int) -> bool:
    """cuBLAS's FP8 GEMM with row-wise scales, where it is the faster: past ``TRITON_GEMM_ROWS``
    rows, bf16 ``x`` (the one output dtype it takes with them), both dims multiples of 16."""
    return x.shape[0] > TRITON_GEMM_ROWS and x.dtype == torch.bfloat16 and n % 16 == 0 and k % 16 == 0


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
               activation: str | None = None) -> torch.Tensor:
    """``ref_fp8_linear`` for CUDA ``x`` of any number of rows: ``quantize_rows`` (unless ``x_fp8``
    holds the rows quantized before; with an ``activation``, ``x`` is ``[M, 2K]`` and the rows are
    ``act_and_mul(x, activation)``'s, made as they are quantized), then cuBLAS's FP8 GEMM with both
    row-wise scales where it takes the dtype and the shapes and is the faster (``_cublas_takes_rows``),
    else the Triton GEMM on FP8 tensor cores (``_fp8_gemm_kernel``: decode batches, fp16 and fp32
    models, any dims); the reference on a GPU without 8-bit float arithmetic."""
    k = _quantized_width(x, activation)
    check_fp8_weight(weight, weight_scale, x, k)
    check_x_fp8(x_fp8, x, weight_scale, None, activation is not None)
    if not (x.shape[0] and _has_fp8_tensor_cores(x.device)):
        rows = x if activation is None else ref_act_and_mul(x, activation)
        return ref_fp8_linear(rows, weight, weight_scale, bias, x_fp8)
    if not _cublas_takes_rows(x, *weight.shape):
        return triton_fp8_linear(x, weight, weight_scale, None, bias, x_fp8, activation)
    q, scale = fp8_input(x, None, activation, x_fp8)
    out = torch._scaled_mm(q, weight.t(), scale_a=scale[:, None], scale_b=weight_scale[None, :],
                           out_dtype=torch.bfloat16)
    return out if bias is None else out + bias


# cuBLAS's block-scaled FP8 GEMM (CUDA 12.9+, through ``torch._scaled_mm``) takes DeepSeek's recipe:
# x scaled per token and 128 features, the weight per 128 x 128 block, on Hopper (compute capability
# 9.0) alone, as PyTorch's check for it says.
CUBLAS_BLOCK = (128, 128)


def _cublas_takes_blocks(x: torch.Tensor, n: int, k: int, block: tuple[int, int]) -> bool:
    """cuBLAS's recipe, on shapes it computes right: on an H100 (torch 2.11, CUDA 13.0), K = 640 (five
    groups a row) gave wrong sums where K = 512 and 4,096 were right, so K must be whole fours of groups."""
    return (x.dtype == torch.bfloat16 and tuple(block) == CUBLAS_BLOCK and n % 128 == 0 and k % 512 == 0
            and torch.cuda.get_device_capability(x.device) == (9, 0))


def scaled_mm_block_fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                               block: tuple[int, int], bias: torch.Tensor | None = None) -> torch.Tensor:
    """``ref_fp8_block_linear`` for CUDA ``x`` of any number of rows: ``quantize_groups``, then
    cuBLAS's block-scaled FP8 GEMM where it takes the block, the shapes and the GPU (``CUBLAS_BLOCK``,
    bf16 ``x``); the reference otherwise. cuBLAS reads the rows' scales column by column and in whole
    fours of rows: the quantization writes them so, and zero rows pad x to a multiple of four."""
    _check_rows(x)
    check_fp8_weight(weight, weight_scale, x, x.shape[1], block)
    if not (x.shape[0] and _cublas_takes_blocks(x, weight.shape[0], x.shape[1], block)):
        return ref_fp8_block_linear(x, weight, weight_scale, block, bias)
    return _cublas_block_fp8_linear(x, weight, weight_scale, bias)


def _cublas_block_fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                             bias: torch.Tensor | None, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
                             activation: str | None = None) -> torch.Tensor:
    """``scaled_mm_block_fp8_linear``'s cuBLAS path alone (its caller checks the arguments and that
    cuBLAS takes them); ``x_fp8``'s rows, quantized before, taken as they are where they come in
    whole fours (their scales transposed into cuBLAS's layout), else copied in; with an
    ``activation``, of ``act_and_mul(x, activation)``. Zero rows pad x only where it needs them: a
    small model's prefill waits on this host work (``bench/results/model_h100.md``)."""
    m, k = x.shape[0], weight.shape[1]
    rows = -(-m // 4) * 4
    if x_fp8 is not None and rows == m:
        q, scale = x_fp8[0], x_fp8[1].t().contiguous().t()
    else:
        q = torch.empty((rows, k), dtype=FP8_DTYPE, device=x.device)
        scale = torch.empty((k // 128, rows), dtype=torch.float32, device=x.device).t()
        if rows > m:
            q[m:].view(torch.uint8).zero_()
            scale[m:].zero_()
        if x_fp8 is None:
            _launch_quantize_groups(x, 128, activation, q[:m], scale[:m])
        else:
            q[:m].copy_(x_fp8[0])
            scale[:m].copy_(x_fp8[1])
    out = torch._scaled_mm(q, weight.t(), scale_a=scale, scale_b=weight_scale.t(), out_dtype=torch.bfloat16)[:m]
    return out if bias is None else out + bias


@triton.jit
def _fp8_gemm_kernel(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, bias_ptr, c_ptr, M, N, K, GROUPS,
                     stride_am, stride_bn, stride_cm,
                     PER_BLOCK: tl.constexpr, GROUP_N: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWIZZLE: tl.constexpr):
    """``c = a @ b.T`` for E4M3 ``a`` ``[M, K]`` and ``b`` ``[N, K]`` on FP8 tensor cores, the sums
    kept by the MMA, with fewer bits than fp32's (CUTLASS's "fast accumulation": on an H100, 1.3e-3
    relative at K = 4,096; promoting them to fp32 each K step gave 1.3e-4 at 0.71-0.81x the speed).
    ``PER_BLOCK``: ``a`` scaled per row and ``BLOCK_K`` features (``a_scale`` ``[M, GROUPS]``), ``b``
    per ``GROUP_N x BLOCK_K`` block (``b_scale`` ``[ceil(N / GROUP_N), GROUPS]``): one K step a group,
    its product scaled by its row's and its block's scales before it joins the sum in fp32. Else ``a``
    per row and ``b`` per output channel (``a_scale`` ``[M]``, ``b_scale`` ``[N]``: ``GROUPS`` and
    ``GROUP_N`` 1): the whole sum scaled once."""
    # Programs walk SWIZZLE rows of tiles down a column before the next column: b's tiles stay in L2.
    pid, tiles_m, tiles_n = tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = pid // (SWIZZLE * tiles_n) * SWIZZLE
    rows_here = tl.minimum(tiles_m - first_m, SWIZZLE)
    pid_m = first_m + pid % (SWIZZLE * tiles_n) % rows_here
    pid_n = pid % (SWIZZLE * tiles_n) // rows_here
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
    b_ptrs = b_ptr + rn.to(tl.int64)[None, :] * stride_bn + rk[:, None]
    a_scale_ptrs = a_scale_ptr + rm.to(tl.int64) * GROUPS
    b_scale_ptrs = b_scale_ptr + (rn // GROUP_N).to(tl.int64) * GROUPS
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = g * BLOCK_K + rk < K
        a = tl.load(a_ptrs + g * BLOCK_K, mask=(rm < M)[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs + g * BLOCK_K, mask=(rn < N)[None, :] & k_ok[:, None], other=0.0)
        if PER_BLOCK:
            a_scale = tl.load(a_scale_ptrs + g, mask=rm < M, other=0.0)
            b_scale = tl.load(b_scale_ptrs + g, mask=rn < N, other=0.0)
            acc += tl.dot(a, b) * a_scale[:, None] * b_scale[None, :]
        else:
            acc = tl.dot(a, b, acc)
    if not PER_BLOCK:
        acc *= tl.load(a_scale_ptrs, mask=rm < M, other=0.0)[:, None] * tl.load(b_scale_ptrs, mask=rn < N, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


def triton_takes_blocks(block: tuple[int, int]) -> bool:
    """Whether ``block_fp8_linear``'s GEMM takes ``(bn, bk)``: a ``bk`` that is a power of two from 32
    (Triton's smallest K for an 8-bit dot) to 256 (one tensor-core K step a group)."""
    bk = block[1]
    return bk & (bk - 1) == 0 and 32 <= bk <= 256


def block_fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, block: tuple[int, int],
                     bias: torch.Tensor | None = None, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
                     activation: str | None = None) -> torch.Tensor:
    """``ref_fp8_block_linear`` for CUDA ``x`` of any number of rows: past a decode batch's
    ``TRITON_GEMM_ROWS``, cuBLAS's block-scaled GEMM where it takes the recipe and the shapes
    (``scaled_mm_block_fp8_linear``: measured right on an H100); else ``quantize_groups`` (unless
    ``x_fp8`` holds the rows quantized before), then a Triton GEMM on FP8 tensor cores
    (``_fp8_gemm_kernel``; 8-bit float arithmetic, compute capability 8.9+) where it takes the block
    (``triton_takes_blocks``); else the reference. With an ``activation``, as ``fp8_linear``: ``x``
    ``[M, 2K]``, the activation made as the rows are quantized."""
    k = _quantized_width(x, activation)
    check_fp8_weight(weight, weight_scale, x, k, block)
    check_x_fp8(x_fp8, x, weight_scale, block, activation is not None)
    if x.shape[0] > TRITON_GEMM_ROWS and _cublas_takes_blocks(x, weight.shape[0], k, block):
        return _cublas_block_fp8_linear(x, weight, weight_scale, bias, x_fp8, activation)
    if not (x.shape[0] and triton_takes_blocks(block) and _has_fp8_tensor_cores(x.device)):
        rows = x if activation is None else ref_act_and_mul(x, activation)
        return ref_fp8_block_linear(rows, weight, weight_scale, block, bias, x_fp8)
    return triton_fp8_linear(x, weight, weight_scale, block, bias, x_fp8, activation)


def triton_fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      block: tuple[int, int] | None = None, bias: torch.Tensor | None = None,
                      x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None, activation: str | None = None,
                      ) -> torch.Tensor:
    """The Triton path of ``fp8_linear`` (``block`` None) and of ``block_fp8_linear`` alone, whatever
    the dtype (its caller checks the arguments and the GPU): the rows quantized per token or per group
    (``fp8_input``), then ``_fp8_gemm_kernel``."""
    q, scale = fp8_input(x, block, activation, x_fp8)
    return _launch_fp8_gemm(q, scale, weight, weight_scale, block, bias, x.dtype)


def _launch_fp8_gemm(q: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     block: tuple[int, int] | None, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``_fp8_gemm_kernel`` on rows quantized per token (``block`` None: ``scale`` ``[M]``, the
    weight's per output channel) or per group of ``block[1]`` (``scale`` ``[M, groups]``, the
    weight's per ``block``) -> ``[M, N]`` in ``dtype``."""
    (m, k), n = q.shape, weight.shape[0]
    out = torch.empty((m, n), dtype=dtype, device=q.device)
    group_n, block_k = (1, 128) if block is None else block
    # A decode batch's rows take narrow N tiles, more programs and a deeper pipeline (TRITON_GEMM_ROWS'
    # figures).
    skinny = m <= TRITON_GEMM_ROWS
    block_m, block_n = (64, 64) if skinny else (128, 128)
    _fp8_gemm_kernel[(triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)](
        q, scale, weight, weight_scale, weight if bias is None else bias, out, m, n, k, 1 if block is None else scale.shape[1],
        q.stride(0), weight.stride(0), out.stride(0), PER_BLOCK=block is not None, GROUP_N=group_n,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SWIZZLE=8,
        num_warps=4 if skinny else 8, num_stages=6 if skinny else 4)
    return out
