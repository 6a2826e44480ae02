"""LoRA on the device: the resident adapters, stacked per engine module, and a step's
batch of tokens that use them.

``LoRAStack`` holds every loaded adapter (all stay resident) as one ``A`` and one ``B``
tensor per (layer, engine module) it adapts. The engine fuses q/k/v into ``qkv_proj`` and
gate/up into ``gate_up_proj`` (``models/llama.py``), so a fused module's ``A`` stacks its
projections' ``A`` along the rank and its ``B`` places each projection's ``B`` (scale folded
in) in that projection's rows and rank columns: ``(x @ A^T) @ B^T`` is then every slice's
delta at once. Ranks are zero-padded to the largest loaded, which adds zeros only.

``LoRABatch`` is one step's use of them: for each adapter in the step, the rows (token
positions in the packed batch) whose sequence uses it. ``add`` gives each group its
``scale * (x @ A^T) @ B^T``: one gather, two small matmuls and one ``index_add_`` per
adapter in the step. A step where no sequence names an adapter has no batch at all, and
the model runs its plain path (fused kernels, CUDA graphs) at no cost.

Plain torch, no Triton kernel (a grouped "punica"-style kernel is the next step for large
batches of many adapters). A step with a LoRA sequence runs eagerly: the CUDA graphs are
captured without adapters and never replay such a step (``engine/cuda_graph.py``).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from baton.engine.attention import to_device
from baton.engine.lora_loader import LoRAAdapter, projection_shape
from baton.engine.model_config import ModelConfig
from baton.engine.sequence import ScheduledChunk


# Engine module -> the checkpoint projections it computes, in the order of its output slices
# (``models/llama.py``'s ``shard_sizes``).
ENGINE_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


class LoRAStack:
    """The loaded adapters on ``device`` in ``dtype``; adapter ``i`` is ``names[i]``."""

    def __init__(self, adapters: Seq[LoRAAdapter], config: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.names = [adapter.name for adapter in adapters]
        self.index = {name: i for i, name in enumerate(self.names)}
        self.device = device
        rank = max((adapter.rank for adapter in adapters), default=0)
        self.weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in range(config.num_layers):
            for module, projs in ENGINE_MODULES.items():
                if any((layer, proj) in adapter.weights for adapter in adapters for proj in projs):
                    self.weights[(layer, module)] = _stack(adapters, config, layer, projs, rank, device, dtype)

    def batch(self, chunks: Seq[ScheduledChunk]) -> LoRABatch | None:
        """The step's token groups by adapter (chunks packed in order); None when no chunk has one."""
        if not self.names:
            return None
        rows: dict[int, list[int]] = {}
        offset = 0
        for chunk in chunks:
            name = chunk.seq.lora
            if name is not None:
                rows.setdefault(self.index[name], []).extend(range(offset, offset + chunk.num_new_tokens))
            offset += chunk.num_new_tokens
        if not rows:
            return None
        groups = [(i, to_device(torch.tensor(r, dtype=torch.int64), self.device)) for i, r in rows.items()]
        return LoRABatch(self, groups)


def _stack(adapters: Seq[LoRAAdapter], config: ModelConfig, layer: int, projs: tuple[str, ...], rank: int,
           device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` ``[adapters, len(projs) * rank, in]`` and ``B`` ``[adapters, out, len(projs) * rank]``
    of one engine module (see module docs); zeros where an adapter leaves a projection alone."""
    shapes = [projection_shape(config, proj) for proj in projs]
    a = torch.zeros(len(adapters), len(projs) * rank, shapes[0][1])
    b = torch.zeros(len(adapters), sum(out for out, _ in shapes), len(projs) * rank)
    for i, adapter in enumerate(adapters):
        row = 0
        for j, (proj, (out, _)) in enumerate(zip(projs, shapes)):
            pair = adapter.weights.get((layer, proj))
            if pair is not None:
                lora_a, lora_b = pair
                a[i, j * rank : j * rank + adapter.rank] = lora_a
                b[i, row : row + out, j * rank : j * rank + adapter.rank] = adapter.scale * lora_b
            row += out
    return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


class LoRABatch:
    """One step's tokens grouped by adapter: ``groups`` of (adapter index, rows)."""

    def __init__(self, stack: LoRAStack, groups: list[tuple[int, torch.Tensor]]) -> None:
        self.stack = stack
        self.groups = groups

    def layer(self, layer: int) -> LayerLoRA:
        return LayerLoRA(self, layer)


class LayerLoRA:
    """A ``LoRABatch`` seen from one decoder layer: what its modules call."""

    def __init__(self, batch: LoRABatch, layer: int) -> None:
        self.batch, self.layer_index = batch, layer

    def add(self, module: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` (engine ``module``'s output for input ``x``, ``[tokens, out]``) plus each grouped
        token's adapter delta, in place; returned for chaining. Untouched where no adapter
        adapts this module."""
        weights = self.batch.stack.weights.get((self.layer_index, module))
        if weights is None:
            return out
        lora_a, lora_b = weights
        for adapter, rows in self.batch.groups:
            shrunk = x.index_select(0, rows) @ lora_a[adapter].T
            out.index_add_(0, rows, shrunk @ lora_b[adapter].T)
        return out
