"""Rotary position embedding (the "rotate half" / NeoX form used by Llama,
Mistral and Qwen). ``cos_sin_cache`` is ``[max_positions, rotary_dim]``: the
cosines in the first half of the last dim, the sines in the second. Dims past
``rotary_dim`` pass through unchanged. ``rotary_store_kv`` also writes the rotated
keys and the values into the paged KV cache (``kv_cache.store_kv``) in the same launch;
``qkv_rotary_store_kv`` also computes the fused q/k/v projection first, with the GEMV of
``linear.py``, for decode steps of a row or two."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.kernels import pdl
from baton.kernels.checks import check_device, check_dtype, check_int_index, check_kv_cache, check_last_dim_contiguous, check_shape
from baton.kernels.kv_cache import _cache_row, _load_heads, _store_row, check_store_kv_args, ref_store_kv
from baton.kernels.fp8 import check_x_fp8, fp8_input, ref_fp8_block_linear, ref_fp8_linear
from baton.kernels.linear import DEFAULT_CONFIG, _check_linear_args, _gemv_columns, ref_linear


@triton.jit
def _load_cos_sin(pos_ptr, cos_sin_ptr, token, stride_cos_sin, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """float32 cosines and sines ``[1, HALF_PAD]`` of ``token``'s position (zeros past ``HALF``)."""
    pos = tl.load(pos_ptr + token).to(tl.int64)
    j = tl.arange(0, HALF_PAD)[None, :]
    row = cos_sin_ptr + pos * stride_cos_sin
    cos = tl.load(row + j, mask=j < HALF, other=0.0).to(tl.float32)
    sin = tl.load(row + HALF + j, mask=j < HALF, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def _rotate_heads(src_ptr, stride_src_head, cos, sin,
                  NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                  HALF: tl.constexpr, HALF_PAD: tl.constexpr, TAIL_PAD: tl.constexpr):
    """Load and rotate one token's heads (each head's row contiguous): the two rotated halves
    ``[HEADS_PAD, HALF_PAD]``, rounded to the source dtype as a rotated tensor would be, and
    the pass-through tail ``[HEADS_PAD, TAIL_PAD]`` (a placeholder when there is none)."""
    h = tl.arange(0, HEADS_PAD)[:, None]
    j = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < NUM_HEADS) & (j < HALF)
    src = src_ptr + h * stride_src_head
    x1 = tl.load(src + j, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + j, mask=mask, other=0.0).to(tl.float32)
    out1 = (x1 * cos - x2 * sin).to(src_ptr.dtype.element_ty)
    out2 = (x2 * cos + x1 * sin).to(src_ptr.dtype.element_ty)
    if TAIL_PAD > 0:
        t = 2 * HALF + tl.arange(0, TAIL_PAD)[None, :]
        tail = tl.load(src + t, mask=(h < NUM_HEADS) & (t < HEAD_DIM))
    else:
        tail = out1
    return out1, out2, tail


@triton.jit
def _store_heads(dst_ptr, stride_dst_head, out1, out2, tail,
                 NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                 HALF: tl.constexpr, HALF_PAD: tl.constexpr, TAIL_PAD: tl.constexpr):
    """Store what ``_rotate_heads`` returned, converted to the destination dtype."""
    h = tl.arange(0, HEADS_PAD)[:, None]
    j = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < NUM_HEADS) & (j < HALF)
    dst = dst_ptr + h * stride_dst_head
    tl.store(dst + j, out1.to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF + j, out2.to(dst_ptr.dtype.element_ty), mask=mask)
    if TAIL_PAD > 0:
        t = 2 * HALF + tl.arange(0, TAIL_PAD)[None, :]
        tl.store(dst + t, tail.to(dst_ptr.dtype.element_ty), mask=(h < NUM_HEADS) & (t < HEAD_DIM))


