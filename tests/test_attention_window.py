"""Sliding-window attention and capped attention scores (``baton.kernels.attention_options``):
the references against a dense float64 computation, the argument checks, the engine's
pass-through, the decode defaults at head dim 256, and the kernels' window and cap paths
compiled for a Hopper GPU. The kernels run against the references in ``test_kernels.py``
(``window_softcap_cases`` under the interpreter, Gemma 2's shapes on a GPU)."""

from __future__ import annotations

import pytest
import torch

from kernel_cases import GQA, fresh_seed, hopper_ptx  # noqa: F401 (fresh_seed is an autouse fixture)
from test_kernels import paged_case

from baton.engine.attention import AttentionMetadata, paged_attention_forward
from baton.kernels import attention, ops
from baton.kernels.attention_decode import DEFAULT_CONFIGS, FP8_CONFIGS_128, default_config

pytestmark = pytest.mark.unit

# (window, cap): windows of 1, shorter than the contexts, as long as the longest (40) and longer;
# caps that bend scores of about the scale the cases draw (0.3 * N(0, 16)) and far beyond it.
OPTIONS = [(1, None), (6, None), (40, None), (100, None), (None, 2.0), (6, 2.0), (40, 0.5)]


def cpu_case(pairs: list[tuple[int, int]], heads: int, kv_heads: int, block_size: int):
    """``paged_case`` in float32 on the CPU, head dim 16, from ``(q_len, seq_len)`` pairs."""
    return paged_case([a for a, _ in pairs], [b for _, b in pairs], heads, kv_heads, block_size, 16, torch.float32, "cpu")


