"""RoPE cos/sin cache, laid out as ``kernels/rotary.py`` expects:
``[max_positions, rotary_dim]`` float32, cosines in the first half, sines in the second (a head's
dims past ``rotary_dim`` are not rotated: partial rotary).

Inverse frequencies follow transformers exactly for the "default", "linear" and
"llama3" rope types, so positions rotate bit-for-bit like the reference model. "longrope"
divides each frequency by a factor of its own, the short factors' or the long factors', and
scales the cache by the attention factor. transformers picks the long factors for a forward
whose sequence reaches past ``original_max_position_embeddings``, so keys cached before that
were rotated otherwise; as vLLM does, the choice here is made once, by the longest sequence
served (``max_positions``): the long factors for all of them past that length.
"""

from __future__ import annotations

import math

import torch

from baton.engine.model_config import RopeConfig


def inverse_frequencies(rope: RopeConfig, rotary_dim: int, max_positions: int = 0) -> torch.Tensor:
    """``[rotary_dim // 2]`` float32 inverse frequencies, scaled per ``rope.rope_type`` (for
    "longrope", by the factors of sequences of up to ``max_positions``)."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float) / rotary_dim
    if rope.rope_type == "longrope":
        long = max_positions > rope.original_max_position_embeddings
        factors = torch.tensor(rope.long_factor if long else rope.short_factor, dtype=torch.float32)
        if factors.shape != exponents.shape:
            raise ValueError(f"longrope has {factors.numel()} {'long' if long else 'short'} factors; "
                             f"rotating {rotary_dim} dims takes {exponents.numel()}")
        return 1.0 / (factors * rope.theta**exponents)
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "default":
        return inv_freq
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_scaling(inv_freq, rope)
    raise ValueError(f"rope type {rope.rope_type!r} is not supported")


def _llama3_scaling(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by ``factor``, blend in between."""
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def build_cos_sin_cache(
    rope: RopeConfig, rotary_dim: int, max_positions: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``[max_positions, rotary_dim]`` float32: ``cos(p * f)`` then ``sin(p * f)`` for each frequency
    ``f`` (times the attention factor, for "longrope")."""
    inv_freq = inverse_frequencies(rope, rotary_dim, max_positions)
    positions = torch.arange(max_positions, dtype=torch.int64).float()
    freqs = positions[:, None] * inv_freq[None, :]
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    return (cache * rope.attention_factor if rope.rope_type == "longrope" else cache).to(device)
