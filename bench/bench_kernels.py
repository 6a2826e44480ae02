"""Kernel benchmarks on a CUDA GPU: prints a markdown table (and writes it to
``$OUT/kernels_bench.md`` when ``OUT`` is set). No assertions: figures only.

Measured in one run: device copy bandwidth (bytes read + written), paged decode
attention GB/s over a batch x context grid as a fraction of that bandwidth (with
the launch parameters ``attention_decode.default_config`` picks for each case),
prefill attention TFLOP/s (causal FLOPs = 4 * seq^2 / 2 * heads * dim), block
gather/scatter for one layer of a 2,048-token prompt, and the element-wise
kernels. Shapes are Llama-3-8B's (32 query heads, 8 KV heads, head dim 128,
bf16, block 16), plus batch-1 decode in Llama-3.2-1B's shape (head dim 64) with
block tables padded to 1,024 tokens as the decode runner pads them, prefill at
that shape (a 4k prompt, 16 prompts of 512), fused rotary + KV write against the
two separate launches at 1B decode shapes, the q/k/v projection fused with them
against the GEMV and that launch (1B and 8B), and the small-batch linear (GEMV)
kernel against ``F.linear`` on the 1B and 8B projections (``--linear-only`` runs
just that block), and the grouped LoRA kernels against the masked torch path they
replaced on the 8B q/k/v module (``--lora-only`` runs just those). A plain
streaming read of one long sequence's bytes stands beside decode attention's
single-sequence rows. A speculative step's attention (3 and 5 rows a sequence: a token and its
draft) runs by the decode kernel, as a CUDA graph's drafted step runs it, beside the prefill
kernel on the same rows.
``--decode-sweep`` runs just the decode candidates of ``DECODE_CANDIDATES``, each
checked once against its reference, as a table of times over the batch x context
cases of ``DECODE_SWEEP_CASES`` at both head dims, beside the default's choice.
``--prefill-sweep`` runs just the prefill candidates of ``PREFILL_CANDIDATES``:
each is checked once against ``ref_paged_attention``, then timed on 4k, 8k and
16k single prompts and on four 1k chunks after 3k cached tokens each, with
torch's SDPA beside, and at the 1B model's head dim 64 on ``PREFILL_CASES_1B``
(among them the offline benchmark's prefill step, 16 prompts of 512 tokens).
``--gemma2`` runs just decode and prefill attention at Gemma-2-2B's heads (8 query heads over 4
KV heads of 256), its global layers' (scores capped at 50) beside its local ones' (capped, and a
window of 4,096 keys); a windowed row's rate counts the bytes and FLOPs of the keys it attends.
``--moe`` runs just the fused mixture-of-experts rows: one layer of Mixtral-8x7B's and
Qwen3-30B-A3B's experts (bf16) at decode (1-256 tokens) and prefill (4,096) sizes, routed at
random; the rate counts the weight bytes of the experts each routing hits and the FLOPs
``2 * tokens * k * 3 * hidden * inter``.
``--kv-cache-dtype fp8`` (or ``fp8_e5m2``, or ``auto`` for bf16) runs just the decode and
prefill attention rows over a KV pool of that dtype: decode's rate counts the bytes read,
a byte an element for 8-bit floats.
Times are medians of ``do_bench_cudagraph`` (the kernels replayed from a CUDA
graph, as the decode runner replays them; a prefill of a few dozen tokens would
otherwise time the host's launch) or ``triton.testing.do_bench`` (eager decode
beside it, SDPA, the whole sampler, the copy); inputs rotate over several sets
so that the L2 cache does not flatter small cases.

    python3 bench/bench_kernels.py [--quick] [--decode-sweep | --linear-only | --fp8-linear | --lora-only | --prefill-sweep |
                                            --gemma2 | --moe | --kv-cache-dtype auto|fp8|fp8_e5m2]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from triton.testing import do_bench, do_bench_cudagraph

from baton.engine.config import KV_CACHE_DTYPE_NAMES
from baton.engine.sampler import Sampler
from baton.engine.sampling_params import SamplingParams
from baton.engine.sequence import Sequence
from baton.kernels import activation, fp8, kv_cache, linear, logits, lora, moe, norm, pdl, rotary, sampling
from baton.kernels.attention import ref_paged_attention, ref_paged_decode_attention
from baton.kernels.attention_decode import DEFAULT_CONFIGS, DecodeConfig, attended_keys, launch_paged_decode_attention
from baton.kernels.attention_decode import default_config as default_decode_config
from baton.kernels.attention_prefill import PrefillConfig, default_config, launch_paged_attention
from baton.kernels.checks import KV_DTYPES

HEADS, KV_HEADS, DIM, BLOCK, DTYPE = 32, 8, 128, 16, torch.bfloat16
KV_TOKEN_BYTES = 2 * KV_HEADS * DIM * 2  # K and V of one token, bf16
ROTATE_BYTES = 512 * 2**20  # keep at least this much distinct input in rotation


def median_ms(fns: list[Callable[[], object]], graph: bool = False) -> float:
    """Median time of one call; ``graph`` replays the calls from a CUDA graph (as the
    decode runner does), which removes the host's launch cost from the figure."""
    cycle = itertools.cycle(fns)
    if graph:
        return do_bench_cudagraph(lambda: next(cycle)(), rep=100, return_mode="median")
    return do_bench(lambda: next(cycle)(), warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    src = torch.randn(2**30 // 2, dtype=DTYPE, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms([lambda: dst.copy_(src)])
    return 2 * src.numel() * src.element_size() / ms / 1e6


@dataclass(frozen=True)
class Shape:
    """Attention heads of one model: query heads, KV heads, head dim."""

    name: str
    heads: int
    kv_heads: int
    dim: int


LLAMA_8B = Shape("8B", HEADS, KV_HEADS, DIM)
LLAMA_1B = Shape("1B", 32, 8, 64)
GEMMA2_2B = Shape("Gemma-2-2B", 8, 4, 256)
GEMMA2_WINDOW, GEMMA2_CAP = 4096, 50.0   # its local layers' window; the cap on every layer's scores
RUNNER_CONTEXT = 1024  # the model benchmark's max_model_len: its decode tables span this many tokens


class Pool:
    """One large random KV pool (bf16, or ``kv_dtype``); disjoint random block sets for rotation."""

    def __init__(self, num_blocks: int, shape: Shape = LLAMA_8B, kv_dtype: torch.dtype = DTYPE) -> None:
        self.shape = shape
        self.cache = torch.randn(num_blocks, 2, BLOCK, shape.kv_heads, shape.dim, dtype=DTYPE, device="cuda").to(kv_dtype)
        self.perm = torch.randperm(num_blocks, device="cuda").to(torch.int32)

    @property
    def kv_token_bytes(self) -> int:
        """K and V of one token."""
        return 2 * self.shape.kv_heads * self.shape.dim * self.cache.element_size()

    def block_sets(self, blocks_per_set: int, bytes_per_set: int, max_sets: int = 8) -> list[torch.Tensor]:
        sets = max(1, min(max_sets, self.perm.numel() // blocks_per_set, math.ceil(ROTATE_BYTES / bytes_per_set)))
        return [self.perm[i * blocks_per_set : (i + 1) * blocks_per_set] for i in range(sets)]


def decode_launches(pool: Pool, batch: int, ctx: int, config: DecodeConfig | None, table_ctx: int = 0,
                    sliding_window: int | None = None, softcap: float | None = None, query_len: int = 1,
                    via_prefill: bool = False) -> list[Callable[[], object]]:
    """Decode launches of ``batch`` sequences of ``ctx`` tokens over rotating block sets of
    ``pool``, ``query_len`` query rows a sequence (a token and its draft). ``config`` None: the
    default for the case (``attention_decode.default_config``). ``table_ctx`` > ``ctx`` pads each
    block table to that many tokens (the split count follows the table width, as in the decode
    runner's graphs). ``via_prefill``: the same attention by the prefill kernel (default tiles)."""
    shape, per_seq = pool.shape, ctx // BLOCK
    width = max(table_ctx, ctx) // BLOCK
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    keys = attended_keys(width * BLOCK, sliding_window or 0, query_len)   # what the default launch splits
    config = config or default_decode_config(batch, shape.kv_heads, shape.dim, keys, seq_lens.device, pool.cache.element_size())
    options = {"sliding_window": sliding_window, "softcap": softcap}
    cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * query_len
    fns = []
    # Small cases rotate over more sets than fit in L2: in a model, each layer's KV arrives cold.
    for ids in pool.block_sets(batch * per_seq, batch * ctx * pool.kv_token_bytes, 8 if shape == LLAMA_8B else 64):
        q = torch.randn(batch * query_len, shape.heads, shape.dim, dtype=DTYPE, device="cuda")
        tables = torch.zeros(batch, width, dtype=torch.int32, device="cuda")
        tables[:, :per_seq] = ids.view(batch, per_seq)
        if via_prefill:
            fns.append(lambda q=q, t=tables: launch_paged_attention(q, pool.cache, cu, seq_lens, t, shape.dim**-0.5, default_config(q), **options))
        else:
            fns.append(lambda q=q, t=tables: launch_paged_decode_attention(q, pool.cache, seq_lens, t, shape.dim**-0.5, config,
                                                                           query_len=query_len, **options))
    return fns


def decode_row(pool: Pool, batch: int, ctx: int, copy_gbs: float, config: DecodeConfig | None, table_ctx: int = 0,
               sliding_window: int | None = None, softcap: float | None = None) -> str:
    """``decode_launches`` timed from a CUDA graph and eagerly, with the rate of the K/V bytes
    attended (a window's) and the query bytes."""
    shape = pool.shape
    fns = decode_launches(pool, batch, ctx, config, table_ctx, sliding_window, softcap)
    ms, eager_ms = median_ms(fns, graph=True), median_ms(fns)
    gbs = batch * (min(ctx, sliding_window or ctx) * pool.kv_token_bytes + 2 * shape.heads * shape.dim * 2) / ms / 1e6
    case = _decode_case(shape, batch, ctx, table_ctx) + _options_label(sliding_window, softcap)
    return f"| decode | {case} | {ms * 1e3:.1f} us (eager {eager_ms * 1e3:.1f}) | {gbs:.0f} GB/s | {gbs / copy_gbs:.0%} of copy |"


@triton.jit
def _read_kernel(x_ptr, out_ptr, per_program, TILE: tl.constexpr):
    """Sum ``per_program`` contiguous elements per program: a plain streaming read."""
    start = tl.program_id(0).to(tl.int64) * per_program
    acc = tl.zeros([TILE], tl.float32)
    for offset in range(0, per_program, TILE):
        acc += tl.load(x_ptr + start + offset + tl.arange(0, TILE)).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc))


def plain_read_rows(copy_gbs: float) -> list[str]:
    """A plain read of as many bytes as one 8B sequence's K and V at 16k and 32k tokens, over
    256-1,024 programs, beside decode attention's single-sequence rows. Its loads are plain, one 8 KB
    tile in flight a program (no ``cp.async`` pipelining, as decode's K/V tiles have): at 256 programs
    that bounds it by latency, not by HBM, so it is no ceiling for decode's 256 programs."""
    rows = []
    for ctx in (16384, 32768):
        nbytes = ctx * KV_TOKEN_BYTES
        bufs = [torch.randn(nbytes // 2, dtype=DTYPE, device="cuda") for _ in range(max(1, ROTATE_BYTES // nbytes))]
        for programs in (256, 512, 1024):
            out = torch.empty(programs, device="cuda")
            ms = median_ms([lambda b=b: _read_kernel[(programs,)](b, out, nbytes // 2 // programs, TILE=4096) for b in bufs], graph=True)
            gbs = nbytes / ms / 1e6
            rows.append(f"| plain read | {nbytes / 1e6:.0f} MB (8B batch 1, ctx {ctx}), {programs} programs "
                        f"| {ms * 1e3:.1f} us | {gbs:.0f} GB/s | {gbs / copy_gbs:.0%} of copy |")
        del bufs
    return rows


def draft_row(pool: Pool, batch: int, ctx: int, query_len: int, copy_gbs: float, table_ctx: int = 0) -> str:
    """A speculative step's attention, ``query_len`` rows a sequence (a token and its draft), by the
    decode kernel (as a CUDA graph's drafted step runs it) beside the prefill kernel, both timed from
    a CUDA graph; the rate counts the K/V bytes and the query and output rows."""
    shape = pool.shape
    ms = median_ms(decode_launches(pool, batch, ctx, None, table_ctx, query_len=query_len), graph=True)
    prefill_ms = median_ms(decode_launches(pool, batch, ctx, None, table_ctx, query_len=query_len, via_prefill=True), graph=True)
    gbs = batch * (ctx * pool.kv_token_bytes + 2 * query_len * shape.heads * shape.dim * 2) / ms / 1e6
    case = _decode_case(shape, batch, ctx, table_ctx)
    return (f"| decode, {query_len} rows a sequence | {case} | {ms * 1e3:.1f} us (prefill kernel {prefill_ms * 1e3:.1f}: "
            f"{prefill_ms / ms:.1f}x) | {gbs:.0f} GB/s | {gbs / copy_gbs:.0%} of copy |")


def _decode_case(shape: Shape, batch: int, ctx: int, table_ctx: int) -> str:
    """A decode row's case: the shape, batch and context, and the tables' width where wider."""
    width = max(table_ctx, ctx) // BLOCK
    return f"{shape.name} batch {batch}, ctx {ctx}" + (f" (tables {width * BLOCK})" if width > ctx // BLOCK else "")


def _options_label(sliding_window: int | None, softcap: float | None) -> str:
    return (f", window {sliding_window}" if sliding_window else "") + (f", cap {softcap:g}" if softcap else "")


def prefill_row(pool: Pool, seq: int, config: PrefillConfig | None, label: str, batch: int = 1, prefix: int = 0,
                sliding_window: int | None = None, softcap: float | None = None) -> str:
    """``batch`` sequences of ``seq`` new tokens, each after ``prefix`` cached ones (a multiple
    of the block size), in the pool's shape; TFLOP/s of the causal work,
    4 * dim * heads * seq * (prefix + seq / 2), or with a window 4 * dim * heads times the keys
    each new token attends."""
    shape, per_seq = pool.shape, (prefix + seq) // BLOCK
    cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * seq
    seq_lens = torch.full((batch,), prefix + seq, dtype=torch.int32, device="cuda")
    fns = []
    for ids in pool.block_sets(batch * per_seq, batch * (prefix + seq) * pool.kv_token_bytes)[:2]:
        q = torch.randn(batch * seq, shape.heads, shape.dim, dtype=DTYPE, device="cuda")
        fns.append(lambda q=q, t=ids.view(batch, per_seq): launch_paged_attention(
            q, pool.cache, cu, seq_lens, t, shape.dim**-0.5, config or default_config(q), sliding_window=sliding_window, softcap=softcap))
    ms = median_ms(fns, graph=True)
    keys = sum(min(p + 1, sliding_window) for p in range(prefix, prefix + seq)) if sliding_window else seq * (prefix + seq / 2)
    tflops = 4 * batch * keys * shape.heads * shape.dim / ms / 1e9
    case = (f"{shape.name} " if shape != LLAMA_8B else "") + f"{batch} x {seq} tokens" + (f" after {prefix} cached" if prefix else "")
    case += _options_label(sliding_window, softcap)
    return f"| prefill {label} | {case} | {ms * 1e3:.1f} us | {tflops:.0f} TFLOP/s | |"


def prefill_error(pool: Pool, config: PrefillConfig) -> float:
    """Relative error (as the kernel tests measure it) against ``ref_paged_attention`` on fresh
    random queries: a chunk after a cached prefix, a whole prompt and a short chunk, none a
    multiple of the tiles, over blocks of the pool."""
    pairs = [(1000, 3000), (1537, 1537), (77, 2100)]  # (new tokens, context)
    widths = [math.ceil(ctx / BLOCK) for _, ctx in pairs]
    tables = torch.zeros(len(pairs), max(widths), dtype=torch.int32, device="cuda")
    for i, ids in enumerate(pool.perm[: sum(widths)].split(widths)):
        tables[i, : ids.numel()] = ids
    cu = torch.tensor([0, *itertools.accumulate(n for n, _ in pairs)], dtype=torch.int32, device="cuda")
    seq_lens = torch.tensor([ctx for _, ctx in pairs], dtype=torch.int32, device="cuda")
    q = torch.randn(int(cu[-1]), HEADS, DIM, dtype=DTYPE, device="cuda")
    got = launch_paged_attention(q, pool.cache, cu, seq_lens, tables, DIM**-0.5, config).double()
    want = ref_paged_attention(q, pool.cache, cu, seq_lens, tables, DIM**-0.5).double()
    return float((got - want).norm() / want.norm())


def decode_error(pool: Pool, config: DecodeConfig) -> float:
    """Relative error against ``ref_paged_decode_attention`` for ragged lengths (one split, many,
    none a multiple of the tiles) over shuffled blocks of the pool."""
    lens = [1, 77, 2100, 16000]
    width = math.ceil(max(lens) / BLOCK)
    tables = pool.perm[: len(lens) * width].view(len(lens), width).contiguous()
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(len(lens), pool.shape.heads, pool.shape.dim, dtype=DTYPE, device="cuda")
    scale = pool.shape.dim**-0.5
    got = launch_paged_decode_attention(q, pool.cache, seq_lens, tables, scale, config).double()
    want = ref_paged_decode_attention(q, pool.cache, seq_lens, tables, scale).double()
    return float((got - want).norm() / want.norm())


def sdpa_row(seq: int) -> str:
    """torch's own flash attention on contiguous tensors, for scale (not paged)."""
    q = torch.randn(1, HEADS, seq, DIM, dtype=DTYPE, device="cuda")
    k = torch.randn(1, HEADS, seq, DIM, dtype=DTYPE, device="cuda")
    v = torch.randn_like(k)
    ms = median_ms([lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)])
    tflops = 4 * seq * seq / 2 * HEADS * DIM / ms / 1e9
    return f"| torch sdpa (contiguous, MHA) | 1 x {seq} tokens | {ms * 1e3:.1f} us | {tflops:.0f} TFLOP/s | |"


def transfer_rows(pool: Pool, copy_gbs: float) -> list[str]:
    n = 2048 // BLOCK
    block_bytes = pool.cache[0].numel() * 2
    sets = pool.block_sets(n, n * block_bytes)
    packed = [kv_cache.gather_blocks(pool.cache, ids) for ids in sets]
    rows = []
    for name, fns in (
        ("gather_blocks", [lambda i=ids: kv_cache.gather_blocks(pool.cache, i) for ids in sets]),
        ("scatter_blocks", [lambda i=ids, p=p: kv_cache.scatter_blocks(pool.cache, i, p) for ids, p in zip(sets, packed)]),
        ("torch index_select (ref)", [lambda i=ids: kv_cache.ref_gather_blocks(pool.cache, i) for ids in sets]),
    ):
        ms = median_ms(fns, graph=True)
        gbs = 2 * n * block_bytes / ms / 1e6
        rows.append(f"| {name} | 128 blocks x 64 KiB (8B layer, 2k prompt) | {ms * 1e3:.1f} us | {gbs:.0f} GB/s | {gbs / copy_gbs:.0%} of copy |")
    return rows


def sampling_rows(copy_gbs: float) -> list[str]:
    """The exponential-race sampling kernel against its torch reference over Llama-3's
    vocab, on dense rows and on rows cut to their top 50 (tiles of zeros skip the
    noise), the logits' row maximum and log-sum-exp against torch's two calls (both
    replayed from a CUDA graph), then the whole ``Sampler.__call__`` for 64 sequences
    (temperature 0.8, top-p 0.9, top-k 50). The race kernel replays from a CUDA graph,
    with its eager time beside; its reference (it syncs) and the sampler run eagerly,
    as in the engine."""
    vocab, rows = 128256, []
    for batch, top in itertools.product((1, 64), (None, 50)):
        cases = []
        for _ in range(max(2, min(64, ROTATE_BYTES // (batch * vocab * 4)))):
            probs = torch.softmax(3 * torch.randn(batch, vocab, device="cuda"), dim=-1)
            if top:
                values, ids = probs.topk(top, dim=-1)
                probs = torch.zeros_like(probs).scatter_(1, ids, values)
            cases.append((probs, torch.randint(0, 2**63 - 1, (batch,), device="cuda")))
        fns = [lambda c=c: sampling.exponential_race(*c) for c in cases]
        ms, eager_ms = median_ms(fns, graph=True), median_ms(fns)
        ref_ms = median_ms([lambda c=c: sampling.ref_exponential_race(*c) for c in cases])
        gbs = batch * vocab * 4 / ms / 1e6
        rows.append(f"| exponential_race | batch {batch}, vocab {vocab}, {'top-50' if top else 'dense'} rows | {ms * 1e3:.1f} us "
                    f"(eager {eager_ms * 1e3:.1f}, torch ref {ref_ms * 1e3:.1f}) | {gbs:.0f} GB/s | {gbs / copy_gbs:.0%} of copy |")
    for batch in (1, 64, 128):
        xs = [8 * torch.randn(batch, vocab, device="cuda") for _ in range(8)]
        ms = median_ms([lambda x=x: logits.max_logsumexp(x) for x in xs], graph=True)
        ref_ms = median_ms([lambda x=x: logits.ref_max_logsumexp(x) for x in xs], graph=True)
        gbs = batch * vocab * 4 / ms / 1e6
        rows.append(f"| max_logsumexp | batch {batch}, vocab {vocab} | {ms * 1e3:.1f} us (torch max + logsumexp {ref_ms * 1e3:.1f}) "
                    f"| {gbs:.0f} GB/s | {gbs / copy_gbs:.0%} of copy |")
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50)
    seqs = [Sequence(seq_id=f"s{i}", prompt_token_ids=[1, 2, 3], params=params, seed=i) for i in range(64)]
    sampler = Sampler()
    ms = median_ms([lambda x=x: sampler(x, seqs) for x in (3 * torch.randn(64, vocab, device="cuda") for _ in range(8))])
    rows.append(f"| Sampler.__call__ | 64 seqs, vocab {vocab}, temperature 0.8, top-p 0.9, top-k 50 | {ms * 1e3:.1f} us | | |")
    return rows


def elementwise_rows(copy_gbs: float) -> list[str]:
    tokens, hidden, inter = 4096, 4096, 14336
    x = [torch.randn(tokens, hidden, dtype=DTYPE, device="cuda") for _ in range(4)]
    r = [torch.randn(tokens, hidden, dtype=DTYPE, device="cuda") for _ in range(4)]
    w = torch.randn(hidden, dtype=DTYPE, device="cuda")
    qs = [torch.randn(tokens, HEADS, DIM, dtype=DTYPE, device="cuda") for _ in range(4)]
    ks = [torch.randn(tokens, KV_HEADS, DIM, dtype=DTYPE, device="cuda") for _ in range(4)]
    pos = torch.randint(0, 8192, (tokens,), device="cuda")
    cos_sin = torch.randn(8192, DIM, device="cuda")
    gu = [torch.randn(tokens, 2 * inter, dtype=DTYPE, device="cuda") for _ in range(3)]
    act = tokens * hidden * 2
    qk = (qs[0].numel() + ks[0].numel()) * 2
    cases = [
        ("rms_norm + residual", 5 * act, [lambda a=a, b=b: norm.rms_norm(a, w, 1e-6, b) for a, b in zip(x, r)],
         [lambda a=a, b=b: norm.ref_rms_norm(a, w, 1e-6, b) for a, b in zip(x, r)]),
        ("rotary (q and k)", 2 * qk, [lambda q=q, k=k: rotary.rotary_embedding(pos, q, k, cos_sin) for q, k in zip(qs, ks)],
         [lambda q=q, k=k: rotary.ref_rotary_embedding(pos, q, k, cos_sin) for q, k in zip(qs, ks)]),
        ("silu_and_mul", 3 * tokens * inter * 2, [lambda g=g: activation.act_and_mul(g) for g in gu],
         [lambda g=g: activation.ref_act_and_mul(g) for g in gu]),
    ]
    rows = []
    for name, nbytes, fns, refs in cases:
        ms, ref_ms = median_ms(fns, graph=True), median_ms(refs, graph=True)
        gbs = nbytes / ms / 1e6
        rows.append(f"| {name} | 4096 tokens | {ms * 1e3:.1f} us (torch ref {ref_ms * 1e3:.1f} us) | {gbs:.0f} GB/s | {gbs / copy_gbs:.0%} of copy |")
    return rows


def rotary_store_kv_rows(pool: Pool, copy_gbs: float) -> list[str]:
    """Rotary + KV-cache write of one layer at decode batch sizes in ``pool``'s shape: the fused
    ``rotary_store_kv`` launch against ``rotary_embedding`` then ``store_kv``. Bytes: q, k and v
    read, q and the cache rows written."""
    shape, rows = pool.shape, []
    cos_sin = torch.randn(8192, shape.dim, device="cuda")
    slots = pool.perm.long() * BLOCK  # one token per block, shuffled: each write lands cold
    widths = [shape.heads * shape.dim, shape.kv_heads * shape.dim, shape.kv_heads * shape.dim]
    for tokens in (1, 64):
        fused, separate = [], []
        for i in range(64):
            qkv = torch.randn(tokens, sum(widths), dtype=DTYPE, device="cuda")
            q, k, v = (t.view(tokens, -1, shape.dim) for t in qkv.split(widths, dim=-1))
            pos, s = torch.randint(0, 8192, (tokens,), device="cuda"), slots[i * tokens : (i + 1) * tokens].clone()
            fused.append(lambda p=pos, q=q, k=k, v=v, s=s: rotary.rotary_store_kv(p, q, k, v, cos_sin, pool.cache, s))
            separate.append(lambda p=pos, q=q, k=k, v=v, s=s: kv_cache.store_kv(rotary.rotary_embedding(p, q, k, cos_sin)[1], v, pool.cache, s))
        ms, separate_ms = median_ms(fused, graph=True), median_ms(separate, graph=True)
        gbs = 2 * qkv.numel() * qkv.element_size() / ms / 1e6
        rows.append(f"| rotary_store_kv | {shape.name} decode, {tokens} tokens | {ms * 1e3:.1f} us (rotary + store_kv "
                    f"{separate_ms * 1e3:.1f} us, saves {(separate_ms - ms) * 1e3:.1f}) | {gbs:.0f} GB/s | {gbs / copy_gbs:.0%} of copy |")
    return rows


def qkv_rotary_rows(pool: Pool, hidden: int, copy_gbs: float) -> list[str]:
    """The q/k/v projection, rotary and KV write of one decode layer in ``pool``'s shape at one
    and two rows: ``qkv_rotary_store_kv`` (one launch) against ``linear`` then
    ``rotary_store_kv``. Bytes: the weight, x, q and the cache rows."""
    shape, rows = pool.shape, []
    n = (shape.heads + 2 * shape.kv_heads) * shape.dim
    weights = [torch.randn(n, hidden, dtype=DTYPE, device="cuda") for _ in range(max(2, math.ceil(LINEAR_ROTATE_BYTES / (n * hidden * 2))))]
    cos_sin = torch.randn(8192, shape.dim, device="cuda")
    slots = pool.perm.long() * BLOCK  # one token per block, shuffled: each write lands cold
    for tokens in (1, 2):
        fused, separate = [], []
        for i, w in enumerate(weights):
            x = torch.randn(tokens, hidden, dtype=DTYPE, device="cuda")
            pos, s = torch.randint(0, 8192, (tokens,), device="cuda"), slots[i * tokens : (i + 1) * tokens].clone()
            fused.append(lambda x=x, w=w, p=pos, s=s: rotary.qkv_rotary_store_kv(x, w, None, p, cos_sin, pool.cache, s))
            separate.append(lambda x=x, w=w, p=pos, s=s: rotary.rotary_store_kv(
                p, *rotary.split_qkv(linear.linear(x, w), shape.kv_heads, shape.dim), cos_sin, pool.cache, s))
        ms, separate_ms = median_ms(fused, graph=True), median_ms(separate, graph=True)
        gbs = (n * hidden + tokens * (hidden + n)) * 2 / ms / 1e6
        rows.append(f"| qkv_rotary_store_kv | {shape.name} decode, {tokens} tokens | {ms * 1e3:.1f} us (linear + rotary_store_kv "
                    f"{separate_ms * 1e3:.1f} us, saves {(separate_ms - ms) * 1e3:.1f}) | {gbs:.0f} GB/s | {gbs / copy_gbs:.0%} of copy |")
    return rows


LINEAR_SHAPES = (  # (model, projection, N, K): the decode projections of Llama-3.2-1B and Llama-3-8B
    ("1B", "qkv_proj", 3072, 2048), ("1B", "o_proj", 2048, 2048), ("1B", "gate_up_proj", 16384, 2048), ("1B", "down_proj", 2048, 8192),
    ("8B", "qkv_proj", 6144, 4096), ("8B", "o_proj", 4096, 4096), ("8B", "gate_up_proj", 28672, 4096), ("8B", "down_proj", 4096, 14336),
    ("1B", "lm_head", 128256, 2048),
)
LINEAR_ROTATE_BYTES = 128 * 2**20  # more weight bytes than the L2 holds: every launch reads its weights from memory


def linear_rows(copy_gbs: float) -> list[str]:
    """``linear.linear`` (the Triton GEMV) against ``F.linear`` (cuBLAS) at decode row counts,
    bf16, no bias, both replayed from a CUDA graph. Bytes: the weight, x and the output."""
    rows = []
    for model, proj, n, k in LINEAR_SHAPES:
        weights = [torch.randn(n, k, dtype=DTYPE, device="cuda") for _ in range(max(2, math.ceil(LINEAR_ROTATE_BYTES / (n * k * 2))))]
        for m in (1, 2, 4):
            xs = [torch.randn(m, k, dtype=DTYPE, device="cuda") for _ in weights]
            ms = median_ms([lambda x=x, w=w: linear.linear(x, w) for x, w in zip(xs, weights)], graph=True)
            ref_ms = median_ms([lambda x=x, w=w: linear.ref_linear(x, w) for x, w in zip(xs, weights)], graph=True)
            nbytes = (n * k + m * k + m * n) * 2
            gbs, ref_gbs = nbytes / ms / 1e6, nbytes / ref_ms / 1e6
            rows.append(f"| linear | {model} {proj} N={n} K={k}, M={m} | {ms * 1e3:.1f} us (F.linear {ref_ms * 1e3:.1f} us, "
                        f"{ref_gbs / copy_gbs:.0%} of copy) | {gbs:.0f} GB/s | {gbs / copy_gbs:.0%} of copy |")
        del weights
    return rows


FP8_GEMV_CONFIGS = (linear.DEFAULT_CONFIG, linear.LinearConfig(block_n=4),
                    linear.LinearConfig(block_n=8), linear.LinearConfig(block_n=16), linear.LinearConfig(block_n=8, num_warps=8))


def _fp8_gemv_sweep(xs: list[torch.Tensor], weights: list[torch.Tensor], scales: list[torch.Tensor],
                    block: tuple[int, int] | None = None) -> tuple[list[float], str]:
    """The FP8 GEMV's time (ms, CUDA-graph replays rotating over the ``xs``/``weights``/``scales``) in each
    of ``FP8_GEMV_CONFIGS``, and those times as a row's "configs" text."""
    times = [median_ms([lambda x=x, w=w, s=s, c=c: linear.launch_linear(x, w, None, c, weight_scale=s, block=block)
                        for x, w, s in zip(xs, weights, scales)], graph=True) for c in FP8_GEMV_CONFIGS]
    return times, ", ".join(f"n{c.block_n} k{c.block_k} w{c.num_warps} {t * 1e3:.1f}" for c, t in zip(FP8_GEMV_CONFIGS, times))


def fp8_norm_rows() -> list[str]:
    """The RMSNorm (residual added) before an FP8 projection, at Llama-3.2-1B's and Llama-3-8B's hidden
    sizes: ``norm.rms_norm_fp8`` (the rows rounded to E4M3 in the norm's launch, per token, and per
    group of 128 for block-wise checkpoints) against ``rms_norm`` then ``fp8.quantize_rows`` or
    ``quantize_groups`` (two launches), CUDA-graph replays over rotating inputs."""
    rows = []
    for model, hidden in (("1B", 2048), ("8B", 4096)):
        w = torch.randn(hidden, dtype=DTYPE, device="cuda")
        for m in (1, 2, 64, 4096):
            sets = [(torch.randn(m, hidden, dtype=DTYPE, device="cuda"), torch.randn(m, hidden, dtype=DTYPE, device="cuda"))
                    for _ in range(max(2, min(64, ROTATE_BYTES // (2 * m * hidden * 2))))]
            for group, quantize in ((None, fp8.quantize_rows), (128, lambda x: fp8.quantize_groups(x, 128))):
                fused = median_ms([lambda x=x, r=r: norm.rms_norm_fp8(x, w, 1e-6, r, group=group) for x, r in sets],
                                  graph=True)
                apart = median_ms([lambda x=x, r=r: quantize(norm.rms_norm(x, w, 1e-6, r)[0]) for x, r in sets], graph=True)
                rows.append(f"| rms_norm_fp8 (norm + E4M3 rows, one launch), {'per token' if group is None else 'groups of 128'} "
                            f"| {model} hidden {hidden}, {m} rows | {fused * 1e3:.1f} us (rms_norm then "
                            f"{'quantize_rows' if group is None else 'quantize_groups'}: {apart * 1e3:.1f} us) | "
                            f"{apart / fused:.2f}x | |")
    return rows


def fp8_quantize_rows(copy_gbs: float) -> list[str]:
    """The rows an FP8 projection takes when no norm rounded them (the output projection's; the down
    projection's, its activation made in the same launch): ``fp8.quantize_rows`` (per token) and
    ``quantize_groups`` (groups of 128, block-wise checkpoints) at Llama-3-8B's widths, CUDA-graph
    replays over rotating inputs; bytes: x read, the E4M3 rows written."""
    rows = []
    for proj, k, act in (("o_proj input", 4096, None), ("down_proj input (gated)", 14336, "silu")):
        width = 2 * k if act else k
        for m in (1, 64, 4096):
            xs = [torch.randn(m, width, dtype=DTYPE, device="cuda")
                  for _ in range(max(2, min(64, ROTATE_BYTES // (m * width * 2))))]
            for name, quantize in (("quantize_rows", lambda x: fp8.quantize_rows(x, activation=act)),
                                   ("quantize_groups (128)", lambda x: fp8.quantize_groups(x, 128, act))):
                ms = median_ms([lambda x=x: quantize(x) for x in xs], graph=True)
                gbs = (m * width * 2 + m * k) / ms / 1e6
                rows.append(f"| fp8.{name} | 8B {proj}, {m} x {k} | {ms * 1e3:.1f} us | {gbs:.0f} GB/s "
                            f"| {gbs / copy_gbs:.0%} of copy |")
    return rows


def _block_fp8_gemm_times(x: torch.Tensor, quantized: list[tuple[torch.Tensor, torch.Tensor]],
                          block_scales: list[torch.Tensor], block: tuple[int, int]) -> list[tuple[str, float]]:
    """The Triton and the cuBLAS block-scaled FP8 GEMM (each quantizing ``x`` per group) over the E4M3
    weights of ``quantized`` with ``block_scales``: each one's name and time (ms, CUDA-graph replays)."""
    return [(name, median_ms([lambda q=q, s=s, fn=fn: fn(x, q[0], s, block) for q, s in zip(quantized, block_scales)],
                             graph=True))
            for name, fn in (("Triton", fp8.triton_fp8_linear), ("cuBLAS", fp8.scaled_mm_block_fp8_linear))]


def fp8_linear_rows(copy_gbs: float) -> list[str]:
    """FP8 W8A8 linear layers (``kernels/fp8.py``), bf16 activations, CUDA-graph replays (after
    ``fp8_norm_rows``, the norm that quantizes the rows of the projections after it, and
    ``fp8_quantize_rows``, the quantization of the others' rows): the GEMV's FP8 mode at decode rows
    over ``FP8_GEMV_CONFIGS`` (the first the default; each time takes in the rows' quantization, timed
    alone too) against the bf16 GEMV (bytes: the E4M3 weight, x and the output), down_proj also gated
    (the activation made in the quantization launch, as the model calls it) against the bf16 gated
    GEMV; at a decode batch's rows (16 and ``TRITON_GEMM_ROWS``) the Triton GEMM's narrow tiles
    against cuBLAS's FP8 GEMM on the same quantized rows and ``F.linear`` in bf16 (bytes: the
    weight's); at prefill rows the row quantization plus cuBLAS's FP8 GEMM against ``F.linear`` in
    bf16 (TFLOP/s of 2*M*N*K), and plus the Triton FP8 GEMM (fp16 models' path) in bf16 and fp16.
    Then the same weights scaled per 128 x 128 block (DeepSeek-V3's, Qwen3-FP8's checkpoints; random
    scales): the block-scaled GEMV with its group quantization, and at both the decode batch's and
    prefill's rows the Triton and cuBLAS block-scaled GEMMs, each beside its per-channel time."""
    rows, block = fp8_norm_rows() + fp8_quantize_rows(copy_gbs), fp8.CUBLAS_BLOCK
    for model, proj, n, k in LINEAR_SHAPES[:-1]:
        count = max(2, math.ceil(LINEAR_ROTATE_BYTES / (n * k)))
        bf16 = [torch.randn(n, k, dtype=DTYPE, device="cuda") * 0.05 for _ in range(count)]
        quantized = [fp8.ref_quantize_rows(w) for w in bf16]
        block_scales = [(torch.rand(n // block[0], k // block[1], device="cuda") + 0.5) * 1e-3 for _ in bf16]
        for m in (1, 2):
            xs = [torch.randn(m, k, dtype=DTYPE, device="cuda") for _ in bf16]
            bf16_ms = median_ms([lambda x=x, w=w: linear.linear(x, w) for x, w in zip(xs, bf16)], graph=True)
            times, sweep = _fp8_gemv_sweep(xs, [q[0] for q in quantized], [q[1] for q in quantized])
            quant_ms = median_ms([lambda x=x: fp8.quantize_rows(x) for x in xs], graph=True)
            gbs = (n * k + (m * k + m * n) * 2) / times[0] / 1e6
            rows.append(f"| fp8 linear (GEMV) | {model} {proj} N={n} K={k}, M={m} | {times[0] * 1e3:.1f} us (quantization "
                        f"alone {quant_ms * 1e3:.1f} us; bf16 GEMV {bf16_ms * 1e3:.1f} us; configs: {sweep}) | {gbs:.0f} GB/s "
                        f"| {gbs / copy_gbs:.0%} of copy |")
            block_times, sweep = _fp8_gemv_sweep(xs, [q[0] for q in quantized], block_scales, block)
            gbs = (n * k + (m * k + m * n) * 2) / block_times[0] / 1e6
            rows.append(f"| fp8 linear, 128x128 blocks (GEMV) | {model} {proj} N={n} K={k}, M={m} | {block_times[0] * 1e3:.1f} us "
                        f"(per channel {times[0] * 1e3:.1f} us; configs: {sweep}) | {gbs:.0f} GB/s | {gbs / copy_gbs:.0%} of copy |")
            if proj == "down_proj":
                gated = [torch.randn(m, 2 * k, dtype=DTYPE, device="cuda") for _ in bf16]
                bf16_ms = median_ms([lambda x=x, w=w: linear.gated_linear(x, w) for x, w in zip(gated, bf16)], graph=True)
                ms = median_ms([lambda x=x, q=q: linear.gated_linear(x, q[0], weight_scale=q[1])
                                for x, q in zip(gated, quantized)], graph=True)
                gbs = (n * k + (2 * m * k + m * n) * 2) / ms / 1e6
                rows.append(f"| fp8 gated linear (GEMV) | {model} {proj} N={n} K={k}, M={m} | {ms * 1e3:.1f} us (bf16 gated "
                            f"GEMV {bf16_ms * 1e3:.1f} us) | {gbs:.0f} GB/s | {gbs / copy_gbs:.0%} of copy |")
        for m in (16, fp8.TRITON_GEMM_ROWS):
            x = torch.randn(m, k, dtype=DTYPE, device="cuda")
            xq, xs = fp8.quantize_rows(x)
            bf16_ms = median_ms([lambda w=w: linear.ref_linear(x, w) for w in bf16], graph=True)
            ms = median_ms([lambda q=q: fp8._launch_fp8_gemm(xq, xs, q[0], q[1], None, None, DTYPE) for q in quantized],
                           graph=True)
            cublas_ms = median_ms([lambda q=q: torch._scaled_mm(xq, q[0].t(), scale_a=xs[:, None], scale_b=q[1][None, :],
                                                                out_dtype=DTYPE) for q in quantized], graph=True)
            gbs = n * k / ms / 1e6
            rows.append(f"| fp8 linear (Triton GEMM, a decode batch's tiles) | {model} {proj} N={n} K={k}, M={m} | "
                        f"{ms * 1e3:.1f} us (cuBLAS's FP8 GEMM {cublas_ms * 1e3:.1f} us; bf16 F.linear {bf16_ms * 1e3:.1f} us; "
                        f"rows quantized before) | {gbs:.0f} GB/s of weight | {gbs / copy_gbs:.0%} of copy |")
            for name, block_ms in _block_fp8_gemm_times(x, quantized, block_scales, block):
                gbs = n * k / block_ms / 1e6
                rows.append(f"| fp8 linear, 128x128 blocks (quantize + {name}) | {model} {proj} N={n} K={k}, M={m} | "
                            f"{block_ms * 1e3:.1f} us (per channel, Triton: {ms * 1e3:.1f} us) | {gbs:.0f} GB/s of weight "
                            f"| {gbs / copy_gbs:.0%} of copy |")
        for m in (512, 4096):
            x = torch.randn(m, k, dtype=DTYPE, device="cuda")
            ms = median_ms([lambda q=q: fp8.fp8_linear(x, q[0], q[1]) for q in quantized[:2]], graph=True)
            bf16_ms = median_ms([lambda w=w: linear.ref_linear(x, w) for w in bf16[:2]], graph=True)
            quant_ms = median_ms([lambda: fp8.quantize_rows(x)], graph=True)
            tflops = 2 * m * n * k / ms / 1e9
            rows.append(f"| fp8 linear (quantize + cuBLAS) | {model} {proj} N={n} K={k}, M={m} | {ms * 1e3:.1f} us (of it "
                        f"the quantization {quant_ms * 1e3:.1f} us; bf16 F.linear {bf16_ms * 1e3:.1f} us) | "
                        f"{tflops:.0f} TFLOP/s | {bf16_ms / ms:.2f}x bf16 |")
            for dtype in (torch.bfloat16, torch.float16):
                xd = x.to(dtype)
                triton_ms = median_ms([lambda q=q: fp8.triton_fp8_linear(xd, q[0], q[1]) for q in quantized[:2]], graph=True)
                rows.append(f"| fp8 linear (quantize + Triton), {str(dtype)[6:]} | {model} {proj} N={n} K={k}, M={m} | "
                            f"{triton_ms * 1e3:.1f} us (cuBLAS, bf16: {ms * 1e3:.1f} us) | "
                            f"{2 * m * n * k / triton_ms / 1e9:.0f} TFLOP/s | {bf16_ms / triton_ms:.2f}x bf16 |")
            for name, block_ms in _block_fp8_gemm_times(x, quantized[:2], block_scales, block):
                rows.append(f"| fp8 linear, 128x128 blocks (quantize + {name}) | {model} {proj} N={n} K={k}, M={m} | "
                            f"{block_ms * 1e3:.1f} us (per channel {ms * 1e3:.1f} us) | "
                            f"{2 * m * n * k / block_ms / 1e9:.0f} TFLOP/s | {bf16_ms / block_ms:.2f}x bf16 |")
        del bf16, quantized, block_scales
    return rows


def lora_rows() -> list[str]:
    """Grouped LoRA (``lora_shrink`` then ``lora_expand_add``) against the masked torch path it
    replaced (every token times every loaded adapter's ranks, a one-hot mask, then the expand:
    three launches) on Llama-3-8B's q/k/v module (4096 in, 6144 out, three slices of ``rank``),
    bf16, tokens spread at random over the adapters, both replayed from a CUDA graph. Per-step
    work shared by every module is left out of both (the mask; the grouping, timed apart). Last:
    the grouped result's relative error against the masked one."""
    hidden, width, rows = 4096, 6144, []
    for rank, n in itertools.product((16, 64), (4, 32)):
        w = 3 * rank
        a = torch.randn(n, w, hidden, dtype=DTYPE, device="cuda") / hidden**0.5
        b = torch.randn(n, width, w, dtype=DTYPE, device="cuda") / w**0.5
        a_flat, b_flat = a.flatten(0, 1), b.permute(1, 0, 2).flatten(1)
        for tokens in (16, 64, 2048):
            x = torch.randn(tokens, hidden, dtype=DTYPE, device="cuda")
            out = torch.randn(tokens, width, dtype=DTYPE, device="cuda")
            adapters = torch.randint(0, n, (tokens,), device="cuda")
            mask = (adapters[:, None] == torch.arange(n, device="cuda")).to(DTYPE).repeat_interleave(w, dim=1)
            groups = lora.group_by_adapter(adapters, n)
            grouped = lambda o: lora.lora_expand_add(lora.lora_shrink(x, a, adapters, groups), b, adapters, o, groups)
            masked = lambda o: o.addmm_((x @ a_flat.T) * mask, b_flat.T)
            got, want = grouped(out.clone()).double(), masked(out.clone()).double()
            err = float((got - want).norm() / want.norm())
            ms, masked_ms = median_ms([lambda: grouped(out)], graph=True), median_ms([lambda: masked(out)], graph=True)
            group_ms = median_ms([lambda: lora.group_by_adapter(adapters, n)], graph=True)
            rows.append(f"| lora shrink + expand | 8B qkv, {tokens} tokens, {n} adapters of rank {rank} | {ms * 1e3:.1f} us "
                        f"(masked torch {masked_ms * 1e3:.1f} us; grouping {group_ms * 1e3:.1f} us a step) "
                        f"| {masked_ms / ms:.2f}x | error {err:.1e} |")
    return rows


MOE_SHAPES = (("Mixtral-8x7B", 4096, 14336, 8, 2), ("Qwen3-30B-A3B", 2048, 768, 128, 8))   # hidden, inter, experts, k
MOE_ROUTINGS = 8   # routings each case rotates over, so that a small step's experts differ from call to call


def moe_rows(copy_gbs: float) -> list[str]:
    """``moe.fused_moe`` on one layer's experts of each ``MOE_SHAPES`` model, bf16, replayed from a
    CUDA graph over ``MOE_ROUTINGS`` random routings (top-k of random scores, softmax weights) and
    inputs. Bytes: the experts each routing hits (their mean over the rotation) times one expert's
    ``3 * hidden * inter`` weights; FLOPs ``2 * tokens * k * 3 * hidden * inter``. First, per model:
    the relative error against ``ref_fused_moe`` at 64 tokens."""
    rows = []
    for model, hidden, inter, experts, k in MOE_SHAPES:
        gate_up = torch.randn(experts, 2 * inter, hidden, dtype=DTYPE, device="cuda") / hidden**0.5
        down = torch.randn(experts, hidden, inter, dtype=DTYPE, device="cuda") / inter**0.5
        expert_bytes = 3 * hidden * inter * gate_up.element_size()
        case = f"{model} layer ({experts} experts, top-{k}, hidden {hidden}, inter {inter})"

        def routing(tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            weights, ids = torch.randn(tokens, experts, device="cuda").topk(k, dim=-1)
            return torch.randn(tokens, hidden, dtype=DTYPE, device="cuda"), weights.softmax(-1), ids

        x, weights, ids = routing(64)
        got = moe.fused_moe(x, gate_up, down, weights, ids).double()
        want = moe.ref_fused_moe(x, gate_up, down, weights, ids).double()
        err = float((got - want).norm() / want.norm())
        rows.append(f"| fused_moe | {case}, 64 tokens: relative error vs ref_fused_moe | | {err:.1e} | {'ok' if err < 1.5e-2 else 'MISMATCH'} |")
        for tokens in (1, 16, 64, 256, 4096):
            sets = [routing(tokens) for _ in range(MOE_ROUTINGS)]
            hit = sum(s[2].unique().numel() for s in sets) / len(sets)
            ms = median_ms([lambda s=s: moe.fused_moe(s[0], gate_up, down, s[1], s[2]) for s in sets], graph=True)
            gbs = hit * expert_bytes / ms / 1e6
            tflops = 2 * tokens * k * 3 * hidden * inter / ms / 1e9
            rows.append(f"| fused_moe | {case}, {tokens} tokens, {hit:.1f} experts hit | {ms * 1e3:.1f} us "
                        f"| {gbs:.0f} GB/s, {tflops:.1f} TFLOP/s | {gbs / copy_gbs:.0%} of copy |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few cases only")
    parser.add_argument("--decode-sweep", action="store_true", help="only the decode attention candidates")
    parser.add_argument("--linear-only", action="store_true", help="only the linear (GEMV) rows")
    parser.add_argument("--lora-only", action="store_true", help="only the grouped LoRA rows")
    parser.add_argument("--fp8-linear", action="store_true", help="only the FP8 linear rows (GEMV configs, quantize + cuBLAS)")
    parser.add_argument("--prefill-sweep", action="store_true", help="only the prefill attention candidates")
    parser.add_argument("--gemma2", action="store_true", help="only attention at Gemma-2-2B's heads, with its cap and window")
    parser.add_argument("--moe", action="store_true", help="only the fused mixture-of-experts rows (Mixtral-8x7B, Qwen3-30B-A3B)")
    parser.add_argument("--no-pdl", action="store_true", help="launch without programmatic dependent launch")
    parser.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPE_NAMES), default=None,
                        help="only the attention rows, over a KV pool of this dtype (the engine's flag: auto is bf16, "
                             "fp8 and fp8_e5m2 8-bit floats)")
    args = parser.parse_args()
    pdl.enabled = not args.no_pdl
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    shape = GEMMA2_2B if args.gemma2 else LLAMA_8B
    lines = [f"# Kernel benchmarks: {props.name}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"torch {torch.__version__}, triton {triton.__version__}, {props.multi_processor_count} SMs; "
             f"{shape.name if args.gemma2 else 'Llama-3-8B'} shapes ({shape.heads} q heads, {shape.kv_heads} kv heads, "
             f"dim {shape.dim}, bf16, block {BLOCK}"
             f"{'; KV cache ' + args.kv_cache_dtype if args.kv_cache_dtype else ''}); medians, "
             "CUDA-graph replay for decode, prefill, transfers and element-wise kernels (eager times beside decode; SDPA eager); "
             f"programmatic dependent launch {'on' if pdl.enabled else 'off'}",
             "", "| kernel | case | time | rate | vs copy |", "| --- | --- | --- | --- | --- |"]

    def emit(row: str) -> None:
        lines.append(row)
        print(row, flush=True)

    print("\n".join(lines), flush=True)
    copy_gbs = copy_bandwidth()
    emit(f"| device copy | 1 GiB D2D, read + write | | {copy_gbs:.0f} GB/s | 100% |")
    if args.fp8_linear:
        for row in fp8_linear_rows(copy_gbs):
            emit(row)
    elif args.linear_only or args.lora_only or args.moe:
        for row in linear_rows(copy_gbs) if args.linear_only else lora_rows() if args.lora_only else moe_rows(copy_gbs):
            emit(row)
    elif args.prefill_sweep:
        prefill_sweep(Pool(2 * 16384 // BLOCK), emit)
    elif args.gemma2:
        gemma2_rows(copy_gbs, emit)
    else:
        kv_name = KV_CACHE_DTYPE_NAMES.get(args.kv_cache_dtype)
        kv_dtype = KV_DTYPES[kv_name] if kv_name else DTYPE
        pool = Pool(2 * 128 * 16384 // BLOCK // (4 if args.quick else 1) + 4096, kv_dtype=kv_dtype)
        pool_1b = Pool(16384, LLAMA_1B, kv_dtype)
        if args.kv_cache_dtype:
            attention_rows(pool, pool_1b, copy_gbs, emit, args.quick)
        elif args.decode_sweep:
            decode_sweep(pool, pool_1b, copy_gbs, emit)
        else:
            default_rows(pool, pool_1b, copy_gbs, emit, args.quick)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "kernels_bench.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


def gemma2_rows(copy_gbs: float, emit: Callable[[str], None]) -> None:
    """Gemma-2-2B's attention: each case on a global layer (cap, no window) and a local one (cap
    and window); prefill also uncapped. Past the window, a local layer reads and computes a window's
    worth, whatever the context."""
    pool = Pool(64 * 8192 // BLOCK + 4096, GEMMA2_2B)
    for batch, ctx in ((1, 4096), (1, 32768), (8, 32768), (64, 2048), (64, 8192)):
        for window in (None, GEMMA2_WINDOW):
            emit(decode_row(pool, batch, ctx, copy_gbs, None, sliding_window=window, softcap=GEMMA2_CAP))
    for seq in (4096, 16384):
        for window, cap in ((None, None), (None, GEMMA2_CAP), (GEMMA2_WINDOW, GEMMA2_CAP)):
            emit(prefill_row(pool, seq, None, "paged (default tiles)", sliding_window=window, softcap=cap))


def default_rows(pool: Pool, pool_1b: Pool, copy_gbs: float, emit: Callable[[str], None], quick: bool) -> None:
    """Every kernel with its default launch parameters."""
    attention_rows(pool, pool_1b, copy_gbs, emit, quick, with_references=True)
    for row in sampling_rows(copy_gbs):
        emit(row)
    for row in transfer_rows(pool, copy_gbs) + elementwise_rows(copy_gbs):
        emit(row)
    for row in rotary_store_kv_rows(pool_1b, copy_gbs) + qkv_rotary_rows(pool_1b, 2048, copy_gbs) + qkv_rotary_rows(pool, 4096, copy_gbs):
        emit(row)
    for row in linear_rows(copy_gbs) + lora_rows():
        emit(row)


# Speculative steps' attention: (pool, batch, context, table width); drafts of 2 and 4 tokens. The 1B
# cases are bench_speculative's (prompts of 45 tokens, 128 out) in the model benchmark's tables.
DRAFT_CASES = (("8B", 1, 16384, 0), ("1B", 32, 512, RUNNER_CONTEXT), ("8B", 1, 2048, 0), ("8B", 1, 16384, 131072),
               ("8B", 8, 4096, 0), ("8B", 32, 2048, 0), ("1B", 1, 512, RUNNER_CONTEXT))
DRAFT_QUERY_LENS = (3, 5)


def attention_rows(pool: Pool, pool_1b: Pool, copy_gbs: float, emit: Callable[[str], None], quick: bool,
                   with_references: bool = False) -> None:
    """Decode and prefill attention over the pools (``with_references``: the plain reads of one long
    sequence's bytes, and SDPA's prefill, beside them)."""
    batches, ctxs = ([1, 64], [2048, 16384]) if quick else ([1, 16, 64, 128], [512, 2048, 4096, 16384])
    for batch, ctx in itertools.product(batches, ctxs):
        emit(decode_row(pool, batch, ctx, copy_gbs, None))
    emit(decode_row(pool, 1, 32768, copy_gbs, None))
    for batch, ctx, table_ctx in ((1, 2048, 32768), (16, 2048, 32768), (1, 16384, 131072)):  # tables as wide as a graph's
        emit(decode_row(pool, batch, ctx, copy_gbs, None, table_ctx))
    for row in plain_read_rows(copy_gbs) if with_references else ():
        emit(row)
    for batch, ctx in ((1, 512), (1, 1024), (64, 512), (128, 640)):  # batch 1 and the offline benchmark's steps
        emit(decode_row(pool_1b, batch, ctx, copy_gbs, None, RUNNER_CONTEXT))
    for p, batch, ctx, table_ctx in DRAFT_CASES[:2] if quick else DRAFT_CASES:
        for query_len in DRAFT_QUERY_LENS:
            emit(draft_row(pool_1b if p == "1B" else pool, batch, ctx, query_len, copy_gbs, table_ctx))
    for seq in (1024, 4096, 8192):
        emit(prefill_row(pool, seq, None, "paged (default tiles)"))
        if with_references:
            emit(sdpa_row(seq))
    for batch, seq in ((1, 4096), (16, 512)):
        emit(prefill_row(pool_1b, seq, None, "paged (default tiles)", batch))


# Candidates per head dim (the 2026-12-04 sweep in kernels_h200.md): the two defaults first, then
# one tile in flight instead of two, other tile sizes and warp counts, and the first default asking
# L2 for none, two or four of a split's first tiles before its PDL wait. The fourth field is how
# many programs fit an SM (shared memory of the sm_90 compiles; at head dim 128 with two warps,
# their 255 registers a thread).
DECODE_CANDIDATES = {
    dim: (*DEFAULT_CONFIGS[dim], *others, *(replace(DEFAULT_CONFIGS[dim][0], prefetch_tiles=n) for n in (0, 2, 4)))
    for dim, others in (
        (64, (DecodeConfig(64, 2, 2, 11), DecodeConfig(32, 1, 2, 22), DecodeConfig(32, 2, 3, 6))),
        (128, (DecodeConfig(32, 2, 3, 4), DecodeConfig(32, 2, 2, 4), DecodeConfig(64, 4, 3, 3))),
    )
}
DECODE_SWEEP_CASES = {  # (batch, context); the 1B cases pad their tables to RUNNER_CONTEXT where shorter
    64: ((1, 512), (16, 640), (32, 640), (64, 512), (64, 640), (128, 576), (128, 640), (1, 16384), (16, 2048)),
    128: ((1, 4096), (1, 16384), (1, 32768), (16, 2048), (16, 4096), (32, 2048), (64, 512), (64, 2048), (128, 512), (128, 2048)),
}


def decode_label(config: DecodeConfig) -> str:
    """``t64 w4 s3 p3``: keys per tile, warps, stages, programs per SM (and ``m32``: the shortest
    split, ``f2``: the tiles asked of L2 ahead, where not the usual)."""
    shortest = f" m{config.min_split_tokens}" if config.min_split_tokens != DecodeConfig.min_split_tokens else ""
    ahead = f" f{config.prefetch_tiles}" if config.prefetch_tiles != DecodeConfig.prefetch_tiles else ""
    return f"t{config.tile_n} w{config.num_warps} s{config.num_stages} p{config.programs_per_sm}{shortest}{ahead}"


def decode_sweep(pool: Pool, pool_1b: Pool, copy_gbs: float, emit: Callable[[str], None]) -> None:
    """Decode launch-parameter candidates, each checked once against the reference, as a
    table of CUDA-graph replay times per case, the default's choice first (* marks the
    fastest), after the plain reads of a long sequence's bytes."""
    for row in plain_read_rows(copy_gbs):
        emit(row)
    for p in (pool_1b, pool):
        candidates = DECODE_CANDIDATES[p.shape.dim]
        for cfg in candidates:
            err = decode_error(p, cfg)
            emit(f"| decode {p.shape.name} {decode_label(cfg)} | relative error vs ref_paged_decode_attention | | {err:.1e} | {'ok' if err < 1e-2 else 'MISMATCH'} |")
        emit("")
        emit(f"| {p.shape.name} case, us | default | " + " | ".join(map(decode_label, candidates)) + " |")
        emit("| --- " * (len(candidates) + 2) + "|")
        for batch, ctx in DECODE_SWEEP_CASES[p.shape.dim]:
            table_ctx = RUNNER_CONTEXT if p is pool_1b else 0
            times = [f"{median_ms(decode_launches(p, batch, ctx, cfg, table_ctx), graph=True) * 1e3:.1f}" for cfg in (None, *candidates)]
            best = min(times, key=float)
            default = decode_label(default_decode_config(batch, p.shape.kv_heads, p.shape.dim, max(table_ctx, ctx), p.cache.device,
                                                         p.cache.element_size()))
            cells = [f"*{t}*" if t == best else t for t in times]
            emit(f"| batch {batch}, ctx {ctx} | {cells[0]} ({default}) | " + " | ".join(cells[1:]) + " |")
        emit("")


PREFILL_CANDIDATES = (  # shared memory from sm_90 compiles
    PrefillConfig(128, 128, 8, 3),  # the default: 3 K/V buffers (224 KB), two tiles in flight
    PrefillConfig(128, 128, 8, 2),  # 160 KB, one tile in flight
    PrefillConfig(128, 64, 8, 3),   # 128 KB, two 64-key tiles in flight
    PrefillConfig(128, 64, 8, 4),   # 160 KB, three
    PrefillConfig(64, 64, 4, 3),    # 112 KB: two programs per SM, one's softmax beside the other's MMA
    PrefillConfig(64, 128, 4, 3),   # two programs per SM with 128-key tiles
    PrefillConfig(128, 64, 4, 3),   # four warps over 128 rows: more programs resident for short prompts
)
PREFILL_CASES = ((1, 4096, 0), (1, 8192, 0), (1, 16384, 0), (4, 1024, 3072))  # (sequences, new tokens, cached tokens each), 8B shape
PREFILL_CASES_1B = ((1, 1024, 0), (1, 4096, 0), (16, 512, 0), (4, 1024, 3072), (2, 64, 448))


def prefill_label(config: PrefillConfig) -> str:
    """``128x128 w8 s3``: rows x keys, warps, stages."""
    return f"{config.block_m}x{config.block_n} w{config.num_warps} s{config.num_stages}"


def prefill_sweep(pool: Pool, emit: Callable[[str], None]) -> None:
    """Each candidate checked once against the reference (the kernel tests' bf16 tolerance), then
    timed on every case; one that does not compile or launch on this GPU (shared memory,
    registers) or misses the tolerance gets a row saying so and no timings."""
    working = []
    for cfg in PREFILL_CANDIDATES:
        label = prefill_label(cfg)
        try:
            err = prefill_error(pool, cfg)
        except Exception as exc:  # one candidate that does not fit this GPU must not end the sweep
            emit(f"| prefill {label} | failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]} | | | |")
            continue
        ok = err < 1.5e-2
        emit(f"| prefill {label} | relative error vs ref_paged_attention | | {err:.1e} | {'ok' if ok else 'MISMATCH, not timed'} |")
        if ok:
            working.append((cfg, label))
    for batch, seq, prefix in PREFILL_CASES:
        for cfg, label in working:
            emit(prefill_row(pool, seq, cfg, label, batch, prefix))
        if batch == 1:
            emit(sdpa_row(seq))
    # Head dim 64 (Llama-3.2-1B), which has its own default: a 1k and a 4k prompt, the offline
    # benchmark's prefill step (16 prompts of 512 tokens), chunks after a cached prefix.
    pool_1b = Pool(16 * 4096 // BLOCK + 64, LLAMA_1B)
    for batch, seq, prefix in PREFILL_CASES_1B:
        for cfg, label in working:
            emit(prefill_row(pool_1b, seq, cfg, label, batch, prefix))


if __name__ == "__main__":
    main()
