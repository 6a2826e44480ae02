"""The plain-torch kernel references against independent float64 implementations
(dense attention per sequence, token-by-token KV walks, complex-number rotary),
the CPU dispatch of ``baton.kernels.ops``, and the wrappers' argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from kernel_cases import GQA, fresh_seed  # noqa: F401 (fresh_seed is an autouse fixture)

from baton.kernels import activation, attention, kv_cache, norm, ops, rotary
from baton.kernels.attention_decode import DEFAULT_CONFIGS, FP8_CONFIGS_128, default_config, split_context

pytestmark = pytest.mark.unit



def _paged_case(q_lens: list[int], seq_lens: list[int], heads: int, kv_heads: int, block_size: int, head_dim: int = 16):
    """Random KV pool, shuffled block tables with random padding entries, random queries."""
    blocks_per_seq = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    width = max(blocks_per_seq) + 2
    perm = torch.randperm(num_blocks)
    tables = torch.randint(0, num_blocks, (len(seq_lens), width), dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = perm[used : used + n]
        used += n
    cache = torch.randn(num_blocks, 2, block_size, kv_heads, head_dim)
    q = torch.randn(sum(q_lens), heads, head_dim)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, cache, cu, torch.tensor(seq_lens, dtype=torch.int32), tables


def _naive_context(cache: torch.Tensor, table: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V ``[seq_len, kv_heads, dim]`` in float64, walking the table token by token."""
    bs = cache.shape[2]
    ks = [cache[int(table[p // bs]), 0, p % bs] for p in range(seq_len)]
    vs = [cache[int(table[p // bs]), 1, p % bs] for p in range(seq_len)]
    return torch.stack(ks).double(), torch.stack(vs).double()


def _naive_attention(q, cache, cu, seq_lens, tables, scale) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // cache.shape[3]
    for i, seq_len in enumerate(seq_lens.tolist()):
        start, end = int(cu[i]), int(cu[i + 1])
        k, v = _naive_context(cache, tables[i], seq_len)
        for j in range(start, end):
            pos = seq_len - (end - start) + (j - start)
            for h in range(q.shape[1]):
                scores = (k[: pos + 1, h // group] @ q[j, h].double()) * scale
                out[j, h] = torch.softmax(scores, 0) @ v[: pos + 1, h // group]
    return out


@pytest.mark.parametrize("heads,kv_heads", GQA)
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_ref_paged_attention_matches_dense_float64(heads: int, kv_heads: int, block_size: int) -> None:
    # (q_len, seq_len): whole prompts, a cached prefix + new tokens, single tokens, an empty query.
    pairs = [(1, 1), (7, 7), (5, 40), (1, 33), (0, 9), (19, 19 + block_size)]
    q, cache, cu, seq_lens, tables = _paged_case([a for a, _ in pairs], [b for _, b in pairs], heads, kv_heads, block_size)
    got = attention.ref_paged_attention(q, cache, cu, seq_lens, tables, 0.3)
    want = _naive_attention(q, cache, cu, seq_lens, tables, 0.3)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads", GQA)
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_ref_paged_decode_attention_matches_dense_float64(heads: int, kv_heads: int, block_size: int) -> None:
    lens = [1, block_size, block_size + 1, 3 * block_size - 5, 70]
    q, cache, cu, seq_lens, tables = _paged_case([1] * len(lens), lens, heads, kv_heads, block_size)
    got = attention.ref_paged_decode_attention(q, cache, seq_lens, tables, 0.2)
    want = _naive_attention(q, cache, cu, seq_lens, tables, 0.2)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_ref_store_kv_writes_each_valid_slot_and_skips_padding() -> None:
    cache = torch.randn(6, 2, 8, 2, 16)
    before = cache.clone()
    slots = torch.tensor([5, -1, 47, 8, -3, 20], dtype=torch.int32)
    key, value = torch.randn(6, 2, 16), torch.randn(6, 2, 16)
    kv_cache.ref_store_kv(key, value, cache, slots)
    expected = before.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected[slot // 8, 0, slot % 8] = key[t]
            expected[slot // 8, 1, slot % 8] = value[t]
    assert torch.equal(cache, expected)


def test_ref_gather_then_scatter_round_trips_blocks() -> None:
    cache = torch.randn(10, 2, 16, 2, 8)
    ids = torch.randperm(10)[:4].int()
    packed = kv_cache.ref_gather_blocks(cache, ids)
    assert packed.is_contiguous()
    for i, b in enumerate(ids.tolist()):
        assert torch.equal(packed[i], cache[b])
    target = torch.randn_like(cache)
    untouched = [b for b in range(10) if b not in ids.tolist()]
    before = target.clone()
    kv_cache.ref_scatter_blocks(target, ids, packed)
    assert torch.equal(target[ids.long()], cache[ids.long()])
    assert torch.equal(target[untouched], before[untouched])


@pytest.mark.parametrize("with_residual", [False, True])
def test_ref_rms_norm_matches_float64(with_residual: bool) -> None:
    x, w, r = torch.randn(5, 3, 96), torch.randn(96), torch.randn(5, 3, 96)
    got = norm.ref_rms_norm(x, w, 1e-5, r if with_residual else None)
    s = x.double() + (r.double() if with_residual else 0)
    want = s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    normed = got[0] if with_residual else got
    torch.testing.assert_close(normed.double(), want, rtol=1e-5, atol=1e-5)
    if with_residual:
        torch.testing.assert_close(got[1].double(), s, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ref_rms_norm_unit_offset_is_gemmas_norm(dtype: torch.dtype) -> None:
    """``unit_offset`` scales by ``1 + weight`` in float32 and rounds once: transformers' Gemma
    norm bit for bit (Llama's rounds before the weight, which differs in bfloat16)."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    hf = Gemma2RMSNorm(96, eps=1e-6).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(96))
    x = torch.randn(5, 96, dtype=dtype) * 3
    assert torch.equal(norm.ref_rms_norm(x, hf.weight, 1e-6, unit_offset=True), hf(x))
    if dtype == torch.bfloat16:
        assert not torch.equal(norm.ref_rms_norm(x, hf.weight + 1, 1e-6), hf(x))


@pytest.mark.parametrize("rotary_dim", [32, 16])
def test_ref_rotary_matches_complex_rotation(rotary_dim: int) -> None:
    head_dim, max_pos = 32, 64
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cache = torch.cat((angles.cos(), angles.sin()), -1).float()
    pos = torch.randint(0, max_pos, (9,))
    q, k = torch.randn(9, 4, head_dim), torch.randn(9, 2, head_dim)
    got_q, got_k = rotary.ref_rotary_embedding(pos, q, k, cache)
    half = rotary_dim // 2
    for x, got in ((q, got_q), (k, got_k)):
        z = torch.complex(x[..., :half].double(), x[..., half:rotary_dim].double()) * torch.polar(torch.ones_like(angles[pos]), angles[pos])[:, None]
        want = torch.cat((z.real, z.imag, x[..., rotary_dim:].double()), -1)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_ref_rotary_store_kv_is_rotate_then_store_and_skips_padding() -> None:
    qkv = torch.randn(6, (4 + 2 * 2) * 16)
    q, k, v = (t.view(6, -1, 16) for t in qkv.split([4 * 16, 2 * 16, 2 * 16], dim=-1))
    pos, cos_sin = torch.randint(0, 32, (6,)), torch.randn(32, 12)
    cache = torch.randn(6, 2, 8, 2, 16, dtype=torch.float16)
    expected = cache.clone()
    slots = torch.tensor([5, -1, 47, 8, -3, 20])
    got_q = rotary.ref_rotary_store_kv(pos, q, k, v, cos_sin, cache, slots)
    want_q, want_k = rotary.ref_rotary_embedding(pos, q, k, cos_sin)
    assert torch.equal(got_q, want_q)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected[slot // 8, 0, slot % 8] = want_k[t]
            expected[slot // 8, 1, slot % 8] = v[t]
    assert torch.equal(cache, expected)


def test_ref_act_and_mul_is_swiglu_by_default() -> None:
    x = torch.randn(6, 2 * 40)
    g, u = x[:, :40].double(), x[:, 40:].double()
    torch.testing.assert_close(activation.ref_act_and_mul(x).double(), g * torch.sigmoid(g) * u, rtol=1e-5, atol=1e-5)


def test_ops_use_the_references_for_cpu_tensors() -> None:
    q, cache, cu, seq_lens, tables = _paged_case([3, 1], [3, 20], 4, 2, 8)
    assert torch.equal(ops.paged_attention(q, cache, cu, seq_lens, tables, 0.5), attention.ref_paged_attention(q, cache, cu, seq_lens, tables, 0.5))
    x, w = torch.randn(3, 32), torch.randn(32)
    assert torch.equal(ops.rms_norm(x, w, 1e-6), norm.ref_rms_norm(x, w, 1e-6))
    assert torch.equal(ops.act_and_mul(x=x), activation.ref_act_and_mul(x))
    qkv_w, cache = torch.randn((4 + 2 * 2) * 16, 32), torch.randn(6, 2, 8, 2, 16)
    pos, cos_sin, slots = torch.randint(0, 32, (3,)), torch.randn(32, 16), torch.tensor([5, -1, 47])
    want_cache = cache.clone()
    want_q = rotary.ref_qkv_rotary_store_kv(x, qkv_w, None, pos, cos_sin, want_cache, slots)
    assert torch.equal(ops.qkv_rotary_store_kv(x, qkv_w, None, pos, cos_sin, cache, slots), want_q)
    assert torch.equal(cache, want_cache)
    names = ["gather_blocks", "scatter_blocks", "paged_attention", "paged_decode_attention", "rms_norm", "rotary_store_kv", "act_and_mul"]
    assert all(callable(getattr(ops, n)) for n in names)


@pytest.mark.parametrize("heads,kv_heads", GQA)
@pytest.mark.parametrize("block_size", [8, 16])
def test_ref_paged_decode_attention_over_drafted_rows_matches_dense_float64(heads: int, kv_heads: int, block_size: int) -> None:
    """``query_len`` rows a sequence (a token and its draft), each the last positions of its context."""
    for query_len in (2, 5):
        lens = [query_len, block_size + 1, 3 * block_size - 5, 70]
        q, cache, cu, seq_lens, tables = _paged_case([query_len] * len(lens), lens, heads, kv_heads, block_size)
        got = attention.ref_paged_decode_attention(q, cache, seq_lens, tables, 0.2, query_len=query_len)
        want = _naive_attention(q, cache, cu, seq_lens, tables, 0.2)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_decode_default_config_halves_tiles_only_where_each_split_is_one_tile() -> None:
    cpu = torch.device("cpu")  # four SMs, as the launch assumes off the GPU
    deep, light = DEFAULT_CONFIGS[64]
    short = default_config(1, 2, 64, 80, cpu)
    assert (short.tile_n, short.min_split_tokens, short.num_warps) == (deep.tile_n // 2, deep.tile_n // 2, deep.num_warps)
    assert split_context(cpu, 1, 2, 80, short)[0] > split_context(cpu, 1, 2, 80, deep)[0]
    assert default_config(1, 2, 64, 4096, cpu) == deep  # a long context: splits of many tiles
    assert default_config(64, 8, 64, 80, cpu) == light  # more KV heads than a wave of deep programs holds
    assert default_config(64, 8, 64, 80, cpu, kv_bytes=1) == light
    assert default_config(64, 8, 128, 80, cpu, kv_bytes=1) == FP8_CONFIGS_128[1]   # an 8-bit cache: larger tiles
    assert default_config(64, 8, 128, 80, cpu) == DEFAULT_CONFIGS[128][1]


def _bad_decode_calls():
    q, cache, _, seq_lens, tables = _paged_case([1, 1], [5, 9], 4, 2, 8)
    yield "dtype", lambda: attention.paged_decode_attention(q.half(), cache, seq_lens, tables, 1.0)
    yield "kv_cache must have shape", lambda: attention.paged_decode_attention(q, cache[:, 0], seq_lens, tables, 1.0)
    yield "contiguous", lambda: attention.paged_decode_attention(q, cache.transpose(2, 3), seq_lens, tables, 1.0)
    yield "multiple of num_kv_heads", lambda: attention.paged_decode_attention(q[:, :3], cache, seq_lens, tables, 1.0)
    yield "block_tables must have dtype", lambda: attention.paged_decode_attention(q, cache, seq_lens, tables.float(), 1.0)
    yield "seq_lens must have shape", lambda: attention.paged_decode_attention(q, cache, seq_lens[:1], tables, 1.0)
    yield "not a whole number of sequences of query_len=3", lambda: attention.paged_decode_attention(q, cache, seq_lens, tables, 1.0, query_len=3)
    yield "seq_lens must have shape \\[1\\]", lambda: attention.paged_decode_attention(q, cache, seq_lens, tables, 1.0, query_len=2)
    for bad in (0, -1, 1.0, True):
        yield f"query_len must be a positive int, got {bad!r}", lambda b=bad: attention.paged_decode_attention(q, cache, seq_lens, tables, 1.0, query_len=b)
    yield "cu_query_lens must have shape", lambda: attention.paged_attention(q, cache, seq_lens, seq_lens, tables, 1.0)
    yield "head_dim must be a power of two", lambda: attention.paged_attention(q[..., :12], cache[..., :12].contiguous(), torch.tensor([0, 1, 2], dtype=torch.int32), seq_lens, tables, 1.0)
    yield "slot_mapping must have shape", lambda: kv_cache.store_kv(q[:, :2], q[:, :2], cache, seq_lens[:1])
    yield "packed must have shape", lambda: kv_cache.scatter_blocks(cache, seq_lens, cache[:3])
    yield "weight must have shape", lambda: norm.rms_norm(q, torch.ones(3), 1e-6)
    yield "even last dim", lambda: activation.act_and_mul(torch.randn(2, 5))
    yield "must be even and <= head_dim", lambda: rotary.rotary_embedding(seq_lens, q, q, torch.randn(10, 20))
    yield "value must have shape", lambda: rotary.rotary_store_kv(seq_lens, q, q[:, :2], q[:, :1], torch.randn(10, 16), cache, seq_lens)
    yield "kv_cache must have shape", lambda: rotary.rotary_store_kv(seq_lens, q, q[:, :2], q[:, :2], torch.randn(10, 16), cache[:, 0], seq_lens)
    x, w = torch.randn(2, 32), torch.randn((4 + 2 * 2) * 16, 32)
    yield "must stack q, k and v heads", lambda: rotary.qkv_rotary_store_kv(x, w[:70], None, seq_lens, torch.randn(10, 16), cache, seq_lens)
    yield "positions must have shape", lambda: rotary.qkv_rotary_store_kv(x, w, None, seq_lens[:1], torch.randn(10, 16), cache, seq_lens)
    yield "slot_mapping must have dtype", lambda: rotary.qkv_rotary_store_kv(x, w, None, seq_lens, torch.randn(10, 16), cache, seq_lens.float())
    yield "head_dim must be even", lambda: rotary.qkv_rotary_store_kv(x[:, :15], w[:, :15].contiguous(), None, seq_lens, torch.randn(10, 14), torch.randn(4, 2, 8, 2, 15), seq_lens)
    yield "MAX_GEMV_ROWS", lambda: rotary.qkv_rotary_store_kv(torch.randn(5, 32), w, None, seq_lens, torch.randn(10, 16), cache, seq_lens)


@pytest.mark.parametrize("message,call", list(_bad_decode_calls()), ids=lambda v: v if isinstance(v, str) else "")
def test_wrappers_reject_bad_input_with_clear_errors(message: str, call) -> None:
    with pytest.raises(ValueError, match=message):
        call()
