"""The model's own shape and numerics, parsed from a Hugging Face ``config.json``
(and ``generation_config.json``). Pure Python: no torch.

Sliding-window attention is read per layer (``sliding_windows``) the way transformers reads it
for each family: ``layer_types`` where the config names them, else every other layer (Gemma 2),
five in each six (Gemma 3's ``sliding_window_pattern``), the layers from ``max_window_layers`` on
(Qwen2/Qwen3 with ``use_sliding_window``) or every layer (Mistral, Phi-3). A window no shorter
than the longest sequence served is dropped.

A Gemma 3 image-text checkpoint (``Gemma3ForConditionalGeneration``: the 4B, 12B and 27B) is
read as its text model: its ``text_config``, and the weights under ``language_model.``
(``weights_prefix``), the vision tower's and projector's left out (``skipped_weights``).

Both layouts of RoPE settings are understood: ``rope_parameters`` (transformers 5)
and ``rope_theta`` + ``rope_scaling`` (older checkpoints). An embedding model's pooling is
read from its sentence-transformers files (``load_pooler_config``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baton.engine.models import SUPPORTED_ARCHITECTURES
from baton.engine.pooling import PoolerConfig, pooling_module_path
from baton.engine.quantization import checkpoint_block_scale_suffix, checkpoint_quantization, checkpoint_weight_block

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
GEMMA_ARCHITECTURES = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM",
                     "GraniteMoeForCausalLM")
_GRANITE_ARCHITECTURES = ("GraniteForCausalLM", "GraniteMoeForCausalLM")
_QWEN_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
_LAYER_NORMS = {"Olmo2ForCausalLM": "post", "Gemma2ForCausalLM": "both", "Gemma3ForCausalLM": "both"}   # else "pre"
_DEFAULT_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class RopeConfig:
    """RoPE base and scaling. ``factor`` is used by "linear" and "llama3"; the frequency factors by
    "llama3"; ``original_max_position_embeddings`` by both "llama3" and "longrope" (Phi-3.5,
    Phi-4-mini), which divides each frequency by its ``short_factor`` or ``long_factor`` entry and
    scales cosines and sines by ``attention_factor`` (``engine/rope.py``)."""

    theta: float = _DEFAULT_ROPE_THETA
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0


@dataclass(frozen=True)
class SparseMoEConfig:
    """A sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, Granite MoE): a router's
    softmax over ``num_experts`` gated MLPs, each ``intermediate_size`` wide, sends each token through
    its ``top_k`` most probable, weighted by those probabilities (divided by their sum with
    ``renormalize``: Mixtral and Granite always, Qwen and OLMoE with ``norm_topk_prob``). Qwen2-MoE adds a shared
    expert (``shared_intermediate_size`` wide; 0: none) scaled by the sigmoid of a gate of its own.
    ``sparse_layers``: the layers that have one; the others have a dense MLP (Qwen's
    ``mlp_only_layers`` and ``decoder_sparse_step``)."""

    num_experts: int
    top_k: int
    intermediate_size: int
    renormalize: bool
    sparse_layers: tuple[bool, ...]
    shared_intermediate_size: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """Everything the engine needs to know about a decoder-only Llama-family model (Gemma and the
    mixture-of-experts families included: ``moe``)."""

    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int                # the leading dims of each head that RoPE rotates (partial_rotary_factor)
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool                 # bias on the q/k/v projections (Qwen2; Llama ``attention_bias``)
    o_bias: bool                   # bias on the output projection (Llama/Qwen3 ``attention_bias``)
    mlp_bias: bool
    qk_norm: str | None            # RMSNorm on q and k before RoPE: "head", each head (Qwen3); "full", all heads (OLMo 2)
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    dtype: str                     # the checkpoint's dtype: one of SUPPORTED_DTYPES
    has_lm_head: bool = True       # False: a base model's checkpoint (``LlamaModel``...): embeddings only
    weights_prefix: str = ""                   # what the checkpoint's tensor names of this model start with
    skipped_weights: tuple[str, ...] = ()      # prefixes of the checkpoint's tensors that are not this model's
    # Where each layer norms: "pre", the inputs of its attention and MLP (Llama); "post", their
    # outputs (OLMo 2); "both" (Gemma 2 and 3).
    layer_norms: str = "pre"
    hidden_act: str = "silu"       # the gated MLP's activation: "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU)
    # Gemma: every RMSNorm scales by 1 + weight (rounding once, in float32), and the embedding
    # multiplier is rounded to the model's dtype before it scales the embeddings.
    gemma_norms: bool = False
    sliding_windows: tuple[int | None, ...] = ()   # per layer: keys a query sees (None, or no entries: all)
    # Gemma 3: its sliding-window layers rotate by a RoPE of their own (``local_rope_layers``: which).
    local_rope: RopeConfig | None = None
    local_rope_layers: tuple[bool, ...] = ()
    attn_logit_softcap: float | None = None        # Gemma 2: scores become cap * tanh(score / cap)
    final_logit_softcap: float | None = None       # Gemma 2: the same on the logits
    # Granite's scalars (1.0 and None elsewhere): the embeddings times ``embedding_multiplier``, each
    # attention and MLP output times ``residual_multiplier`` before it joins the residual stream,
    # ``attention_multiplier`` the attention's softmax scale (None: head_dim ** -0.5), and the
    # logits divided by ``logits_scaling``.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    moe: SparseMoEConfig | None = None
    quantization: str | None = None    # the linear layers' weights (``engine/quantization.py``): None or "fp8"
    # A block-wise FP8 checkpoint's ``weight_block_size`` (bn, bk): a weight scale per block; None: per channel.
    weight_block_size: tuple[int, int] | None = None
    block_scale_suffix: str = ".weight_scale_inv"   # what such a checkpoint calls its block scales

    @classmethod
    def from_dict(
        cls,
        cfg: dict[str, Any],
        generation_config: dict[str, Any] | None = None,
        max_model_len: int | None = None,
    ) -> ModelConfig:
        """Parse a ``config.json`` dict. ``max_model_len`` (default: ``max_position_embeddings``)
        is the longest sequence the engine will serve: a sliding window no shorter than that is dropped."""
        quantization, weight_block = checkpoint_quantization(cfg), checkpoint_weight_block(cfg)
        block_scale_suffix = checkpoint_block_scale_suffix(cfg)
        cfg, weights = _text_model(cfg)
        architecture, has_lm_head = _architecture(cfg)
        gemma = architecture in GEMMA_ARCHITECTURES
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        max_pos = int(cfg.get("max_position_embeddings", 2048))
        num_layers = int(cfg["num_hidden_layers"])
        if cfg.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention is not supported: the engine generates causally")
        if cfg.get("clip_qkv") is not None:
            raise ValueError(f"clip_qkv={cfg['clip_qkv']} is not supported")
        rope, local_rope = _rope_configs(architecture, cfg, max_pos)
        sliding = _sliding_layers(architecture, cfg, num_layers)
        qkv_bias, o_bias, mlp_bias = _biases(architecture, cfg)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        return cls(
            architecture=architecture,
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rotary_dim=int(head_dim * _partial_rotary_factor(cfg)),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope=rope,
            max_position_embeddings=max_pos,
            # A base model has no LM head to load: the embedding matrix stands in (never used). Gemma's
            # configs tie by default.
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)) or not has_lm_head,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            qk_norm={"Qwen3ForCausalLM": "head", "Qwen3MoeForCausalLM": "head", "Gemma3ForCausalLM": "head",
                     "Olmo2ForCausalLM": "full", "OlmoeForCausalLM": "full"}.get(architecture),
            eos_token_ids=_eos_token_ids(cfg, generation_config or {}),
            bos_token_id=cfg.get("bos_token_id"),
            dtype=_dtype(cfg),
            has_lm_head=has_lm_head,
            **weights,
            layer_norms=_LAYER_NORMS.get(architecture, "pre"),
            hidden_act=_hidden_act(architecture, cfg),
            sliding_windows=_sliding_windows(cfg, sliding, max_model_len or max_pos),
            local_rope=local_rope,
            local_rope_layers=tuple(sliding) if local_rope else (),
            **_granite_scalars(architecture, cfg),
            **(_gemma_fields(architecture, cfg, hidden) if gemma else {}),
            moe=_sparse_moe(architecture, cfg, num_layers),
            quantization=quantization,
            weight_block_size=weight_block,
            block_scale_suffix=block_scale_suffix,
        )


def load_model_config(model_dir: Path, max_model_len: int | None = None) -> ModelConfig:
    """Read ``config.json`` (required) and ``generation_config.json`` (optional) from ``model_dir``."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    cfg = json.loads(config_path.read_text())
    gen_path = Path(model_dir) / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else None
    return ModelConfig.from_dict(cfg, gen, max_model_len)


