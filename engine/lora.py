"""LoRA on the device: the resident adapters, stacked per engine module, and a step's
batch of tokens that use them.

``LoRAStack`` holds every loaded adapter (all stay resident) as one ``A`` ``[adapters, width, in]``
and one ``B`` ``[adapters, out, width]`` tensor per (layer, engine module) it adapts. The engine
fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` (``models/llama.py``), so a fused
module's ``A`` stacks its projections' ``A`` along the rank and its ``B`` places each projection's
``B`` (scale folded in) in that projection's rows and rank columns: ``(x @ A^T) @ B^T`` is then
every slice's delta at once. Ranks are zero-padded to the largest loaded, which adds zeros only.
A load or an unload while serving builds a new stack in its place, between steps
(``ModelRunner.add_lora``).

``LoRABatch`` is one step's use of them: each token's adapter (-1: the base model), and those
tokens grouped by adapter (``kernels/lora.py``'s ``group_by_adapter``: computed once a step on
the device, shared by every module). ``add`` gives each token its own adapter's delta with two
launches, the grouped ("punica"-style) kernels ``ops.lora_shrink`` (``x @ A[adapter]^T``) and
``ops.lora_expand_add`` (``out += that @ B[adapter]^T``), which compute each token under its own
adapter only, whatever the number loaded; base tokens are left as they are. On CPU both run
their plain-torch references, and no grouping is computed. A step where no sequence names an adapter has no batch at all,
and the model runs its plain path (fused kernels, CUDA graphs) at no cost.

Every launch's shape is fixed by the stack and the step's token count, never by the mix of
adapters, so a decode step with a LoRA sequence replays CUDA graphs captured with it, each row's
adapter a static input and its grouping recomputed in the replay (``engine/cuda_graph.py``);
a new stack (a load or an unload) has them captured again.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from baton.engine.attention import to_device
from baton.engine.lora_loader import LoRAAdapter, projection_shape
from baton.engine.model_config import ModelConfig
from baton.engine.sequence import ScheduledChunk
from baton.kernels import ops
from baton.kernels.lora import group_by_adapter


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
        self.device, self.dtype = device, dtype
        rank = max((adapter.rank for adapter in adapters), default=0)
        self.weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in range(config.num_layers):
            for module, projs in ENGINE_MODULES.items():
                if any((layer, proj) in adapter.weights for adapter in adapters for proj in projs):
                    self.weights[(layer, module)] = _stack(adapters, config, layer, projs, rank, device, dtype)

    def batch(self, chunks: Seq[ScheduledChunk]) -> LoRABatch | None:
        """Each token's adapter in the step (chunks packed in order); None when no chunk has one."""
        if not self.names or all(chunk.seq.lora is None for chunk in chunks):
            return None
        adapters = [self.index[chunk.seq.lora] if chunk.seq.lora is not None else -1
                    for chunk in chunks for _ in range(chunk.num_new_tokens)]
        return LoRABatch(self, to_device(torch.tensor(adapters, dtype=torch.int64), self.device))


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
    """One step's tokens under the stack's adapters: ``adapters[t]`` is token ``t``'s (-1: none), and
    ``groups`` those tokens grouped by adapter on a CUDA device, for every module's kernels (None
    elsewhere: the torch references need no grouping)."""

    def __init__(self, stack: LoRAStack, adapters: torch.Tensor) -> None:
        self.stack, self.adapters = stack, adapters
        self.groups = group_by_adapter(adapters, len(stack.names)) if adapters.is_cuda else None

    def layer(self, layer: int) -> LayerLoRA:
        return LayerLoRA(self, layer)


class LayerLoRA:
    """A ``LoRABatch`` seen from one decoder layer: what its modules call."""

    def __init__(self, batch: LoRABatch, layer: int) -> None:
        self.batch, self.layer_index = batch, layer

    def add(self, module: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` (engine ``module``'s output for input ``x``, ``[tokens, out]``) plus each token's
        adapter delta, in place; returned for chaining. Untouched where no adapter adapts this module."""
        weights = self.batch.stack.weights.get((self.layer_index, module))
        if weights is None:
            return out
        lora_a, lora_b = weights
        adapters, groups = self.batch.adapters, self.batch.groups
        return ops.lora_expand_add(ops.lora_shrink(x, lora_a, adapters, groups), lora_b, adapters, out, groups)
