"""Argument checks shared by the Triton host wrappers: each raises ValueError
with a message naming the argument, so bad input never reaches a kernel. Also the one
device fact the wrappers size their grids by (``num_sms``)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

# The float dtypes the kernels (and so the model weights and the KV cache) take, by name.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# A KV cache may also hold 8-bit floats (vLLM's --kv-cache-dtype fp8): written rounded, read widened
# to the queries' dtype, unscaled (vLLM's scale of 1.0 where a checkpoint gives none).
FP8_KV_DTYPES: dict[str, torch.dtype] = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
KV_DTYPES: dict[str, torch.dtype] = {**DTYPES, **FP8_KV_DTYPES}


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int]) -> None:
    """``t`` has ``len(shape)`` dims and matches ``shape`` where an entry is not -1."""
    if t.dim() != len(shape) or any(want not in (-1, got) for want, got in zip(shape, t.shape)):
        wanted = "[" + ", ".join("*" if s == -1 else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {wanted}, got {list(t.shape)}")


def check_dtype(name: str, t: torch.Tensor, allowed: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    if t.dtype not in allowed:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in allowed]}, got {t.dtype}")


def check_device(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but must be on {like.device}")


def check_same_dtype(name: str, t: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    if t.dtype != like.dtype:
        raise ValueError(f"{name} dtype {t.dtype} must match {like_name} dtype {like.dtype}")


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {tuple(t.stride())}")


def check_int_index(name: str, t: torch.Tensor, shape: Sequence[int], like: torch.Tensor) -> None:
    """An int32/int64 index tensor of ``shape`` on ``like``'s device, contiguous."""
    check_shape(name, t, shape)
    check_dtype(name, t, (torch.int32, torch.int64))
    check_device(name, t, like)
    check_contiguous(name, t)


def check_kv_cache(kv_cache: torch.Tensor) -> None:
    """``[num_blocks, 2, block_size, num_kv_heads, head_dim]``, contiguous, floating point (8 bits too)."""
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2:
        raise ValueError(f"kv_cache must have shape [num_blocks, 2, block_size, num_kv_heads, head_dim], got {list(kv_cache.shape)}")
    check_dtype("kv_cache", kv_cache, tuple(KV_DTYPES.values()))
    check_contiguous("kv_cache", kv_cache)


def check_power_of_two(name: str, value: int, minimum: int = 1) -> None:
    if value < minimum or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {minimum}, got {value}")


def check_attention_args(q: torch.Tensor, kv_cache: torch.Tensor) -> None:
    """What both paged-attention kernels need of ``q`` ``[tokens, heads, head_dim]`` and the cache."""
    check_kv_cache(kv_cache)
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    check_shape("q", q, (-1, -1, head_dim))
    check_device("q", q, kv_cache)
    check_last_dim_contiguous("q", q)
    if kv_cache.dtype not in FP8_KV_DTYPES.values():
        check_same_dtype("q", q, "kv_cache", kv_cache)
    check_dtype("q", q)
    if q.shape[1] % num_kv_heads:
        raise ValueError(f"num_heads {q.shape[1]} must be a multiple of num_kv_heads {num_kv_heads}")
    check_power_of_two("head_dim", head_dim, 16)
    check_power_of_two("block_size", block_size)


@functools.lru_cache(maxsize=8)
def num_sms(device: torch.device) -> int:
    """The streaming multiprocessors of a CUDA ``device`` (4 elsewhere: the interpreter's grids)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
