"""The FP8 (W8A8) linear kernels (``kernels/fp8.py``, the GEMV's FP8 mode in ``kernels/linear.py``)
against their plain-torch reference on fresh random inputs, the reference against the arithmetic it
stands for, and the wrappers' argument checks.

Triton's interpreter rounds to E4M3 without carrying into the exponent (``_convert_float`` in
``triton/runtime/interpreter.py``: 124.3 rounds to 64), so there the inputs are rows whose values,
once scaled, are E4M3 values already (each row's largest magnitude 448 times a power of two): the
interpreter checks the kernels' scales, masks and sums, the GPU their rounding too.
``python tests/test_fp8_kernels.py`` runs the interpreter's cases. On a CUDA GPU the cases run
natively on random inputs in fp16/bf16/fp32, then Llama-3-8B's projection shapes through cuBLAS's and
Triton's FP8 GEMMs, and the kernels inside a captured CUDA graph.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator

import pytest
import torch

import kernel_cases
from kernel_cases import hopper_ptx, interpreted_checks_passed, run_cases
from test_kernels import _assert_close, _assert_written_rows, _poison_allocator, needs_cuda, rotary_write_case, spread_gates

from baton.kernels import fp8, norm, ops, rotary
from baton.kernels.activation import ref_act_and_mul
from baton.kernels.linear import MAX_GEMV_ROWS, LinearConfig, launch_linear

fresh_seed = kernel_cases.fresh_seed   # autouse: new random inputs on every run, the seed printed

E4M3 = torch.float8_e4m3fn
SMALL_TILES = LinearConfig(block_n=4, block_k=64)
LLAMA_8B = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}   # in, out


def on_grid(rows: int, k: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Rows whose values over their scale are E4M3 values: E4M3 values with a 448 in each row, times
    a power of two a row (zero for a row of zeros)."""
    x = (torch.randn(rows, k) * 100).clamp(-448, 448).to(E4M3).float()
    x[torch.arange(rows), torch.randint(0, k, (rows,))] = 448.0
    x = x * torch.tensor([2.0 ** e for e in torch.randint(-12, 4, (rows,)).tolist()])[:, None]
    return x.to(dtype).to(device)


