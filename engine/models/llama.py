"""One decoder-only implementation for the Llama family on the paged KV cache:
Llama 2/3/3.x, Mistral, Qwen2/2.5 (q/k/v bias), Qwen3 (per-head q/k RMSNorm), Phi-3 and
Phi-4 (q/k/v and gate/up fused in the checkpoint too), Granite (scalar multipliers:
``ModelConfig``; the residual one is folded into the output and down projections once their
weights are loaded, ``fold_scales``), OLMo 2 (q/k RMSNorm over all heads at once, and each
layer's norms after its attention and MLP instead of before: ``DecoderLayer``), Gemma 1/2
(GeGLU, norms by ``1 + weight``, scaled embeddings; Gemma 2 also norms before and after its
attention and MLP, soft-caps attention scores and logits, and slides a window over every other
layer's keys) and Gemma 3's text model (Gemma 2's layers without the caps, with per-head q/k
norms, five sliding-window layers to a full one, and a RoPE of their own for the sliding ones);
and the mixture-of-experts families on those layers: Mixtral, Qwen2-MoE (with its shared
expert), Qwen3-MoE, OLMoE and Granite MoE (``SparseMoE``).

Module names follow Hugging Face, except that q/k/v are fused into ``qkv_proj``
and gate/up into ``gate_up_proj`` (``STACKED_PARAMS`` tells the loader how).
Every hot op goes through ``baton.kernels.ops`` so Triton kernels plug in on GPU.

LoRA (``engine/lora.py``): a step with adapter tokens hands each layer a ``LayerLoRA``
that adds their deltas to the projections' outputs; those projections then skip the
fused kernels that never materialize them (q/k/v with the KV store, the MLP's down
projection with its activation). A step without one takes the plain path unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from baton.engine.attention import AttentionMetadata, paged_attention_forward
from baton.engine.model_config import ModelConfig
from baton.engine.models.quantized import takes_fp8_rows, weight_block, weight_scale
from baton.kernels import ops
from baton.kernels.rotary import split_qkv

if TYPE_CHECKING:
    from baton.engine.lora import LayerLoRA, LoRABatch

# Checkpoint projection name -> (fused engine name, shard key). Shard keys are the
# order of the slices inside the fused weight.
STACKED_PARAMS: dict[str, tuple[str, str]] = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}


def project(layer: nn.Linear, x: torch.Tensor, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``layer(x)`` for ``x`` ``[tokens, in]`` through ``ops.linear``: on CUDA, decode-sized
    inputs (at most ``MAX_DISPATCH_ROWS`` tokens) run the Triton GEMV, larger ones cuBLAS.

    All four projections of a layer take it: at one token on an H100 (bf16, CUDA-graph
    replay, ``bench/bench_kernels.py --linear-only``) the GEMV beat cuBLAS on each of
    Llama-3.2-1B's qkv (6.1 vs 7.2 us), o (4.8 vs 6.2), gate_up (23.1 vs 25.3) and down
    (13.2 vs 16.4), and the 1B batch-1 decode step (graph replay, ctx 512) went from 1.256
    to 1.132 ms. Without q/k norms, qkv's GEMV also rotates and writes the KV cache
    (``ops.qkv_rotary_store_kv``). ``lm_head`` (``compute_logits``) takes the GEMV at one row only.
    An ``Fp8Linear`` (``engine/models/quantized.py``) passes its weight scales too, and its block
    where scaled per block; ``x_fp8``, ``x``'s rows in E4M3 as the norm before made them
    (``ops.rms_norm_fp8``), spares it their quantization."""
    return ops.linear(x, layer.weight, layer.bias, weight_scale(layer), weight_block(layer), x_fp8)


