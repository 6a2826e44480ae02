"""How both attention kernels read a KV cache of 8-bit floats: the dtype their dots take.

Queries and the KV cache share a dtype, or the cache holds 8-bit floats. Those are widened as
each tile is loaded to the queries' dtype, but to float16 where the queries are bfloat16: one
conversion instruction per two elements on Hopper, where a widening to bfloat16 goes through
float32 (``bench/results/kernels_h100.md``). float16 holds every 8-bit float exactly, and a
bfloat16 query's value but its range: a query element past float16's largest is clamped to it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def dot_fp16(q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Whether the attention of ``q`` over ``kv_cache`` multiplies in float16 (8-bit floats under
    bfloat16 queries); otherwise in the queries' dtype."""
    return kv_cache.element_size() == 1 and q.dtype == torch.bfloat16


@triton.jit
def to_dot_dtype(q, DOT_FP16: tl.constexpr):
    """The queries in the dtype the dots take: float16, clamped to its range, under ``DOT_FP16``."""
    if DOT_FP16:
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    return q