def load_pooler_config(model_dir: Path) -> PoolerConfig:
    """How the checkpoint's sentence-transformers modules (``modules.json`` and its Pooling
    module's ``config.json``) pool an embedding; LAST, normalized, when it has none."""
    modules_path = Path(model_dir) / "modules.json"
    modules = json.loads(modules_path.read_text()) if modules_path.is_file() else []
    path = pooling_module_path(modules)
    if path is None:
        return PoolerConfig()
    return PoolerConfig.from_sentence_transformers(modules, json.loads((Path(model_dir) / path / "config.json").read_text()))


# A base model's architecture -> its causal-LM family (the same layers, no LM head).
BASE_MODELS = {"LlamaModel": "LlamaForCausalLM", "MistralModel": "MistralForCausalLM",
               "Qwen2Model": "Qwen2ForCausalLM", "Qwen3Model": "Qwen3ForCausalLM"}


# An image-text architecture served as its text model -> (that model's architecture, where its
# weights are, the other models' weights).
IMAGE_TEXT_MODELS = {"Gemma3ForConditionalGeneration": ("Gemma3ForCausalLM", "language_model.",
                                                        ("vision_tower.", "multi_modal_projector."))}


def _text_model(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The config of the model to serve (an image-text checkpoint's text model), and the
    ``weights_prefix`` and ``skipped_weights`` fields where they are not the defaults."""
    architectures = cfg.get("architectures") or []
    if len(architectures) != 1 or architectures[0] not in IMAGE_TEXT_MODELS:
        return cfg, {}
    architecture, prefix, skipped = IMAGE_TEXT_MODELS[architectures[0]]
    if not isinstance(cfg.get("text_config"), dict):
        raise ValueError(f"{architectures[0]} config.json has no text_config")
    outer = {k: cfg[k] for k in ("dtype", "torch_dtype", "tie_word_embeddings", "eos_token_id", "bos_token_id") if k in cfg}
    return {**outer, **cfg["text_config"], "architectures": [architecture]}, {"weights_prefix": prefix, "skipped_weights": skipped}


def _architecture(cfg: dict[str, Any]) -> tuple[str, bool]:
    """The architecture, and whether the checkpoint has an LM head: a base model's (saved from
    ``LlamaModel`` and the like, as embedding models are) is read as its causal-LM family's."""
    architectures = cfg.get("architectures") or []
    if len(architectures) != 1:
        raise ValueError(f"config.json must name exactly one architecture, got {architectures!r}")
    architecture = architectures[0]
    if architecture in BASE_MODELS:
        return BASE_MODELS[architecture], False
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES + tuple(BASE_MODELS))}"
        )
    return architecture, True


def _granite_scalars(architecture: str, cfg: dict[str, Any]) -> dict[str, float]:
    if architecture not in _GRANITE_ARCHITECTURES:
        return {}
    return {"embedding_multiplier": float(cfg.get("embedding_multiplier", 1.0)),
            "residual_multiplier": float(cfg.get("residual_multiplier", 1.0)),
            "attention_multiplier": float(cfg.get("attention_multiplier", 1.0)),
            "logits_scaling": float(cfg.get("logits_scaling", 1.0))}


def _gemma_fields(architecture: str, cfg: dict[str, Any], hidden: int) -> dict[str, Any]:
    """Gemma's embeddings times sqrt(hidden_size); Gemma 2's and 3's softmax scale from
    ``query_pre_attn_scalar`` and their soft caps (Gemma 3 gives none)."""
    fields: dict[str, Any] = {"gemma_norms": True, "embedding_multiplier": math.sqrt(hidden)}
    if architecture != "GemmaForCausalLM":
        fields.update(attention_multiplier=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5,
                      attn_logit_softcap=_positive_or_none(cfg, "attn_logit_softcapping"),
                      final_logit_softcap=_positive_or_none(cfg, "final_logit_softcapping"))
    return fields


def _sparse_moe(architecture: str, cfg: dict[str, Any], num_layers: int) -> SparseMoEConfig | None:
    """The experts of an MoE family as transformers reads its config; None for a dense family."""
    if architecture not in MOE_ARCHITECTURES:
        return None
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    top_k = int(cfg.get("num_experts_per_tok") or 0)
    if experts < 1 or not 1 <= top_k <= experts:
        raise ValueError(f"{architecture} needs 1 <= num_experts_per_tok <= its experts, got {top_k} of {experts}")
    if architecture in ("MixtralForCausalLM", "OlmoeForCausalLM", "GraniteMoeForCausalLM"):
        # Granite's softmax over the top k logits is the renormalized top k of the softmax over all.
        renormalize = architecture != "OlmoeForCausalLM" or bool(cfg.get("norm_topk_prob"))
        return SparseMoEConfig(experts, top_k, int(cfg["intermediate_size"]), renormalize, (True,) * num_layers)
    step, dense = int(cfg.get("decoder_sparse_step") or 1), set(cfg.get("mlp_only_layers") or ())
    shared = int(cfg.get("shared_expert_intermediate_size") or 0) if architecture == "Qwen2MoeForCausalLM" else 0
    return SparseMoEConfig(experts, top_k, int(cfg["moe_intermediate_size"]), bool(cfg.get("norm_topk_prob")),
                           tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers)), shared)


def _positive_or_none(cfg: dict[str, Any], key: str) -> float | None:
    value = cfg.get(key)
    if value is None:
        return None
    if float(value) <= 0:
        raise ValueError(f"{key}={value} must be positive (or null for none)")
    return float(value)


def _hidden_act(architecture: str, cfg: dict[str, Any]) -> str:
    """Gemma's GeGLU takes the tanh approximation of GELU (transformers reads a legacy "gelu" so
    too); every other family here SwiGLU."""
    if architecture in GEMMA_ARCHITECTURES:
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        act = "gelu_pytorch_tanh" if act == "gelu" else act
        if act != "gelu_pytorch_tanh":
            raise ValueError(f"hidden_activation={act!r} is not supported for {architecture} (only 'gelu_pytorch_tanh')")
        return act
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r} is not supported (only 'silu')")
    return act


def _biases(architecture: str, cfg: dict[str, Any]) -> tuple[bool, bool, bool]:
    """(q/k/v bias, output-projection bias, MLP bias) as each architecture defines them."""
    attention_bias = bool(cfg.get("attention_bias") or False)
    if architecture in ("LlamaForCausalLM", *_GRANITE_ARCHITECTURES, "Olmo2ForCausalLM"):
        return attention_bias, attention_bias, bool(cfg.get("mlp_bias") or False)
    if architecture == "Qwen2ForCausalLM":
        return True, False, False
    if architecture == "Qwen2MoeForCausalLM":
        return bool(cfg.get("qkv_bias", True)), False, False
    if architecture in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM", *GEMMA_ARCHITECTURES):
        return attention_bias, attention_bias, False
    return False, False, False


def _sliding_layers(architecture: str, cfg: dict[str, Any], num_layers: int) -> list[bool]:
    """Which layers are sliding-window layers (whatever their window's length)."""
    qwen = architecture in _QWEN_ARCHITECTURES
    if cfg.get("sliding_window") is None or not cfg.get("use_sliding_window", not qwen):
        return [False] * num_layers
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        if len(layer_types) != num_layers:
            raise ValueError(f"layer_types names {len(layer_types)} layers, the model has {num_layers}")
        return [kind == "sliding_attention" for kind in layer_types]
    if architecture == "Gemma2ForCausalLM":
        return [i % 2 == 0 for i in range(num_layers)]
    if architecture == "Gemma3ForCausalLM":
        pattern = int(cfg.get("sliding_window_pattern", 6))
        return [(i + 1) % pattern != 0 for i in range(num_layers)]
    if qwen:
        first = int(cfg.get("max_window_layers", num_layers))
        return [i >= first for i in range(num_layers)]
    return [True] * num_layers


def _sliding_windows(cfg: dict[str, Any], sliding: list[bool], max_len: int) -> tuple[int | None, ...]:
    """Each layer's window (None: full attention); () where no layer's window is shorter than ``max_len``."""
    if not any(sliding):
        return ()
    window = cfg["sliding_window"]
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"sliding_window={window!r} must be a positive integer")
    if window >= max_len:
        return ()
    return tuple(window if s else None for s in sliding)