class RMSNorm(nn.Module):
    """Weight holder; the math is ``ops.rms_norm`` (optionally fused with the residual add),
    Gemma's with ``unit_offset``."""

    def __init__(self, size: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return ops.rms_norm(x, self.weight, self.eps, residual, self.unit_offset)


def make_norm(config: ModelConfig, size: int | None = None) -> RMSNorm:
    """An RMSNorm over ``size`` (default: the hidden size) with the model's numerics."""
    return RMSNorm(size or config.hidden_size, config.rms_norm_eps, config.gemma_norms)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = config.attention_multiplier or self.head_dim**-0.5
        self.sliding_window = config.sliding_windows[layer] if config.sliding_windows else None
        self.softcap = config.attn_logit_softcap
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_bias)
        self.qk_norm = config.qk_norm
        full = config.qk_norm == "full"
        self.q_norm = make_norm(config, self.q_size if full else self.head_dim) if config.qk_norm else None
        self.k_norm = make_norm(config, self.kv_size if full else self.head_dim) if config.qk_norm else None

    def shard_sizes(self) -> dict[str, int]:
        return {"q": self.q_size, "k": self.kv_size, "v": self.kv_size}

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        kv_cache: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        meta: AttentionMetadata,
        lora: LayerLoRA | None = None,
        hidden_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``hidden_fp8``: ``hidden``'s rows in E4M3 where the norm before made them (``qkv_proj`` FP8:
        ``takes_fp8_rows``)."""
        num_tokens = hidden.shape[0]
        if self.q_norm is None and lora is None:
            q = ops.qkv_rotary_store_kv(hidden, self.qkv_proj.weight, self.qkv_proj.bias, positions, cos_sin_cache,
                                        kv_cache, meta.slot_mapping, weight_scale(self.qkv_proj),
                                        weight_block(self.qkv_proj), hidden_fp8)
        else:
            qkv = project(self.qkv_proj, hidden, hidden_fp8)
            q, k, v = split_qkv(qkv if lora is None else lora.add("qkv_proj", hidden, qkv), self.num_kv_heads, self.head_dim)
            if self.q_norm is not None and self.k_norm is not None:
                q, k = self._norm(self.q_norm, q), self._norm(self.k_norm, k)
            q = ops.rotary_store_kv(positions, q, k, v, cos_sin_cache, kv_cache, meta.slot_mapping)
        out = paged_attention_forward(q, kv_cache, meta, self.scale, self.sliding_window, self.softcap)
        out = out.reshape(num_tokens, self.q_size)
        return project(self.o_proj, out) if lora is None else lora.add("o_proj", out, project(self.o_proj, out))

    def _norm(self, norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[tokens, heads, head_dim]`` normed each head alone, or all heads at once ("full")."""
        if self.qk_norm != "full":
            return norm(x)
        return norm(x.reshape(x.shape[0], -1)).view(x.shape)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size or config.intermediate_size
        self.activation = config.hidden_act
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * self.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def shard_sizes(self) -> dict[str, int]:
        return {"gate": self.intermediate_size, "up": self.intermediate_size}

    def forward(self, x: torch.Tensor, lora: LayerLoRA | None = None,
                x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``x_fp8``: ``x``'s rows in E4M3 where the norm before made them (``gate_up_proj`` FP8: ``takes_fp8_rows``)."""
        gate_up = project(self.gate_up_proj, x, x_fp8)
        if lora is None:
            return ops.gated_linear(gate_up, self.down_proj.weight, self.down_proj.bias, self.activation,
                                    weight_scale(self.down_proj), weight_block(self.down_proj))
        hidden = ops.act_and_mul(lora.add("gate_up_proj", x, gate_up), self.activation)
        return lora.add("down_proj", hidden, project(self.down_proj, hidden))


class Experts(nn.Module):
    """Every expert's gated MLP, stacked: ``gate_up_proj`` ``[experts, 2 * intermediate, hidden]``
    (each expert's gate rows, then its up rows) and ``down_proj`` ``[experts, hidden, intermediate]``,
    as transformers holds them (checkpoints name each expert's projections: the loader stacks them)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.moe is not None
        experts, self.intermediate_size = config.moe.num_experts, config.moe.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * self.intermediate_size, config.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(experts, config.hidden_size, self.intermediate_size))

    def shard_sizes(self) -> dict[str, int]:
        return {"gate": self.intermediate_size, "up": self.intermediate_size}


class SparseMoE(nn.Module):
    """A mixture-of-experts MLP (``ModelConfig.moe``): the router (``gate``) picks each token's
    experts in torch, with no host sync (CUDA graphs capture it); ``ops.fused_moe`` runs them."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.moe is not None
        self.top_k, self.renormalize, self.activation = config.moe.top_k, config.moe.renormalize, config.hidden_act
        self.gate = nn.Linear(config.hidden_size, config.moe.num_experts, bias=False)
        self.experts = Experts(config)
        shared = config.moe.shared_intermediate_size
        self.shared_expert = MLP(config, shared) if shared else None
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(project(self.gate, x), dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = ops.fused_moe(x, self.experts.gate_up_proj, self.experts.down_proj, weights, ids, self.activation)
        if self.shared_expert is None or self.shared_expert_gate is None:
            return out
        return out + torch.sigmoid(project(self.shared_expert_gate, x)) * self.shared_expert(x)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, index)
        self.sparse = config.moe is not None and config.moe.sparse_layers[index]
        self.mlp = SparseMoE(config) if self.sparse else MLP(config)
        self.local_rope = bool(config.local_rope_layers) and config.local_rope_layers[index]
        self.norms = config.layer_norms
        self.input_layernorm = None if self.norms == "post" else make_norm(config)
        self.post_attention_layernorm = make_norm(config)
        if self.norms == "both":
            self.pre_feedforward_layernorm = make_norm(config)
        if self.norms != "pre":
            self.post_feedforward_layernorm = make_norm(config)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        meta: AttentionMetadata,
        lora: LayerLoRA | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(mlp_out, residual)``; the next norm adds them (fused), or with norms only after
        the attention and MLP ("post") the next layer (the model's final norm fuses the last add
        either way). With "both", ``post_attention_layernorm`` norms the attention's output and
        ``pre_feedforward_layernorm`` the MLP's input."""
        if self.norms == "post":
            if residual is not None:
                hidden = hidden + residual
            hidden = hidden + self.post_attention_layernorm(self.self_attn(positions, hidden, kv_cache, cos_sin_cache,
                                                                           meta, lora))
            return self.post_feedforward_layernorm(self._mlp(hidden, lora)), hidden
        hidden, hidden_fp8, residual = self._norm(self.input_layernorm, hidden, residual, self.self_attn.qkv_proj)
        hidden = self.self_attn(positions, hidden, kv_cache, cos_sin_cache, meta, lora, hidden_fp8)
        mlp_in = None if self.sparse else self.mlp.gate_up_proj
        if self.norms == "both":
            hidden, hidden_fp8, residual = self._norm(self.pre_feedforward_layernorm, self.post_attention_layernorm(hidden),
                                                      residual, mlp_in)
            return self.post_feedforward_layernorm(self._mlp(hidden, lora, hidden_fp8)), residual
        hidden, hidden_fp8, residual = self._norm(self.post_attention_layernorm, hidden, residual, mlp_in)
        return self._mlp(hidden, lora, hidden_fp8), residual

    @staticmethod
    def _norm(norm: RMSNorm, hidden: torch.Tensor, residual: torch.Tensor | None, proj: nn.Module | None,
              ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor]:
        """``norm(hidden + residual)`` (of ``hidden`` alone on the first layer), the rows it made in E4M3
        where ``proj``, which takes them next, is FP8 and takes them (``takes_fp8_rows``: per token, or
        per group of its block's ``bk``, in the same launch, ``ops.rms_norm_fp8``; else None), and the
        new residual."""
        if takes_fp8_rows(proj):
            block = weight_block(proj)
            normed, rows, summed = ops.rms_norm_fp8(hidden, norm.weight, norm.eps, residual, norm.unit_offset,
                                                    None if block is None else block[1])
            return normed, rows, hidden if summed is None else summed
        if residual is None:
            return norm(hidden), None, hidden
        normed, summed = norm(hidden, residual)
        return normed, None, summed

    def _mlp(self, x: torch.Tensor, lora: LayerLoRA | None, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The MLP; an adapter never adapts a sparse one's experts (the LoRA loader refuses such adapters)."""
        return self.mlp(x) if self.sparse else self.mlp(x, lora, x_fp8)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = make_norm(config)


class LlamaForCausalLM(nn.Module):
    """``forward`` runs the packed tokens of one step; ``compute_logits`` projects chosen rows."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("cos_sin_cache", torch.empty(0), persistent=False)
        self.register_buffer("local_cos_sin_cache", torch.empty(0), persistent=False)
        self.embedding_scale = config.embedding_multiplier

    def fold_scales(self) -> None:
        """Scale the output and down projections (weights, or an FP8 one's scales, per channel or per
        block, and biases) by ``residual_multiplier``, once the checkpoint is loaded: what they add to
        the residual stream is then scaled. Gemma's embedding multiplier is rounded to the weights' dtype, as transformers rounds it."""
        if self.config.gemma_norms:
            weight = self.model.embed_tokens.weight
            self.embedding_scale = float(torch.tensor(self.config.embedding_multiplier, dtype=weight.dtype))
        m = self.config.residual_multiplier
        if m != 1.0:
            with torch.no_grad():
                for layer in self.model.layers:
                    params = [layer.mlp.experts.down_proj] if layer.sparse else []
                    for proj in [layer.self_attn.o_proj] + ([] if layer.sparse else [layer.mlp.down_proj]):
                        scale = weight_scale(proj)
                        params += [proj.weight if scale is None else scale, proj.bias]
                    for param in params:
                        if param is not None:
                            param.mul_(m)

    def set_cos_sin_cache(self, cache: torch.Tensor, local_cache: torch.Tensor | None = None) -> None:
        """Install the ``[max_positions, rotary_dim]`` RoPE table (see ``engine/rope.py``), and the
        sliding layers' own where they have one (``ModelConfig.local_rope``)."""
        self.cos_sin_cache = cache
        if local_cache is not None:
            self.local_cos_sin_cache = local_cache

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        on_layer_done: Callable[[int], None] | None = None,
        lora: LoRABatch | None = None,
    ) -> torch.Tensor:
        """``input_ids``/``positions`` ``[T]`` -> final hidden states ``[T, hidden]``; ``lora``: the
        step's adapter tokens (None: none).
        ``on_layer_done(i)`` is called once layer ``i`` has written its KV into ``kv_caches[i]``
        (on CUDA: once that write is enqueued on the current stream; record an event there
        before reading the cache from another stream)."""
        hidden = self.model.embed_tokens(input_ids)
        if self.embedding_scale != 1.0:
            hidden = hidden * self.embedding_scale
        residual: torch.Tensor | None = None
        for i, layer in enumerate(self.model.layers):
            layer_lora = lora.layer(i) if lora is not None else None
            cos_sin = self.local_cos_sin_cache if layer.local_rope else self.cos_sin_cache
            hidden, residual = layer(positions, hidden, residual, kv_caches[i], cos_sin, meta, layer_lora)
            if on_layer_done is not None:
                on_layer_done(i)
        hidden, _ = self.model.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` -> ``[N, vocab]`` in the model's dtype (the sampler widens what it
        reads to float32, so no float32 copy of the logits is written). One row takes
        ``ops.linear`` (the GEMV on CUDA: 116.9 us for Llama-3.2-1B's vocabulary on an H200
        against cuBLAS's 126.4); more take ``F.linear`` (at two rows the GEMV is slower, 137.0 us
        against 126.8)."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = ops.linear(hidden, weight) if hidden.shape[0] == 1 else F.linear(hidden, weight)
        if self.config.logits_scaling != 1.0:
            logits = logits / self.config.logits_scaling
        cap = self.config.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap
