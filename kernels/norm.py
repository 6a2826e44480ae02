"""RMSNorm, optionally fused with the residual add that precedes it.

Two numerics: Llama's rounds the normalized row to the input dtype before the weight
multiplies it; Gemma's (``unit_offset``) scales by ``1 + weight`` in float32 and rounds
once, as transformers' ``GemmaRMSNorm`` does (its weights are stored as offsets from 1)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.kernels import pdl
from baton.kernels.checks import check_device, check_dtype, check_last_dim_contiguous, check_same_dtype, check_shape
from baton.kernels.fp8 import FP8_DTYPE, quantize_value, ref_quantize_groups, ref_quantize_rows, row_scale


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr, q_ptr, scale_ptr,
    stride_x, stride_r, stride_o, stride_nr,
    hidden, eps,
    HAS_RESIDUAL: tl.constexpr, UNIT_OFFSET: tl.constexpr, QUANTIZE: tl.constexpr, GROUP: tl.constexpr,
    BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)   # a weight: no kernel writes it
    pdl.wait(PDL)
    pdl.launch_dependents(PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(new_residual_ptr + row * stride_nr + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, 0) / hidden + eps)
    if UNIT_OFFSET:
        normed = xf * rstd
        w = w + 1.0
    else:
        normed = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    out = (normed * w).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, out, mask=mask)
    if QUANTIZE:
        # The stored row, rounded: what quantize_rows (GROUP 0) or quantize_groups would read back.
        outf = out.to(tl.float32)
        if GROUP == 0:
            scale, inv_scale = row_scale(tl.max(tl.abs(outf), 0))
            tl.store(scale_ptr + row, scale)
            q = quantize_value(outf, inv_scale)
        else:
            groups = tl.reshape(outf, [BLOCK // GROUP, GROUP])
            scale, inv_scale = row_scale(tl.max(tl.abs(groups), 1))
            g = tl.arange(0, BLOCK // GROUP)
            tl.store(scale_ptr + row * tl.cdiv(hidden, GROUP) + g, scale, mask=g * GROUP < hidden)
            q = tl.reshape(quantize_value(groups, inv_scale[:, None]), [BLOCK])
        tl.store(q_ptr + row * hidden + cols, q, mask=mask)


def _check_rows(name: str, t: torch.Tensor, hidden: int, like: torch.Tensor) -> None:
    check_shape(name, t, (*like.shape[:-1], hidden))
    check_dtype(name, t)
    check_device(name, t, like)
    check_last_dim_contiguous(name, t)


def _check_2d(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [rows, hidden], got shape {list(x.shape)}")


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    unit_offset: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Normalize over the last dim and scale by ``weight`` (``unit_offset``: by ``1 + weight``, Gemma's).
    With ``residual``: ``x = x + residual`` first, and return ``(normed, x)`` so the sum becomes
    the next residual."""
    out, _, new_residual = _launch_rms_norm(x, weight, eps, residual, unit_offset, quantize=False)
    return out if residual is None else (out, new_residual)


def rms_norm_fp8(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    unit_offset: bool = False,
    group: int | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """``rms_norm``'s rows, those rows as ``fp8.quantize_rows`` returns them (E4M3 ``[rows, hidden]``,
    fp32 scales ``[rows]``; ``x`` ``[rows, hidden]``) or with a ``group`` (a power of two,
    ``norm_takes_group``) as ``fp8.quantize_groups`` does (scales ``[rows, ceil(hidden / group)]``),
    and the new residual (None without ``residual``), from one launch."""
    _check_2d(x)
    _check_norm_group(group, x.shape[1])
    return _launch_rms_norm(x, weight, eps, residual, unit_offset, quantize=True, group=group)


def norm_takes_group(group: int, hidden: int) -> bool:
    """Whether ``rms_norm_fp8`` quantizes ``hidden``-wide rows per ``group``: a power of two no wider
    than the row's tile (the whole row, rounded up to a power of two)."""
    return group > 0 and group & (group - 1) == 0 and group <= triton.next_power_of_2(hidden)


def _check_norm_group(group: int | None, hidden: int) -> None:
    if group is not None and not (isinstance(group, int) and norm_takes_group(group, hidden)):
        raise ValueError(f"group must be None or a power of two up to {triton.next_power_of_2(hidden)} for rows of "
                         f"{hidden}, got {group!r}")


def _launch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None, unit_offset: bool,
                     quantize: bool, group: int | None = None,
                     ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
    """The kernel's launch: ``(normed, (E4M3 rows, scales) or None, new residual or None)``."""
    if x.dim() == 0:
        raise ValueError("x must have at least one dim")
    hidden = x.shape[-1]
    check_shape("weight", weight, (hidden,))
    check_device("weight", weight, x)
    _check_rows("x", x, hidden, x)
    if residual is not None:
        _check_rows("residual", residual, hidden, x)
        check_same_dtype("residual", residual, "x", x)
    x2 = x.reshape(-1, hidden)
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    new_residual = torch.empty_like(x2) if residual is not None else out
    res2 = residual.reshape(-1, hidden) if residual is not None else x2
    if quantize:
        q = torch.empty(x2.shape, dtype=FP8_DTYPE, device=x.device)
        scales = x2.shape[:1] if group is None else (x2.shape[0], -(-hidden // group))
        scale = torch.empty(scales, dtype=torch.float32, device=x.device)
    else:   # placeholders the kernel never touches, as new_residual is without a residual
        q = scale = out
    if x2.shape[0]:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, res2, weight.contiguous(), out, new_residual, q, scale,
            x2.stride(0), res2.stride(0), out.stride(0), new_residual.stride(0),
            hidden, eps,
            HAS_RESIDUAL=residual is not None, UNIT_OFFSET=unit_offset, QUANTIZE=quantize, GROUP=group or 0, BLOCK=block,
            num_warps=min(16, max(1, block // 512)), **pdl.launch_options(x),
        )
    return (out.view(x.shape), (q, scale) if quantize else None,
            new_residual.view(x.shape) if residual is not None else None)


def ref_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    unit_offset: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Normalize over the last dim and scale by ``weight`` (``unit_offset``: by ``1 + weight``, Gemma's).
    With ``residual``: ``x = x + residual`` first, and return ``(normed, x)`` so the sum becomes
    the next residual."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        normed = (normed * (1.0 + weight.float())).to(x.dtype)
    else:
        normed = normed.to(x.dtype) * weight
    return normed if residual is None else (normed, x)


def ref_rms_norm_fp8(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    unit_offset: bool = False,
    group: int | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """``rms_norm_fp8`` in torch: ``ref_rms_norm``, then ``fp8.ref_quantize_rows`` of its rows (with a
    ``group``, ``fp8.ref_quantize_groups``)."""
    _check_2d(x)
    _check_norm_group(group, x.shape[1])
    if residual is None:
        normed, new_residual = ref_rms_norm(x, weight, eps, None, unit_offset), None
    else:
        normed, new_residual = ref_rms_norm(x, weight, eps, residual, unit_offset)
    return normed, ref_quantize_rows(normed) if group is None else ref_quantize_groups(normed, group), new_residual