def _rope_configs(architecture: str, cfg: dict[str, Any], max_pos: int) -> tuple[RopeConfig, RopeConfig | None]:
    """The RoPE of every layer, or (Gemma 3) of its full-attention layers and of its sliding ones:
    ``rope_parameters`` per layer type, or the older ``rope_theta`` (1M by default) and
    ``rope_scaling`` for the full layers and ``rope_local_base_freq`` (10k) for the sliding ones."""
    params = dict(cfg.get("rope_parameters") or {})
    per_type = any(isinstance(v, dict) for v in params.values())
    if architecture != "Gemma3ForCausalLM":
        if per_type:
            raise ValueError(f"per-layer-type rope_parameters are not supported for {architecture}")
        return _rope_config(cfg, {**(cfg.get("rope_scaling") or {}), **params}, max_pos), None
    if per_type:
        full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    else:
        full = {**(cfg.get("rope_scaling") or {}), **params}
        local = {"rope_type": "default", "rope_theta": cfg.get("rope_local_base_freq", 10_000.0)}
    full = {"rope_theta": cfg.get("rope_theta", 1_000_000.0), **full}
    return _rope_config(cfg, full, max_pos), _rope_config(cfg, {"rope_theta": 10_000.0, **local}, max_pos)


def _rope_config(cfg: dict[str, Any], merged: dict[str, Any], max_pos: int) -> RopeConfig:
    """One RoPE from ``merged`` (a ``rope_parameters`` or ``rope_scaling`` dict, with the theta)."""
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    rope_type = "longrope" if rope_type == "su" else rope_type   # Phi-3's first name for it
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    theta = merged.get("rope_theta", cfg.get("rope_theta")) or _DEFAULT_ROPE_THETA
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    if rope_type == "longrope":
        return _longrope_config(cfg, merged, float(theta), max_pos)
    if "factor" not in merged:
        raise ValueError(f"rope type {rope_type!r} needs a 'factor'")
    if rope_type == "linear":
        return RopeConfig(theta=float(theta), rope_type="linear", factor=float(merged["factor"]))
    missing = [k for k in ("low_freq_factor", "high_freq_factor") if k not in merged]
    if missing:
        raise ValueError(f"rope type 'llama3' needs {', '.join(missing)}")
    return RopeConfig(
        theta=float(theta),
        rope_type="llama3",
        factor=float(merged["factor"]),
        low_freq_factor=float(merged["low_freq_factor"]),
        high_freq_factor=float(merged["high_freq_factor"]),
        original_max_position_embeddings=int(merged.get("original_max_position_embeddings") or max_pos),
    )


def _partial_rotary_factor(cfg: dict[str, Any]) -> float:
    params = dict(cfg.get("rope_parameters") or {})
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    partial = 1.0 if partial is None else float(partial)
    if not 0.0 < partial <= 1.0:
        raise ValueError(f"partial_rotary_factor={partial} must be in (0, 1]")
    return partial


def _longrope_config(cfg: dict[str, Any], params: dict[str, Any], theta: float, max_pos: int) -> RopeConfig:
    """LongRoPE as transformers reads it: the attention factor given, or else from ``factor`` (by
    default the ratio of ``max_position_embeddings`` to the original), as the paper suggests."""
    original = params.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
    if original is None or "short_factor" not in params or "long_factor" not in params:
        raise ValueError("rope type 'longrope' needs short_factor, long_factor and original_max_position_embeddings")
    factor = float(params.get("factor") or max_pos / int(original))
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(int(original)))
    return RopeConfig(theta=theta, rope_type="longrope", factor=factor, original_max_position_embeddings=int(original),
                      short_factor=tuple(map(float, params["short_factor"])),
                      long_factor=tuple(map(float, params["long_factor"])), attention_factor=float(attention_factor))


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _eos_token_ids(cfg: dict[str, Any], generation_config: dict[str, Any]) -> tuple[int, ...]:
    ids = _as_ids(generation_config.get("eos_token_id")) + _as_ids(cfg.get("eos_token_id"))
    return tuple(dict.fromkeys(ids))


def _dtype(cfg: dict[str, Any]) -> str:
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"checkpoint dtype {dtype!r} is not supported; supported: {', '.join(SUPPORTED_DTYPES)}")
    return dtype
