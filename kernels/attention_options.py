"""What both paged-attention kernels and their references take beyond plain causal attention,
with Hugging Face transformers' semantics:

- a sliding window ``W``: the query at position ``p`` sees the keys ``k`` with ``p - W < k <= p``,
  its last ``W`` keys itself included (Mistral, Phi-3, Gemma 2's local layers);
- logit soft-capping ``c``: each score ``s = q . k * scale`` becomes ``c * tanh(s / c)`` before
  the softmax (Gemma 2's ``attn_logit_softcapping``).

The kernels take both as ``tl.constexpr`` values, 0 for off, so a launch without them compiles
to the code of plain causal attention.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl


def window_and_softcap(sliding_window: int | None, softcap: float | None) -> tuple[int, float]:
    """``(window, cap)`` as the kernels take them, 0 for off (None or 0 given); ValueError unless
    the window is a non-negative int and the cap a finite non-negative number."""
    window = 0 if sliding_window is None else sliding_window
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    cap = 0.0 if softcap is None else softcap
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not (math.isfinite(cap) and cap >= 0):
        raise ValueError(f"softcap must be a positive float or None, got {softcap!r}")
    return window, float(cap)


@triton.jit
def softcap_log2(s, SOFTCAP: tl.constexpr):
    """Scores in log2 units (natural scores times log2(e)) capped as their natural values are:
    ``c * tanh(x / c)`` of the natural score ``x``, back in log2 units. tanh is
    ``1 - 2 / (e^2y + 1)`` through ``exp2``, which the interpreter runs too; ``exp2``
    overflows to inf (tanh 1) or underflows to 0 (tanh -1), never to NaN."""
    CAP_LOG2: tl.constexpr = SOFTCAP * 1.4426950408889634
    TWO_OVER_CAP: tl.constexpr = 2.0 / SOFTCAP
    return CAP_LOG2 * (1.0 - 2.0 / (tl.math.exp2(s * TWO_OVER_CAP) + 1.0))