def dense_attention(q: torch.Tensor, cache: torch.Tensor, cu: torch.Tensor, seq_lens: torch.Tensor, tables: torch.Tensor,
                    scale: float, window: int | None, cap: float | None) -> torch.Tensor:
    """Float64, one query at a time: its sequence's K/V gathered token by token, the keys from
    ``pos - window + 1`` to ``pos`` scored, capped as transformers caps them, softmaxed."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    group, block_size = q.shape[1] // cache.shape[3], cache.shape[2]
    for i, seq_len in enumerate(seq_lens.tolist()):
        start, end = int(cu[i]), int(cu[i + 1])
        rows = [cache[int(tables[i, p // block_size]), :, p % block_size] for p in range(seq_len)]
        for j in range(start, end):
            pos = seq_len - (end - start) + (j - start)
            kv = torch.stack(rows[max(0, pos - window + 1) if window else 0 : pos + 1]).double().repeat_interleave(group, 2)
            scores = torch.einsum("hd,nhd->hn", q[j].double(), kv[:, 0]) * scale
            if cap:
                scores = torch.tanh(scores / cap) * cap
            out[j] = torch.einsum("hn,nhd->hd", torch.softmax(scores, -1), kv[:, 1])
    return out


def assert_matches(got: torch.Tensor, want: torch.Tensor, window: int | None, cap: float | None) -> None:
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=lambda m: f"window {window} cap {cap}: {m}")


# (q_len, seq_len): prompts, cached prefixes, single tokens and an empty query. Runs of up to 16
# queries take the reference's padded call, a longer one its loop over sequences.
PAIRS = {"padded": [(1, 1), (3, 40), (1, 33), (0, 9), (16, 20), (1, 40)],
         "loop": [(1, 1), (7, 7), (5, 40), (0, 9), (25, 35), (40, 40)]}


@pytest.mark.parametrize("heads,kv_heads", GQA)
@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("path", PAIRS)
def test_ref_paged_attention_with_window_and_softcap_matches_dense_float64(heads: int, kv_heads: int, block_size: int,
                                                                           path: str) -> None:
    q, cache, cu, seq_lens, tables = cpu_case(PAIRS[path], heads, kv_heads, block_size)
    for window, cap in OPTIONS:
        got = attention.ref_paged_attention(q, cache, cu, seq_lens, tables, 0.3, sliding_window=window, softcap=cap)
        assert_matches(got, dense_attention(q, cache, cu, seq_lens, tables, 0.3, window, cap), window, cap)


@pytest.mark.parametrize("heads,kv_heads", GQA)
@pytest.mark.parametrize("block_size", [8, 16])
def test_ref_paged_decode_attention_with_window_and_softcap_matches_dense_float64(heads: int, kv_heads: int, block_size: int) -> None:
    lens = [1, 6, block_size, block_size + 1, 3 * block_size - 5, 40]
    q, cache, cu, seq_lens, tables = cpu_case([(1, n) for n in lens], heads, kv_heads, block_size)
    for window, cap in OPTIONS:
        got = attention.ref_paged_decode_attention(q, cache, seq_lens, tables, 0.3, sliding_window=window, softcap=cap)
        assert_matches(got, dense_attention(q, cache, cu, seq_lens, tables, 0.3, window, cap), window, cap)


@pytest.mark.parametrize("heads,kv_heads", GQA)
@pytest.mark.parametrize("window,cap", OPTIONS)
def test_ref_paged_decode_attention_over_drafted_rows_with_window_and_softcap_matches_dense_float64(
        heads: int, kv_heads: int, window: int | None, cap: float | None) -> None:
    q, cache, cu, seq_lens, tables = cpu_case([(4, 4), (4, 9), (4, 33), (4, 40)], heads, kv_heads, 8)
    got = attention.ref_paged_decode_attention(q, cache, seq_lens, tables, 0.3, sliding_window=window, softcap=cap, query_len=4)
    assert_matches(got, dense_attention(q, cache, cu, seq_lens, tables, 0.3, window, cap), window, cap)


def test_window_and_cap_of_zero_or_past_the_context_change_nothing() -> None:
    q, cache, cu, seq_lens, tables = cpu_case([(3, 40), (25, 35)], 4, 2, 8)
    plain = attention.ref_paged_attention(q, cache, cu, seq_lens, tables, 0.3)
    for window, cap in ((0, 0.0), (40, None), (10**9, None)):
        got = attention.ref_paged_attention(q, cache, cu, seq_lens, tables, 0.3, sliding_window=window, softcap=cap)
        assert torch.equal(got, plain)
    decode = attention.ref_paged_decode_attention(q[:2], cache, seq_lens, tables, 0.3)
    got = attention.ref_paged_decode_attention(q[:2], cache, seq_lens, tables, 0.3, sliding_window=0, softcap=0.0)
    assert torch.equal(got, decode)


def _entry_points():
    """Every function that takes ``sliding_window`` and ``softcap``, as ``(name, call(**options))``
    on small CPU inputs (the Triton wrappers check them before anything reaches a kernel)."""
    q, cache, cu, seq_lens, tables = cpu_case([(1, 5), (1, 9)], 4, 2, 8)
    meta = AttentionMetadata(positions=seq_lens.long() - 1, slot_mapping=seq_lens.long(), cu_query_lens=cu, seq_lens=seq_lens,
                             block_tables=tables, max_query_len=1, max_seq_len=9, num_decode_chunks=2, rest_cu_query_lens=None)
    yield "ref_paged_attention", lambda **o: attention.ref_paged_attention(q, cache, cu, seq_lens, tables, 0.3, **o)
    yield "ref_paged_decode_attention", lambda **o: attention.ref_paged_decode_attention(q, cache, seq_lens, tables, 0.3, **o)
    yield "paged_attention", lambda **o: attention.paged_attention(q, cache, cu, seq_lens, tables, 0.3, **o)
    yield "paged_decode_attention", lambda **o: attention.paged_decode_attention(q, cache, seq_lens, tables, 0.3, **o)
    yield "ops.paged_attention", lambda **o: ops.paged_attention(q, cache, cu, seq_lens, tables, 0.3, **o)
    yield "paged_attention_forward", lambda **o: paged_attention_forward(q, cache, meta, 0.3, **o)


BAD_OPTIONS = [({"sliding_window": -1}, "sliding_window"), ({"sliding_window": 2.5}, "sliding_window"),
               ({"sliding_window": True}, "sliding_window"), ({"sliding_window": "4096"}, "sliding_window"),
               ({"softcap": -50.0}, "softcap"), ({"softcap": float("nan")}, "softcap"), ({"softcap": float("inf")}, "softcap"),
               ({"softcap": "50"}, "softcap")]


@pytest.mark.parametrize("name,call", list(_entry_points()), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("options,message", BAD_OPTIONS, ids=str)
def test_bad_window_or_softcap_is_a_value_error(name: str, call, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(**options)


def test_engine_forward_passes_window_and_softcap_to_both_kernels() -> None:
    """A step of two decodes (the decode reference) and two prompt chunks (the prefill one), and a
    step of decodes alone, attend as the prefill reference attends every chunk at once."""
    q, cache, cu, seq_lens, tables = cpu_case([(1, 30), (1, 7), (12, 40), (20, 20)], 8, 2, 8)
    unused = torch.zeros(len(q), dtype=torch.long)   # positions and slots: the layer's cache write, done before
    meta = AttentionMetadata(positions=unused, slot_mapping=unused, cu_query_lens=cu, seq_lens=seq_lens, block_tables=tables,
                             max_query_len=20, max_seq_len=40, num_decode_chunks=2, rest_cu_query_lens=cu[2:] - 2)
    decodes = AttentionMetadata(positions=unused[:2], slot_mapping=unused[:2], cu_query_lens=cu[:3], seq_lens=seq_lens[:2],
                                block_tables=tables[:2], max_query_len=1, max_seq_len=30, num_decode_chunks=2, rest_cu_query_lens=None)
    for window, cap in ((5, 2.0), (None, 2.0), (5, None)):
        want = attention.ref_paged_attention(q, cache, cu, seq_lens, tables, 0.3, sliding_window=window, softcap=cap)
        torch.testing.assert_close(paged_attention_forward(q, cache, meta, 0.3, window, cap), want)
        torch.testing.assert_close(paged_attention_forward(q[:2], cache, decodes, 0.3, window, cap), want[:2])
    assert not torch.allclose(paged_attention_forward(q, cache, meta, 0.3, 5, 2.0), paged_attention_forward(q, cache, meta, 0.3))


def test_engine_forward_attends_a_drafted_step_as_the_prefill_reference() -> None:
    """A CUDA graph's drafted step (every chunk a token and its draft, padded to 3 rows) goes to the
    decode kernel whole: it attends as the prefill reference attends the same runs."""
    q, cache, cu, seq_lens, tables = cpu_case([(3, 30), (3, 7), (3, 3)], 8, 2, 8)
    unused = torch.zeros(len(q), dtype=torch.long)
    meta = AttentionMetadata(positions=unused, slot_mapping=unused, cu_query_lens=cu, seq_lens=seq_lens, block_tables=tables,
                             max_query_len=3, max_seq_len=30, num_decode_chunks=3, rest_cu_query_lens=None, decode_query_len=3)
    for window, cap in ((None, None), (2, 2.0)):
        want = attention.ref_paged_attention(q, cache, cu, seq_lens, tables, 0.3, sliding_window=window, softcap=cap)
        torch.testing.assert_close(paged_attention_forward(q, cache, meta, 0.3, window, cap), want)


def test_decode_default_config_keys_by_head_dim() -> None:
    """Head dims up to 64 take 64's configs, up to 128 128's, past that 256's (sized for its shared
    memory), also over an 8-bit cache, whose wider tiles are 128's alone."""
    cpu = torch.device("cpu")  # four SMs, as the launch assumes off the GPU
    for head_dim, key in ((16, 64), (64, 64), (128, 128), (256, 256), (512, 256)):
        pair = DEFAULT_CONFIGS[key]
        assert (default_config(1, 2, head_dim, 4096, cpu), default_config(64, 8, head_dim, 80, cpu)) == pair
        fp8 = FP8_CONFIGS_128 if key == 128 else pair
        assert (default_config(1, 2, head_dim, 4096, cpu, kv_bytes=1), default_config(64, 8, head_dim, 80, cpu, kv_bytes=1)) == fp8
    assert [c.tile_n for c in FP8_CONFIGS_128] == [2 * c.tile_n for c in DEFAULT_CONFIGS[128]]   # a bf16 tile's bytes


def test_prefill_window_and_softcap_compile_for_hopper() -> None:
    """The prefill kernel's window and cap paths at Gemma 2's head dim, compiled for an sm_90
    target: a mistake in them fails this run, not the next GPU run (the decode kernel's are
    among ``test_kernels.HOPPER_PDL_CASES``)."""
    pointers = {"q_ptr": "*bf16", "kv_ptr": "*bf16", "out_ptr": "*bf16", "cu_query_lens_ptr": "*i32", "seq_lens_ptr": "*i32",
                "tables_ptr": "*i32", "scale_log2": "fp32"}
    constants = dict(GROUP=2, HEAD_DIM=256, BLOCK_SIZE=16, BLOCK_M=64, BLOCK_N=32, DOT_PRECISION="tf32", DOT_FP16=False,
                     WINDOW=4096, SOFTCAP=50.0)
    ptx = hopper_ptx("baton.kernels.attention_prefill:_paged_attention_kernel", pointers, constants)
    assert ".entry _paged_attention_kernel" in ptx