def inputs(rows: int, k: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Random rows of several magnitudes on a GPU; rows on the E4M3 grid in the interpreter."""
    if device == "cpu":
        return on_grid(rows, k, dtype, device)
    return (torch.randn(rows, k, device=device) * torch.logspace(-3, 2, rows, device=device)[:, None]).to(dtype)


def group_inputs(rows: int, k: int, group: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """``inputs`` for quantization per ``group`` features: in the interpreter each group on the grid."""
    if device == "cpu":
        return torch.cat([on_grid(rows, min(group, k - g0), dtype, device) for g0 in range(0, k, group)], dim=1)
    return inputs(rows, k, dtype, device)


# Hopper's FP8 MMA adds its products with fewer bits than fp32's, and Triton's FP8 dot does not promote
# them to fp32 before the end of the sum (CUTLASS's "FP8FastAccum" schedules, which serving kernels
# take, do the same): on an H100 the per-channel GEMM's sums are 1.3e-3 off fp64's at K = 4,096 and
# 2.9e-3 at 14,336, in fp16 and fp32 outputs alike (promoted to fp32 each 128-wide step: 1.3e-4, at
# 0.71-0.81x the speed; the E4M3 rounding of x and the weight costs ten times more). On a GPU the Triton
# FP8 GEMM's outputs are held to this.
FP8_MMA_TOLERANCE = 5e-3


def mma_tolerance(device: str) -> float:
    """``_assert_close``'s bound for an FP8 tensor-core product on ``device`` (the interpreter's sums are fp32's)."""
    return FP8_MMA_TOLERANCE if device == "cuda" else 0.0


def block_scales(n: int, k: int, block: tuple[int, int], device: str) -> torch.Tensor:
    """Random scales, one per ``block`` of an ``[n, k]`` E4M3 weight, of ``fp8_weight``'s size (fp16's
    range holds the sums)."""
    return (torch.rand(-(-n // block[0]), -(-k // block[1]), device=device) + 0.5) * (0.05 / 448)


def check_fp8_gemm(device: str, dtype: torch.dtype, m: int, n: int, k: int, block: tuple[int, int] | None,
                   with_bias: bool) -> None:
    """The Triton FP8 GEMM (``fp8_linear``'s and ``block_fp8_linear``'s kernel; rows quantized by the
    reference, so the interpreter takes them) against ``ref_fp8_linear`` (``block`` None: the weight
    scaled per output channel) or ``ref_fp8_block_linear``."""
    x = inputs(m, k, dtype, device) if block is None else group_inputs(m, k, block[1], dtype, device)
    w, w_scale = fp8_weight(n, k, device)
    b = torch.randn(n, dtype=dtype, device=device) if with_bias else None
    if block is None:
        q, scale = fp8.ref_quantize_rows(x)
        want = fp8.ref_fp8_linear(x, w, w_scale, b)
    else:
        w_scale = block_scales(n, k, block, device)
        q, scale = fp8.ref_quantize_groups(x, block[1])
        want = fp8.ref_fp8_block_linear(x, w, w_scale, block, b)
    _poison_allocator(device, m * n * x.element_size())
    _assert_close(fp8._launch_fp8_gemm(q, scale, w, w_scale, block, b, dtype), want, dtype, mma_tolerance(device))


def fp8_weight(n: int, k: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    return fp8.ref_quantize_rows(torch.randn(n, k, device=device) * 0.05)


def check_quantize_rows(device: str, dtype: torch.dtype, m: int, k: int, block_k: int, activation: str | None = None) -> None:
    """``quantize_rows`` against the reference, a row of zeros among the rows. With an activation (gates
    spread over its range, within fp16's once multiplied), of the rows ``ops.act_and_mul`` makes: the
    same Triton activation, which matches torch's to a rounding, not a bit (``test_kernels``)."""
    x = inputs(m, k, dtype, device)
    if activation is not None:
        x = spread_gates(torch.cat([x / 100, inputs(m, k, dtype, device) / 100], dim=1))
    if m > 1:
        x[1] = 0
    got_q, got_scale = fp8.quantize_rows(x, block_k, activation)
    want_q, want_scale = fp8.ref_quantize_rows(x if activation is None else ops.act_and_mul(x, activation))
    assert torch.equal(got_scale, want_scale)
    assert torch.equal(got_q.float(), want_q.float())


def check_quantize_groups(device: str, dtype: torch.dtype, m: int, k: int, group: int,
                          activation: str | None = None) -> None:
    """``quantize_groups`` against ``ref_quantize_groups``, exactly: a group of zeros among the groups,
    the last group shorter where ``group`` does not divide ``k``; with an activation as
    ``check_quantize_rows`` has it."""
    x = group_inputs(m, k, group, dtype, device)
    if activation is not None:
        x = spread_gates(torch.cat([x / 100, inputs(m, k, dtype, device) / 100], dim=1))
    x[m - 1, :group] = 0
    got_q, got_scale = fp8.quantize_groups(x, group, activation)
    want_q, want_scale = fp8.ref_quantize_groups(x if activation is None else ops.act_and_mul(x, activation), group)
    assert torch.equal(got_scale, want_scale)
    assert torch.equal(got_q.float(), want_q.float())


def check_gemv(device: str, dtype: torch.dtype, m: int, n: int, k: int, with_bias: bool, config: LinearConfig,
               gated: bool = False, block: tuple[int, int] | None = None) -> None:
    """The GEMV's FP8 mode against ``ref_fp8_linear`` (with a ``block``, ``ref_fp8_block_linear``,
    the weight's scales one per block); ``x`` a view with a row stride past its width. Gated: the
    activation's output is not on the grid, so the interpreter takes it only with gates and ups that
    make it one (gate 0 in SiLU: 0)."""
    w, w_scale = fp8_weight(n, k, device)
    if block is not None:
        w_scale = block_scales(n, k, block, device)
    b = torch.randn(n, dtype=dtype, device=device) if with_bias else None
    width = 2 * k if gated else k
    x = torch.empty(m, width + 3, dtype=dtype, device=device)[:, :width]
    x[:, :k] = inputs(m, k, dtype, device) if block is None else group_inputs(m, k, block[1], dtype, device)
    if gated:   # act(gate) * up within fp16's range: gates to 30x and ups of rows up to 100 would overflow it
        x[:, :k] /= 100
        x[:, k:] = inputs(m, k, dtype, device) / 100
        spread_gates(x)
    _poison_allocator(device, m * n * x.element_size())
    got = launch_linear(x, w, b, config, gated=gated, weight_scale=w_scale, block=block)
    rows = ref_act_and_mul(x, "silu") if gated else x
    want = fp8.ref_fp8_linear(rows, w, w_scale, b) if block is None else fp8.ref_fp8_block_linear(rows, w, w_scale, block, b)
    _assert_close(got, want, dtype)


def check_qkv_rotary_store_kv(device: str, dtype: torch.dtype, rows: int, heads: int, kv_heads: int, head_dim: int,
                              rotary_dim: int, hidden: int, with_bias: bool, block: tuple[int, int] | None = None) -> None:
    """The FP8 q/k/v projection (with a ``block``, its weight scaled per block), rotation and cache
    write in one launch against the reference."""
    w, w_scale = fp8_weight((heads + 2 * kv_heads) * head_dim, hidden, device)
    if block is not None:
        w_scale = block_scales(w.shape[0], hidden, block, device)
    b = torch.randn(w.shape[0], dtype=dtype, device=device) if with_bias else None
    x = inputs(rows, hidden, dtype, device) if block is None else group_inputs(rows, hidden, block[1], dtype, device)
    pos, cos_sin, cache, slots = rotary_write_case(rows, kv_heads, head_dim, rotary_dim, dtype, torch.int64, device)
    want = cache.clone()
    want_q = rotary.ref_qkv_rotary_store_kv(x, w, b, pos, cos_sin, want, slots, w_scale, block)
    _poison_allocator(device, want_q.numel() * want_q.element_size())
    got_q = rotary.qkv_rotary_store_kv(x, w, b, pos, cos_sin, cache, slots, w_scale, block)
    _assert_close(got_q, want_q, dtype)
    _assert_written_rows(cache, want, slots, dtype, slice(None))


def check_rms_norm_fp8(device: str, dtype: torch.dtype, rows: int, hidden: int, with_residual: bool,
                       unit_offset: bool = False, group: int | None = None) -> None:
    """``rms_norm_fp8``: its normed rows and new residual as ``rms_norm``'s (a row of zeros among them),
    its E4M3 rows and scales exactly as the rows quantized apart, per token or per ``group`` (in the
    interpreter by ``quantize_rows`` or ``quantize_groups``, whose rounding it shares; on a GPU by the
    reference), then taken by the GEMV (with a ``group``, over weights scaled per block of ``group``
    columns) and by ``ops.linear`` as if they had quantized them."""
    x = torch.randn(rows, hidden, dtype=dtype, device=device)
    w = torch.randn(hidden, dtype=dtype, device=device)
    r = torch.randn(rows, hidden, dtype=dtype, device=device) if with_residual else None
    x[-1] = 0
    if r is not None:
        r[-1] = 0
    _poison_allocator(device, 3 * x.numel() * x.element_size())
    normed, (q, scale), summed = norm.rms_norm_fp8(x, w, 1e-6, r, unit_offset, group)
    if r is None:
        want, want_summed = norm.rms_norm(x, w, 1e-6, None, unit_offset), None
        assert summed is None
    else:
        want, want_summed = norm.rms_norm(x, w, 1e-6, r, unit_offset)
        assert torch.equal(summed, want_summed)
    assert torch.equal(normed, want)
    if group is None:
        want_q, want_scale = (fp8.quantize_rows if device == "cpu" else fp8.ref_quantize_rows)(normed)
    else:
        want_q, want_scale = fp8.quantize_groups(normed, group) if device == "cpu" else fp8.ref_quantize_groups(normed, group)
    assert torch.equal(scale, want_scale) and torch.equal(q.float(), want_q.float())
    weight, weight_scale = fp8_weight(24, hidden, device)
    block, tiles = None, SMALL_TILES
    if group is not None:   # tiles of at least a group
        block, tiles = (8, group), LinearConfig(block_n=4, block_k=max(group, SMALL_TILES.block_k))
        weight_scale = block_scales(24, hidden, block, device)
    assert torch.equal(launch_linear(normed, weight, None, tiles, weight_scale=weight_scale, block=block, x_fp8=(q, scale)),
                       launch_linear(normed, weight, None, tiles, weight_scale=weight_scale, block=block))
    if device == "cpu":
        assert torch.equal(ops.linear(normed, weight, None, weight_scale, block, x_fp8=(q, scale)),
                           fp8.ref_fp8_linear(normed, weight, weight_scale, x_fp8=(q, scale)) if block is None else
                           fp8.ref_fp8_block_linear(normed, weight, weight_scale, block, x_fp8=(q, scale)))


def small_cases(device: str, dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], None]]]:
    for m, k, block_k in [(1, 300, 64), (5, 1024, 256), (3, 17, 1024)]:
        yield f"quantize rows {m}x{k}", lambda m=m, k=k, b=block_k: check_quantize_rows(device, dtype, m, k, b)
    for rows, hidden, res, offset, group in [(1, 96, False, False, None), (3, 300, True, False, None),
                                             (MAX_GEMV_ROWS, 64, True, True, None), (2, 300, True, False, 64),
                                             (3, 96, False, True, 32), (1, 128, True, False, 128)]:
        yield f"rms_norm_fp8 {rows}x{hidden} residual={res} unit offset={offset} group={group}", \
            lambda m=rows, h=hidden, r=res, o=offset, g=group: check_rms_norm_fp8(device, dtype, m, h, r, o, g)
    for m in range(1, MAX_GEMV_ROWS + 1):
        yield f"fp8 gemv {m} rows", lambda m=m: check_gemv(device, dtype, m, 45, 300, m % 2 == 1, SMALL_TILES)
    yield "fp8 gemv even K", lambda: check_gemv(device, dtype, 2, 16, 256, False, SMALL_TILES)
    for m, k, group in [(2, 300, 32), (3, 256, 128), (1, 17, 8)]:
        yield f"quantize groups {m}x{k} of {group}", lambda m=m, k=k, g=group: check_quantize_groups(device, dtype, m, k, g)
    for m, n, k, block in [(1, 45, 300, (16, 32)), (2, 37, 256, (8, 16)), (MAX_GEMV_ROWS, 40, 100, (128, 64))]:
        yield f"fp8 gemv {m} rows, blocks {block}", \
            lambda m=m, n=n, k=k, b=block: check_gemv(device, dtype, m, n, k, m % 2 == 1, SMALL_TILES, block=b)
    for m, n, k, block in [(5, 200, 300, (64, 32)), (70, 130, 96, (128, 32)), (5, 200, 300, None), (70, 130, 136, None)]:
        yield f"fp8 gemm {m}x{n}x{k}, blocks {block}", \
            lambda m=m, n=n, k=k, b=block: check_fp8_gemm(device, dtype, m, n, k, b, m % 2 == 1)
    yield "fp8 gemv default tiles", lambda: check_gemv(device, dtype, 2, 37, 300, True, LinearConfig())
    yield "fp8 qkv_rotary_store_kv 1 row bias", lambda: check_qkv_rotary_store_kv(device, dtype, 1, 4, 2, 32, 32, 100, True)
    yield "fp8 qkv_rotary_store_kv 3 rows partial rotary", lambda: check_qkv_rotary_store_kv(device, dtype, 3, 6, 2, 32, 16, 300, False)
    yield "fp8 qkv_rotary_store_kv 2 rows, blocks (32, 64)", \
        lambda: check_qkv_rotary_store_kv(device, dtype, 2, 4, 2, 32, 32, 300, True, (32, 64))
    if device != "cpu":
        yield "fp8 gated gemv", lambda: check_gemv(device, dtype, 2, 37, 300, True, SMALL_TILES, gated=True)
        for act in ("silu", "gelu_pytorch_tanh"):
            for block_k in (128, 512):
                yield f"quantize rows of {act}, tile {block_k}", lambda a=act, b=block_k: check_quantize_rows(device, dtype, 3, 300, b, a)
            yield f"quantize groups of {act}", lambda a=act: check_quantize_groups(device, dtype, 3, 300, 128, a)
        yield "fp8 gated gemv, blocks", lambda: check_gemv(device, dtype, 2, 37, 300, True, SMALL_TILES, gated=True,
                                                           block=(16, 64))


@pytest.mark.unit
def test_the_reference_is_the_dequantized_product_of_rows_rounded_per_token() -> None:
    x = torch.randn(5, 64) * torch.tensor([1e-3, 1.0, 30.0, 0.0, 500.0])[:, None]
    q, scale = fp8.ref_quantize_rows(x)
    assert q.dtype == E4M3 and scale.shape == (5,)
    assert torch.equal(q.float().abs().amax(dim=1)[[0, 1, 2, 4]], torch.full((4,), 448.0))
    assert torch.equal(q[3].float(), torch.zeros(64)) and scale[3] > 0
    assert (q.float() * scale[:, None] - x).abs().le(x.abs() / 16 + scale[:, None] / 512).all()
    w, w_scale = fp8_weight(24, 64, "cpu")
    bias = torch.randn(24)
    want = (q.float() * scale[:, None]) @ (w.float() * w_scale[:, None]).t() + bias
    torch.testing.assert_close(fp8.ref_fp8_linear(x, w, w_scale, bias), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.unit
def test_ops_linear_takes_the_reference_on_the_cpu() -> None:
    w, w_scale = fp8_weight(24, 64, "cpu")
    x = torch.randn(7, 64)
    assert torch.equal(ops.linear(x, w, None, w_scale), fp8.ref_fp8_linear(x, w, w_scale))
    gated = torch.randn(3, 128)
    assert torch.equal(ops.gated_linear(gated, w, None, "silu", w_scale),
                       fp8.ref_fp8_linear(ref_act_and_mul(gated, "silu"), w, w_scale))


@pytest.mark.unit
def test_fp8_kernels_under_triton_interpreter() -> None:
    stdout = interpreted_checks_passed(__file__)
    expected = sum(1 for _ in small_cases("cpu", torch.float32)) + sum(1 for _ in small_cases("cpu", torch.bfloat16))
    assert f"{expected} interpreted checks passed" in stdout, stdout


@pytest.mark.unit
def test_cublas_takes_bf16_rows_past_a_decode_batch() -> None:
    """cuBLAS's FP8 GEMM takes bf16 rows with dims of multiples of 16, past ``TRITON_GEMM_ROWS`` rows
    (a decode batch's go to the Triton GEMM's narrow tiles, faster there on an H100)."""
    rows = fp8.TRITON_GEMM_ROWS
    for m, dtype, n, k, takes in ((rows + 1, torch.bfloat16, 4096, 4096, True), (rows, torch.bfloat16, 4096, 4096, False),
                                  (3, torch.bfloat16, 4096, 4096, False), (2048, torch.float16, 4096, 4096, False),
                                  (2048, torch.bfloat16, 4096, 4104, False), (2048, torch.bfloat16, 4104, 4096, False)):
        assert fp8._cublas_takes_rows(torch.empty(m, k, dtype=dtype), n, k) is takes, (m, dtype, n, k)


@pytest.mark.unit
def test_block_scaled_decode_batches_take_the_triton_gemm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to ``TRITON_GEMM_ROWS`` rows, ``block_fp8_linear`` takes the Triton GEMM even where cuBLAS's
    block-scaled GEMM takes the recipe (narrow tiles, faster there on an H100); past them cuBLAS's."""
    taken = []
    monkeypatch.setattr(fp8, "_has_fp8_tensor_cores", lambda device: True)
    monkeypatch.setattr(fp8, "_cublas_takes_blocks", lambda x, n, k, block: True)
    monkeypatch.setattr(fp8, "_cublas_block_fp8_linear", lambda *args: taken.append("cuBLAS"))
    monkeypatch.setattr(fp8, "triton_fp8_linear", lambda *args: taken.append("Triton"))
    block = (128, 128)
    w, w_scale = fp8_weight(256, 256, "cpu")[0], block_scales(256, 256, block, "cpu")
    for rows in (3, fp8.TRITON_GEMM_ROWS, fp8.TRITON_GEMM_ROWS + 1):
        fp8.block_fp8_linear(torch.randn(rows, 256, dtype=torch.bfloat16), w, w_scale, block)
    assert taken == ["Triton", "Triton", "cuBLAS"]


@pytest.mark.unit
def test_bad_arguments_are_refused() -> None:
    w, w_scale = fp8_weight(8, 32, "cpu")
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match="weight must have dtype"):
        fp8.ref_fp8_linear(x, w.float(), w_scale)
    with pytest.raises(ValueError, match="weight_scale must have shape \\[8\\]"):
        fp8.ref_fp8_linear(x, w, w_scale[:4])
    with pytest.raises(ValueError, match="weight_scale must have dtype"):
        launch_linear(x, w, None, SMALL_TILES, weight_scale=w_scale.half())
    with pytest.raises(ValueError, match="weight must have shape \\[\\*, 31\\], got \\[8, 32\\]"):
        fp8.ref_fp8_linear(torch.randn(2, 31), w, w_scale)
    with pytest.raises(ValueError, match="block \\(8, 40\\) is not taken by tiles of block_k=64"):
        launch_linear(x, w, None, SMALL_TILES, weight_scale=block_scales(8, 32, (8, 40), "cpu"), block=(8, 40))
    rows = fp8.ref_quantize_rows(x)
    refused = {
        "x_fp8 is for FP8 weights": lambda: launch_linear(x, w.float(), None, SMALL_TILES, x_fp8=rows),
        "x_fp8's scales must have shape \\[2, 2\\]": lambda: ops.linear(x, w, None, block_scales(8, 32, (8, 16), "cpu"),
                                                                        (8, 16), rows),
        "a gated product makes its activation": lambda: launch_linear(torch.randn(2, 64), w, None, SMALL_TILES, gated=True,
                                                                      weight_scale=w_scale, x_fp8=rows),
        "makes its activation as it quantizes": lambda: fp8.fp8_linear(torch.randn(2, 64), w, w_scale, x_fp8=rows,
                                                                       activation="silu"),
        "gate then up halves: its width must be even": lambda: fp8.block_fp8_linear(
            torch.randn(2, 65), w, block_scales(8, 32, (8, 16), "cpu"), (8, 16), activation="silu"),
        "x_fp8's rows must have shape \\[2, 32\\]": lambda: fp8.ref_fp8_linear(x, w, w_scale, x_fp8=(rows[0][:, :16], rows[1])),
        "x_fp8's rows must have dtype": lambda: fp8.ref_fp8_linear(x, w, w_scale, x_fp8=(x, rows[1])),
        "x_fp8's scales must have shape \\[2\\]": lambda: fp8.ref_fp8_linear(x, w, w_scale, x_fp8=(rows[0], rows[1][:1])),
    }
    for message, call in refused.items():
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(ValueError, match="x must be \\[rows, hidden\\]"):
        norm.ref_rms_norm_fp8(torch.randn(2, 3, 32), torch.ones(32), 1e-6)
    for group in (48, 64, 0):
        with pytest.raises(ValueError, match="group must be None or a power of two up to 32 for rows of 32"):
            norm.ref_rms_norm_fp8(x, torch.ones(32), 1e-6, group=group)


@pytest.mark.unit
def test_fp8_kernels_use_hopper_conversions() -> None:
    """On an H100 the row and group quantizations (with the MLP's activation too, or after the
    RMSNorm in its launch) round to E4M3 in hardware (saturating, to nearest even) and wait for the
    kernel before them (PDL); the FP8 GEMVs (the fused q/k/v one, the block-scaled one too) widen E4M3
    rows and weights in hardware and round nothing; the FP8 GEMM, block-scaled or per channel (fp16
    out), multiplies E4M3 tiles on Hopper's tensor cores (wgmma)."""
    quantizations = [("fp8:_quantize_rows_kernel", dict(ACTIVATION=activation, BLOCK_K=1024, ONE_TILE=one_tile, PDL=True))
                     for activation in (None, "silu") for one_tile in (False, True)]
    quantizations.append(("fp8:_quantize_groups_kernel", dict(GROUP=128, ACTIVATION="silu", BLOCK=128, TILE_GROUPS=8, PDL=True)))
    quantizations += [("norm:_rms_norm_kernel", dict(HAS_RESIDUAL=True, UNIT_OFFSET=False, QUANTIZE=True, GROUP=group,
                                                     BLOCK=4096, PDL=True)) for group in (0, 128)]
    for kernel, constants in quantizations:
        rows = hopper_ptx(f"baton.kernels.{kernel}", {"x_ptr": "*bf16", "residual_ptr": "*bf16", "weight_ptr": "*bf16",
                                                      "out_ptr": "*bf16", "new_residual_ptr": "*bf16", "q_ptr": "*fp8e4nv",
                                                      "scale_ptr": "*fp32", "eps": "fp32"}, constants)
        assert "cvt.rn.satfinite.e4m3x2.f32" in rows
        assert "griddepcontrol.wait" in rows and "griddepcontrol.launch_dependents" in rows
    pointers = {"x_ptr": "*fp8e4nv", "x_scale_ptr": "*fp32", "w_ptr": "*fp8e4nv", "w_scale_ptr": "*fp32",
                "b_ptr": "*bf16", "out_ptr": "*bf16"}
    constants = dict(M=1, M_PAD=1, HAS_BIAS=False, ACTIVATION=None, BLOCK_N=4, BLOCK_K=2048, EVEN_K=True, PDL=True,
                     FP8=True, GROUP_N=0, GROUP_K=0)
    qkv = dict(M=1, M_PAD=1, HAS_BIAS=False, NUM_Q_HEADS=32, NUM_KV_HEADS=8, HEAD_DIM=128, HALF=64, BLOCK_SIZE=16,
               BLOCK_K=2048, EVEN_K=True, PDL=True, FP8=True, GROUP_N=0, GROUP_K=0)
    qkv_pointers = {**pointers, "pos_ptr": "*i64", "cos_sin_ptr": "*bf16", "slot_ptr": "*i64", "q_out_ptr": "*bf16",
                    "cache_ptr": "*bf16"}
    for ptx in (hopper_ptx("baton.kernels.linear:_linear_kernel", pointers, constants),
                hopper_ptx("baton.kernels.linear:_linear_kernel", pointers, dict(constants, GROUP_N=128, GROUP_K=128)),
                hopper_ptx("baton.kernels.rotary:_qkv_rotary_store_kv_kernel", qkv_pointers, qkv),
                hopper_ptx("baton.kernels.rotary:_qkv_rotary_store_kv_kernel", qkv_pointers,
                           dict(qkv, GROUP_N=128, GROUP_K=128))):
        assert "cvt.rn.f16x2.e4m3x2" in ptx and "griddepcontrol.wait" in ptx
        assert "satfinite.e4m3" not in ptx
    for per_block, group_n, c in ((True, 128, "*bf16"), (False, 1, "*fp16")):
        gemm = hopper_ptx("baton.kernels.fp8:_fp8_gemm_kernel",
                          {"a_ptr": "*fp8e4nv", "a_scale_ptr": "*fp32", "b_ptr": "*fp8e4nv", "b_scale_ptr": "*fp32",
                           "bias_ptr": c, "c_ptr": c},
                          dict(PER_BLOCK=per_block, GROUP_N=group_n, HAS_BIAS=False, BLOCK_M=128, BLOCK_N=128,
                               BLOCK_K=128, SWIZZLE=8))
        assert "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3" in gemm


@pytest.mark.unit
def test_quantize_groups_loads_rows_in_16_byte_pieces() -> None:
    """Groups of a power of two (128 in every published block-wise checkpoint) read a bf16 row 16
    bytes a load and write its E4M3 values 16 a store on an H100, with the strides and pointers a
    launch specializes as divisible by 16; a group of 40 (the lanes past each group's end masked)
    reads and writes one value at a time."""
    pointers = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32"}
    divisible = ("x_ptr", "q_ptr", "scale_ptr", "K", "stride_x", "stride_q")
    for group, block in ((128, 128), (40, 64)):
        ptx = hopper_ptx("baton.kernels.fp8:_quantize_groups_kernel", pointers,
                         dict(GROUP=group, ACTIVATION=None, BLOCK=block, TILE_GROUPS=4096 // block, PDL=False), divisible)
        loads, stores = set(re.findall(r"ld\.global[.\w]*", ptx)), set(re.findall(r"st\.global[.\w]*", ptx))
        if group == block:
            assert loads == {"ld.global.v4.b32"} and "st.global.v4.b32" in stores, (loads, stores)
        else:
            assert loads == {"ld.global.b16"} and "st.global.b8" in stores, (loads, stores)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_fp8_small_cases_on_gpu(dtype: torch.dtype) -> None:
    assert run_cases(small_cases("cuda", dtype)) > 0


def gate_up_rows(rows: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """A gated product's input ``[rows, 2k]`` on the GPU: gates spread over the activation's range,
    ups of several magnitudes, their products within fp16's range."""
    return spread_gates(torch.cat([inputs(rows, k, dtype, "cuda") / 100, inputs(rows, k, dtype, "cuda") / 100], dim=1))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("proj", list(LLAMA_8B))
def test_block_fp8_linear_on_gpu_llama_8b_shapes(proj: str) -> None:
    """128 x 128 weight blocks (DeepSeek-V3's, Qwen3-FP8's): ``ops.linear`` (the block-scaled GEMV at
    decode's rows, a block-scaled GEMM above them: Triton's narrow tiles up to ``TRITON_GEMM_ROWS``,
    then cuBLAS's; also given the rows quantized before, as the
    RMSNorm hands them on), the Triton GEMM and cuBLAS's (bf16; row counts not a multiple of four
    padded), each against ``ref_fp8_block_linear``; on Hopper, cuBLAS takes every shape here. The
    down projection also gated, as in ``test_fp8_linear_on_gpu_llama_8b_shapes``."""
    (k, n), block = LLAMA_8B[proj], (128, 128)
    w, w_scale = fp8_weight(n, k, "cuda")[0], block_scales(n, k, block, "cuda")
    for rows in (1, 2, 3, 5, 64, 65, 2048):
        x = inputs(rows, k, torch.bfloat16, "cuda")
        want = fp8.ref_fp8_block_linear(x, w, w_scale, block)
        _assert_close(ops.linear(x, w, None, w_scale, block), want, torch.bfloat16)
        _assert_close(ops.linear(x, w, None, w_scale, block, fp8.quantize_groups(x, 128)), want, torch.bfloat16)
        if proj == "down":
            gated = gate_up_rows(rows, k, torch.bfloat16)
            _assert_close(ops.gated_linear(gated, w, None, "silu", w_scale, block),
                          fp8.ref_fp8_block_linear(ops.act_and_mul(gated, "silu"), w, w_scale, block), torch.bfloat16)
        _assert_close(fp8.triton_fp8_linear(x, w, w_scale, block), want, torch.bfloat16)
        _assert_close(fp8.scaled_mm_block_fp8_linear(x, w, w_scale, block), want, torch.bfloat16)
    if torch.cuda.get_device_capability() == (9, 0):
        assert fp8._cublas_takes_blocks(x, n, k, block)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("proj", list(LLAMA_8B))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp8_linear_on_gpu_llama_8b_shapes(proj: str, dtype: torch.dtype) -> None:
    """The GEMV at decode's rows, above them the Triton FP8 GEMM in narrow tiles up to
    ``TRITON_GEMM_ROWS``, past them cuBLAS's (bf16) or the Triton one (fp16), each against the
    reference, and the Triton GEMM alone in bf16 too; the GEMMs' sums in another order and, the
    Triton one's, with the FP8 MMA's bits, so to the output's rounding or ``FP8_MMA_TOLERANCE``. The
    down projection also gated, its activation made as its rows are quantized (against the reference
    over the same Triton activation)."""
    k, n = LLAMA_8B[proj]
    w, w_scale = fp8_weight(n, k, "cuda")
    for rows in (1, 2, 3, 64, 65, 2048):
        x = inputs(rows, k, dtype, "cuda")
        want = fp8.ref_fp8_linear(x, w, w_scale)
        _assert_close(ops.linear(x, w, None, w_scale), want, dtype, FP8_MMA_TOLERANCE)
        _assert_close(fp8.triton_fp8_linear(x, w, w_scale), want, dtype, FP8_MMA_TOLERANCE)
        if proj == "down":
            gated = gate_up_rows(rows, k, dtype)
            _assert_close(ops.gated_linear(gated, w, None, "silu", w_scale),
                          fp8.ref_fp8_linear(ops.act_and_mul(gated, "silu"), w, w_scale), dtype, FP8_MMA_TOLERANCE)
    q, scale = fp8.quantize_rows(inputs(2048, k, dtype, "cuda"))
    assert q.dtype == E4M3 and scale.shape == (2048,)


@pytest.mark.gpu
@needs_cuda
def test_fp8_linears_replay_in_a_cuda_graph() -> None:
    """Decode's GEMV and a batch's quantize-then-GEMM, captured once, replayed over new inputs."""
    w, w_scale = fp8_weight(512, 1024, "cuda")
    static = {rows: torch.zeros(rows, 1024, dtype=torch.bfloat16, device="cuda") for rows in (1, 32)}
    for x in static.values():
        ops.linear(x, w, None, w_scale)   # compile outside the capture
    graph, outs = torch.cuda.CUDAGraph(), {}
    with torch.cuda.graph(graph):
        for rows, x in static.items():
            outs[rows] = ops.linear(x, w, None, w_scale)
    for _ in range(3):
        for x in static.values():
            x.copy_(inputs(x.shape[0], 1024, torch.bfloat16, "cuda"))
        graph.replay()
        for rows, x in static.items():
            _assert_close(outs[rows], fp8.ref_fp8_linear(x, w, w_scale), torch.bfloat16)


if __name__ == "__main__":
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    passed = run_cases(small_cases("cpu", torch.float32)) + run_cases(small_cases("cpu", torch.bfloat16))
    print(f"{passed} interpreted checks passed")