@triton.jit
def _rotary_embedding_kernel(
    pos_ptr, q_ptr, k_ptr, cos_sin_ptr, q_out_ptr, k_out_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head,
    stride_qo_tok, stride_qo_head, stride_ko_tok, stride_ko_head, stride_cos_sin,
    NUM_Q_HEADS: tl.constexpr, Q_HEADS_PAD: tl.constexpr, NUM_K_HEADS: tl.constexpr, K_HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, TAIL_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cos, sin = _load_cos_sin(pos_ptr, cos_sin_ptr, token, stride_cos_sin, HALF, HALF_PAD)
    q1, q2, q_tail = _rotate_heads(q_ptr + token * stride_q_tok, stride_q_head, cos, sin,
                                   NUM_Q_HEADS, Q_HEADS_PAD, HEAD_DIM, HALF, HALF_PAD, TAIL_PAD)
    k1, k2, k_tail = _rotate_heads(k_ptr + token * stride_k_tok, stride_k_head, cos, sin,
                                   NUM_K_HEADS, K_HEADS_PAD, HEAD_DIM, HALF, HALF_PAD, TAIL_PAD)
    _store_heads(q_out_ptr + token * stride_qo_tok, stride_qo_head, q1, q2, q_tail,
                 NUM_Q_HEADS, Q_HEADS_PAD, HEAD_DIM, HALF, HALF_PAD, TAIL_PAD)
    _store_heads(k_out_ptr + token * stride_ko_tok, stride_ko_head, k1, k2, k_tail,
                 NUM_K_HEADS, K_HEADS_PAD, HEAD_DIM, HALF, HALF_PAD, TAIL_PAD)


@triton.jit
def _rotary_store_kv_kernel(
    pos_ptr, q_ptr, k_ptr, v_ptr, cos_sin_ptr, q_out_ptr, cache_ptr, slot_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_qo_tok, stride_qo_head, stride_cos_sin, stride_c_block, stride_c_kv, stride_c_tok,
    BLOCK_SIZE: tl.constexpr, NUM_Q_HEADS: tl.constexpr, Q_HEADS_PAD: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr, KV_HEADS_PAD: tl.constexpr, KV_ROW_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, TAIL_PAD: tl.constexpr,
    PDL: tl.constexpr,
):
    # Every load goes out before the first store: a load after a store could alias it
    # and would wait for it. Slots and positions are step metadata, not a kernel's output.
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    cos, sin = _load_cos_sin(pos_ptr, cos_sin_ptr, token, stride_cos_sin, HALF, HALF_PAD)
    pdl.wait(PDL)
    pdl.launch_dependents(PDL)
    q1, q2, q_tail = _rotate_heads(q_ptr + token * stride_q_tok, stride_q_head, cos, sin,
                                   NUM_Q_HEADS, Q_HEADS_PAD, HEAD_DIM, HALF, HALF_PAD, TAIL_PAD)
    k1, k2, k_tail = _rotate_heads(k_ptr + token * stride_k_tok, stride_k_head, cos, sin,
                                   NUM_KV_HEADS, KV_HEADS_PAD, HEAD_DIM, HALF, HALF_PAD, TAIL_PAD)
    v = _load_heads(v_ptr + token * stride_v_tok, stride_v_head, NUM_KV_HEADS, HEAD_DIM, KV_ROW_PAD)
    _store_heads(q_out_ptr + token * stride_qo_tok, stride_qo_head, q1, q2, q_tail,
                 NUM_Q_HEADS, Q_HEADS_PAD, HEAD_DIM, HALF, HALF_PAD, TAIL_PAD)
    if slot >= 0:
        row = _cache_row(cache_ptr, slot, stride_c_block, stride_c_tok, BLOCK_SIZE)
        _store_heads(row, HEAD_DIM, k1, k2, k_tail, NUM_KV_HEADS, KV_HEADS_PAD, HEAD_DIM, HALF, HALF_PAD, TAIL_PAD)
        _store_row(row + stride_c_kv, v, NUM_KV_HEADS, HEAD_DIM, KV_ROW_PAD)


@triton.jit
def _qkv_rotary_store_kv_kernel(
    x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, b_ptr, pos_ptr, cos_sin_ptr, slot_ptr, q_out_ptr, cache_ptr,
    K, GROUPS, stride_xm, stride_wn, stride_qo_tok, stride_cos_sin, stride_c_block, stride_c_kv, stride_c_tok,
    M: tl.constexpr, M_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    PDL: tl.constexpr, FP8: tl.constexpr, GROUP_N: tl.constexpr, GROUP_K: tl.constexpr,
):
    # Each program computes two output columns of one head of the fused weight (q heads, then
    # k, then v): a pair that rotates together (j, j + HALF), or two neighbours that pass
    # through (a v head, or the dims past rotary_dim).
    head = tl.program_id(0) // (HEAD_DIM // 2)
    j = tl.program_id(0) % (HEAD_DIM // 2)
    rotated = (head < NUM_Q_HEADS + NUM_KV_HEADS) & (j < HALF)
    offs = tl.where(rotated, j, 2 * j) + tl.arange(0, 2) * tl.where(rotated, HALF, 1)
    rows = tl.arange(0, M_PAD)
    row_ok = rows < M
    # Positions, slots and the cos/sin rows are step metadata: they load before the wait.
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    slot = tl.load(slot_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    cos_sin = cos_sin_ptr + pos * stride_cos_sin + tl.minimum(j, HALF - 1)  # unused unless rotated
    cos = tl.load(cos_sin, mask=row_ok, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin + HALF, mask=row_ok, other=0.0).to(tl.float32)
    cols = head * HEAD_DIM + offs
    acc = _gemv_columns(x_ptr, w_ptr, cols, cols >= 0, K, stride_xm, stride_wn, M, M_PAD, None, BLOCK_K, EVEN_K, PDL,
                        FP8, x_scale_ptr, w_scale_ptr, GROUPS, GROUP_N, GROUP_K)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols).to(tl.float32)[None, :]
    # The projection's output as the unfused path stores it, then rotated as _rotate_heads does.
    dtype = q_out_ptr.dtype.element_ty   # the model's (x's, unless x is E4M3)
    x1, x2 = tl.split(acc.to(dtype).to(tl.float32))
    out = tl.where(rotated, tl.join(x1 * cos - x2 * sin, x2 * cos + x1 * sin), acc).to(dtype)
    if head < NUM_Q_HEADS:
        tl.store(q_out_ptr + rows[:, None] * stride_qo_tok + cols[None, :], out, mask=row_ok[:, None])
    else:
        is_v = head >= NUM_Q_HEADS + NUM_KV_HEADS
        kv_head = head - NUM_Q_HEADS - NUM_KV_HEADS * is_v.to(tl.int32)
        row = _cache_row(cache_ptr, slot, stride_c_block, stride_c_tok, BLOCK_SIZE) + is_v.to(tl.int64) * stride_c_kv
        tl.store(row[:, None] + kv_head * HEAD_DIM + offs[None, :], out.to(cache_ptr.dtype.element_ty),
                 mask=(row_ok & (slot >= 0))[:, None])


def _check_cos_sin(positions: torch.Tensor, num_tokens: int, cos_sin_cache: torch.Tensor, head_dim: int, like: torch.Tensor) -> dict[str, int]:
    """Check the positions of ``num_tokens`` tokens (-1: any) and the cache; returns the
    rotation's launch constants."""
    check_int_index("positions", positions, (num_tokens,), like)
    check_shape("cos_sin_cache", cos_sin_cache, (-1, -1))
    check_dtype("cos_sin_cache", cos_sin_cache)
    check_device("cos_sin_cache", cos_sin_cache, like)
    check_last_dim_contiguous("cos_sin_cache", cos_sin_cache)
    rotary_dim = cos_sin_cache.shape[1]
    if rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"cos_sin_cache width {rotary_dim} must be even and <= head_dim {head_dim}")
    half, tail = rotary_dim // 2, head_dim - rotary_dim
    return {"HEAD_DIM": head_dim, "HALF": half, "HALF_PAD": triton.next_power_of_2(half),
            "TAIL_PAD": triton.next_power_of_2(tail) if tail else 0}


def _check_rotary_args(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor) -> dict[str, int]:
    """Check what both wrappers take; returns the rotation's launch constants."""
    num_tokens = query.shape[0] if query.dim() == 3 else -1
    head_dim = query.shape[-1]
    for name, t in (("query", query), ("key", key)):
        check_shape(name, t, (num_tokens, -1, head_dim))
        check_dtype(name, t)
        check_device(name, t, query)
        check_last_dim_contiguous(name, t)
    return _check_cos_sin(positions, num_tokens, cos_sin_cache, head_dim, query)


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``query`` ``[tokens, heads, head_dim]`` and ``key`` ``[tokens, kv_heads, head_dim]``
    by ``positions`` ``[tokens]``; returns the rotated pair."""
    consts = _check_rotary_args(positions, query, key, cos_sin_cache)
    q_out, k_out = torch.empty_like(query), torch.empty_like(key)
    if query.shape[0] == 0:
        return q_out, k_out
    _rotary_embedding_kernel[(query.shape[0],)](
        positions, query, key, cos_sin_cache, q_out, k_out,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos_sin_cache.stride(0),
        NUM_Q_HEADS=query.shape[1], Q_HEADS_PAD=triton.next_power_of_2(query.shape[1]),
        NUM_K_HEADS=key.shape[1], K_HEADS_PAD=triton.next_power_of_2(key.shape[1]), **consts,
    )
    return q_out, k_out


def rotary_store_kv(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """``rotary_embedding`` then ``store_kv`` in one launch: rotate ``query`` ``[tokens, heads, head_dim]``
    and ``key`` ``[tokens, kv_heads, head_dim]`` by ``positions`` ``[tokens]``, write the rotated key and
    ``value`` ``[tokens, kv_heads, head_dim]`` into ``kv_cache`` at ``slot_mapping`` ``[tokens]`` (a
    negative slot is skipped), and return the rotated query."""
    consts = _check_rotary_args(positions, query, key, cos_sin_cache)
    check_store_kv_args(key, value, kv_cache, slot_mapping)
    check_device("kv_cache", kv_cache, query)
    _, _, block_size, kv_heads, head_dim = kv_cache.shape
    num_tokens = query.shape[0]
    q_out = torch.empty_like(query)
    if num_tokens == 0:
        return q_out
    _rotary_store_kv_kernel[(num_tokens,)](
        positions, query, key, value, cos_sin_cache, q_out, kv_cache, slot_mapping,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        q_out.stride(0), q_out.stride(1), cos_sin_cache.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        BLOCK_SIZE=block_size, NUM_Q_HEADS=query.shape[1], Q_HEADS_PAD=triton.next_power_of_2(query.shape[1]),
        NUM_KV_HEADS=kv_heads, KV_HEADS_PAD=triton.next_power_of_2(kv_heads),
        KV_ROW_PAD=triton.next_power_of_2(kv_heads * head_dim), **consts, **pdl.launch_options(query),
    )
    return q_out


def _qkv_shape(weight: torch.Tensor, kv_cache: torch.Tensor) -> tuple[int, int, int]:
    """(query heads, kv heads, head dim) of a fused q/k/v weight writing into ``kv_cache``."""
    check_kv_cache(kv_cache)
    _, _, _, kv_heads, head_dim = kv_cache.shape
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (each program owns two of a head's columns), got {head_dim}")
    rows = weight.shape[0] if weight.dim() == 2 else 0
    if rows % head_dim or rows // head_dim <= 2 * kv_heads:
        raise ValueError(f"weight has {rows} rows: it must stack q, k and v heads of {head_dim} ({kv_heads} k and v heads each)")
    return rows // head_dim - 2 * kv_heads, kv_heads, head_dim


def qkv_rotary_store_kv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    weight_scale: torch.Tensor | None = None,
    block: tuple[int, int] | None = None,
    x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``rotary_store_kv`` of ``linear(x, weight, bias, weight_scale, block, x_fp8)`` split into q, k and v, in
    one launch (after the rows' quantization with FP8 weights): ``x`` ``[M, hidden]`` (M <=
    ``linear.MAX_GEMV_ROWS``), ``weight`` ``[(heads + 2 * kv_heads) * head_dim, hidden]`` (E4M3 with
    ``weight_scale``, per output channel or per ``block`` the GEMV takes: ``kernels/fp8.py``); writes
    the rotated keys and the values into ``kv_cache`` at ``slot_mapping`` ``[M]`` (a negative slot is
    skipped) and returns the rotated query ``[M, heads, head_dim]``."""
    _check_linear_args(x, weight, bias, gated=False, weight_scale=weight_scale, block=block, x_fp8=x_fp8)
    heads, kv_heads, head_dim = _qkv_shape(weight, kv_cache)
    consts = _check_cos_sin(positions, x.shape[0], cos_sin_cache, head_dim, x)
    check_device("kv_cache", kv_cache, x)
    check_int_index("slot_mapping", slot_mapping, (x.shape[0],), x)
    m, k = x.shape
    q_out = torch.empty((m, heads, head_dim), dtype=x.dtype, device=x.device)
    if m == 0:
        return q_out
    x_scale = weight
    if weight_scale is not None:
        x, x_scale = fp8_input(x, block, x_fp8=x_fp8)
    group_n, group_k = (0, 0) if block is None else block
    _qkv_rotary_store_kv_kernel[((heads + 2 * kv_heads) * head_dim // 2,)](
        x, x_scale, weight, weight if weight_scale is None else weight_scale, weight if bias is None else bias, positions,
        cos_sin_cache, slot_mapping, q_out, kv_cache,
        k, -(-k // group_k) if group_k else 0, x.stride(0), weight.stride(0), q_out.stride(0), cos_sin_cache.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        M=m, M_PAD=triton.next_power_of_2(m), HAS_BIAS=bias is not None, NUM_Q_HEADS=heads, NUM_KV_HEADS=kv_heads,
        HEAD_DIM=head_dim, HALF=consts["HALF"], BLOCK_SIZE=kv_cache.shape[2], BLOCK_K=DEFAULT_CONFIG.block_k,
        EVEN_K=k % DEFAULT_CONFIG.block_k == 0, FP8=weight_scale is not None, GROUP_N=group_n, GROUP_K=group_k,
        num_warps=DEFAULT_CONFIG.num_warps, num_stages=DEFAULT_CONFIG.num_stages, **pdl.launch_options(x),
    )
    return q_out


def split_qkv(qkv: torch.Tensor, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of a fused projection's output ``[T, (heads + 2 * kv_heads) * head_dim]`` as q
    ``[T, heads, head_dim]``, k and v ``[T, kv_heads, head_dim]``."""
    tokens, width = qkv.shape
    q, k, v = qkv.split([width - 2 * kv_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return q.view(tokens, -1, head_dim), k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = cos.shape[-1]
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half : 2 * half]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((rotated, xf[..., 2 * half :]), dim=-1).to(x.dtype)


def ref_rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``query`` ``[tokens, heads, head_dim]`` and ``key`` ``[tokens, kv_heads, head_dim]``
    by ``positions`` ``[tokens]``; returns the rotated pair."""
    cos_sin = cos_sin_cache.index_select(0, positions.long()).float()
    cos, sin = cos_sin.chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return _rotate(query, cos, sin), _rotate(key, cos, sin)


def ref_rotary_store_kv(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """``ref_rotary_embedding`` then ``ref_store_kv``: rotate ``query`` ``[tokens, heads, head_dim]`` and
    ``key`` ``[tokens, kv_heads, head_dim]`` by ``positions`` ``[tokens]``, write the rotated key and
    ``value`` ``[tokens, kv_heads, head_dim]`` into ``kv_cache`` at ``slot_mapping`` ``[tokens]`` (a
    negative slot is skipped), and return the rotated query."""
    query, key = ref_rotary_embedding(positions, query, key, cos_sin_cache)
    ref_store_kv(key, value, kv_cache, slot_mapping)
    return query


def ref_qkv_rotary_store_kv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    weight_scale: torch.Tensor | None = None,
    block: tuple[int, int] | None = None,
    x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``ref_rotary_store_kv`` of ``ref_linear(x, weight, bias)`` (``ref_fp8_linear`` with
    ``weight_scale``, ``ref_fp8_block_linear`` with a ``block`` too; either with ``x_fp8``) split into q, k and v:
    writes the rotated keys and the values into ``kv_cache`` at ``slot_mapping`` and returns the
    rotated query."""
    _, kv_heads, head_dim = _qkv_shape(weight, kv_cache)
    check_x_fp8(x_fp8, x, weight_scale, block)
    if weight_scale is None:
        qkv = ref_linear(x, weight, bias)
    elif block is None:
        qkv = ref_fp8_linear(x, weight, weight_scale, bias, x_fp8)
    else:
        qkv = ref_fp8_block_linear(x, weight, weight_scale, block, bias, x_fp8)
    q, k, v = split_qkv(qkv, kv_heads, head_dim)
    return ref_rotary_store_kv(positions, q, k, v, cos_sin_cache, kv_cache, slot_mapping)
