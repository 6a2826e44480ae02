"""The KV layout handshake: what both ends of a transfer must agree on before
any KV bytes move (model, dtype, block size, memory layout, layers, KV heads,
head dim, how the weights that computed it were quantized), and the check that refuses a mismatch
by naming the field."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from baton.kernels.checks import KV_DTYPES
from baton.kvtransfer.errors import LayoutMismatch
from baton.protos import common_pb2

NB2SHD = "NB2SHD"  # [num_blocks, 2 (K, V), block_size, num_kv_heads, head_dim]

@dataclass(frozen=True, kw_only=True)
class KVLayout:
    """One side's KV cache layout, mirroring ``common.proto``'s ``KVLayout``."""

    model_fingerprint: str
    dtype: str
    block_size: int
    layout: str = NB2SHD
    num_layers: int
    num_kv_heads: int
    head_dim: int
    weight_quantization: str = ""   # the linear layers' quantization method ("fp8"), "" for none

    @classmethod
    def from_caches(cls, kv_caches: list[torch.Tensor], model_fingerprint: str,
                    weight_quantization: str | None = None) -> KVLayout:
        """Describe a list of per-layer caches ``[num_blocks, 2, block_size, heads, head_dim]`` that a
        model whose linear layers are quantized by ``weight_quantization`` (None: not) fills."""
        if not kv_caches:
            raise ValueError("kv_caches is empty")
        shape = kv_caches[0].shape
        if len(shape) != 5 or shape[1] != 2:
            raise ValueError(f"a KV cache must be [num_blocks, 2, block_size, heads, head_dim], got {tuple(shape)}")
        names = {dtype: name for name, dtype in KV_DTYPES.items()}
        if kv_caches[0].dtype not in names:
            raise ValueError(f"unsupported KV cache dtype {kv_caches[0].dtype}")
        return cls(
            model_fingerprint=model_fingerprint,
            dtype=names[kv_caches[0].dtype],
            block_size=shape[2],
            num_layers=len(kv_caches),
            num_kv_heads=shape[3],
            head_dim=shape[4],
            weight_quantization=weight_quantization or "",
        )

    @classmethod
    def from_proto(cls, msg: common_pb2.KVLayout) -> KVLayout:
        return cls(**{f.name: getattr(msg, f.name) for f in fields(cls)})

    def to_proto(self) -> common_pb2.KVLayout:
        return common_pb2.KVLayout(**{f.name: getattr(self, f.name) for f in fields(self)})

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in KV_DTYPES:
            raise ValueError(f"unsupported KV dtype {self.dtype!r}; known: {sorted(KV_DTYPES)}")
        return KV_DTYPES[self.dtype]

    @property
    def block_shape(self) -> tuple[int, int, int, int]:
        """The shape of one block of one layer."""
        return (2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer."""
        n = 2 * self.block_size * self.num_kv_heads * self.head_dim
        return n * self.torch_dtype.itemsize

    def check_cache(self, kv_cache: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``kv_cache`` is one layer's cache in this layout."""
        if tuple(kv_cache.shape[1:]) != self.block_shape or kv_cache.dtype != self.torch_dtype:
            raise ValueError(
                f"KV cache {tuple(kv_cache.shape)} {kv_cache.dtype} does not match the layout "
                f"[num_blocks, {', '.join(map(str, self.block_shape))}] {self.dtype}"
            )
        if not kv_cache.is_contiguous():
            raise ValueError("KV cache must be contiguous")


def check_layout(local: KVLayout, remote: KVLayout) -> None:
    """Raise ``LayoutMismatch`` naming the first field where ``local`` and ``remote`` differ."""
    for f in fields(KVLayout):
        mine, theirs = getattr(local, f.name), getattr(remote, f.name)
        if mine != theirs:
            raise LayoutMismatch(f.name, mine, theirs)
