"""Checkpoint discovery, config parsing, RoPE tables and safetensors loading."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from baton.engine.config import EngineConfig
from baton.engine.loader import build_model, resolve_model_dir, weight_files
from baton.engine.model_config import ModelConfig, RopeConfig, load_model_config
from baton.engine.model_runner import ModelRunner
from baton.engine.rope import build_cos_sin_cache, inverse_frequencies

DEMO = Path(__file__).resolve().parents[2] / "shared" / "models" / "shakespeare-llama-5m"
BASE = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
    "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": 128, "max_position_embeddings": 512,
}


def demo_tensors() -> dict[str, torch.Tensor]:
    tensors = {}
    for path in weight_files(DEMO):
        with safe_open(str(path), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def single_file_copy(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    shutil.copy(DEMO / "config.json", tmp_path / "config.json")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


@pytest.mark.unit
def test_unsupported_architecture_is_named(tmp_path: Path):
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        ModelConfig.from_dict({**BASE, "architectures": ["GPT2LMHeadModel"]})
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "architectures": ["FalconForCausalLM"]}))
    with pytest.raises(ValueError, match="FalconForCausalLM"):
        load_model_config(tmp_path)


@pytest.mark.unit
def test_legacy_and_new_rope_layouts_agree():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
    legacy = ModelConfig.from_dict({**BASE, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **scaling}})
    new = ModelConfig.from_dict({**BASE, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **scaling}})
    assert legacy.rope == new.rope == RopeConfig(500000.0, "llama3", 8.0, 1.0, 4.0, 128)
    plain = ModelConfig.from_dict(BASE)
    assert plain.rope == RopeConfig() and plain.head_dim == 16 and plain.num_kv_heads == 4
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_dict({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


@pytest.mark.unit
def test_longrope_and_partial_rotary_are_read_as_phi3_writes_them():
    """Phi-3's older spelling ("su", the original length beside the scaling), the attention factor
    worked out from the lengths where not given, and partial rotary's share of each head."""
    su = {"type": "su", "short_factor": [1.0], "long_factor": [2.0]}
    phi3 = {**BASE, "architectures": ["Phi3ForCausalLM"], "max_position_embeddings": 131072,
            "partial_rotary_factor": 0.75, "original_max_position_embeddings": 4096, "rope_scaling": su}
    config = ModelConfig.from_dict(phi3)
    assert (config.rope.rope_type, config.rope.original_max_position_embeddings, config.rotary_dim) == \
        ("longrope", 4096, 12)
    assert config.rope.attention_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    given = ModelConfig.from_dict({**phi3, "rope_scaling": {**su, "attention_factor": 1.5}})
    assert given.rope.attention_factor == 1.5
    with pytest.raises(ValueError, match="needs short_factor, long_factor and original_max_position_embeddings"):
        ModelConfig.from_dict({**phi3, "rope_scaling": {"type": "longrope", "short_factor": [1.0]}})
    with pytest.raises(ValueError, match="partial_rotary_factor=1.5 must be in"):
        ModelConfig.from_dict({**phi3, "partial_rotary_factor": 1.5})


@pytest.mark.unit
def test_config_fields_per_architecture():
    gen = {"eos_token_id": [7, 2]}
    llama = ModelConfig.from_dict({**BASE, "eos_token_id": 2, "torch_dtype": "bfloat16", "attention_bias": True}, gen)
    assert llama.eos_token_ids == (7, 2) and llama.dtype == "bfloat16"
    assert (llama.qkv_bias, llama.o_bias, llama.qk_norm, llama.layer_norms) == (True, True, None, "pre")
    qwen2 = ModelConfig.from_dict({**BASE, "architectures": ["Qwen2ForCausalLM"], "num_key_value_heads": 1,
                                   "sliding_window": 64, "use_sliding_window": False, "dtype": "float16"})
    assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.num_kv_heads, qwen2.dtype) == (True, False, 1, "float16")
    qwen3 = ModelConfig.from_dict({**BASE, "architectures": ["Qwen3ForCausalLM"], "head_dim": 32})
    assert qwen3.qk_norm == "head" and qwen3.head_dim == 32 and not qwen3.qkv_bias
    olmo2 = ModelConfig.from_dict({**BASE, "architectures": ["Olmo2ForCausalLM"], "attention_bias": True})
    assert (olmo2.qk_norm, olmo2.layer_norms, olmo2.qkv_bias, olmo2.o_bias, olmo2.mlp_bias) == ("full", "post", True, True, False)
    granite = ModelConfig.from_dict({**BASE, "architectures": ["GraniteForCausalLM"], "embedding_multiplier": 12.0,
                                     "residual_multiplier": 0.22, "attention_multiplier": 0.0078125, "logits_scaling": 8.0})
    assert (granite.embedding_multiplier, granite.residual_multiplier, granite.attention_multiplier,
            granite.logits_scaling) == (12.0, 0.22, 0.0078125, 8.0)
    assert (llama.embedding_multiplier, llama.residual_multiplier, llama.attention_multiplier, llama.logits_scaling) == \
        (1.0, 1.0, None, 1.0)
    assert (llama.hidden_act, llama.gemma_norms, llama.attn_logit_softcap, llama.final_logit_softcap) == ("silu", False, None, None)
    gemma = ModelConfig.from_dict({**BASE, "architectures": ["GemmaForCausalLM"], "hidden_act": "gelu", "head_dim": 256})
    assert (gemma.hidden_act, gemma.gemma_norms, gemma.embedding_multiplier, gemma.head_dim) == \
        ("gelu_pytorch_tanh", True, 8.0, 256)
    gemma2 = ModelConfig.from_dict({**BASE, "architectures": ["Gemma2ForCausalLM"], "hidden_activation": "gelu_pytorch_tanh",
                                    "query_pre_attn_scalar": 16, "attn_logit_softcapping": 50.0,
                                    "final_logit_softcapping": 30.0, "sliding_window": 128})
    assert (gemma2.layer_norms, gemma2.attention_multiplier, gemma2.attn_logit_softcap, gemma2.final_logit_softcap) == \
        ("both", 0.25, 50.0, 30.0)
    assert gemma2.sliding_windows == (128, None)
    with pytest.raises(ValueError, match="hidden_act='gelu' is not supported"):
        ModelConfig.from_dict({**BASE, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="attn_logit_softcapping=0 must be positive"):
        ModelConfig.from_dict({**BASE, "architectures": ["Gemma2ForCausalLM"], "attn_logit_softcapping": 0})


@pytest.mark.unit
def test_mixture_of_experts_fields_are_read_per_family():
    assert ModelConfig.from_dict(BASE).moe is None
    mixtral = ModelConfig.from_dict({**BASE, "architectures": ["MixtralForCausalLM"], "num_local_experts": 8,
                                     "num_experts_per_tok": 2, "sliding_window": None})
    assert mixtral.moe is not None and (mixtral.moe.num_experts, mixtral.moe.top_k, mixtral.moe.intermediate_size) == (8, 2, 96)
    assert mixtral.moe.renormalize and mixtral.moe.sparse_layers == (True, True) and mixtral.moe.shared_intermediate_size == 0
    qwen2 = ModelConfig.from_dict({**BASE, "architectures": ["Qwen2MoeForCausalLM"], "num_hidden_layers": 4, "num_experts": 60,
                                   "num_experts_per_tok": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
                                   "decoder_sparse_step": 2, "mlp_only_layers": [3], "sliding_window": 64,
                                   "use_sliding_window": False})
    assert qwen2.moe is not None and (qwen2.moe.intermediate_size, qwen2.moe.shared_intermediate_size) == (32, 48)
    assert qwen2.moe.sparse_layers == (False, True, False, False) and not qwen2.moe.renormalize
    assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.sliding_windows, qwen2.intermediate_size) == (True, False, (), 96)
    qwen3 = ModelConfig.from_dict({**BASE, "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 128,
                                   "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": True})
    assert qwen3.moe is not None and qwen3.moe.renormalize and qwen3.qk_norm == "head" and qwen3.moe.shared_intermediate_size == 0
    olmoe = ModelConfig.from_dict({**BASE, "architectures": ["OlmoeForCausalLM"], "num_experts": 64, "num_experts_per_tok": 8})
    assert olmoe.moe is not None and (olmoe.moe.intermediate_size, olmoe.moe.renormalize, olmoe.qk_norm) == (96, False, "full")
    granite = ModelConfig.from_dict({**BASE, "architectures": ["GraniteMoeForCausalLM"], "num_local_experts": 40,
                                     "num_experts_per_tok": 8, "residual_multiplier": 0.22})
    assert granite.moe is not None and (granite.moe.num_experts, granite.moe.renormalize, granite.residual_multiplier) == (40, True, 0.22)
    with pytest.raises(ValueError, match="num_experts_per_tok <= its experts, got 9 of 8"):
        ModelConfig.from_dict({**BASE, "architectures": ["MixtralForCausalLM"], "num_local_experts": 8, "num_experts_per_tok": 9})
    with pytest.raises(ValueError, match="clip_qkv=8.0 is not supported"):
        ModelConfig.from_dict({**BASE, "architectures": ["OlmoeForCausalLM"], "num_experts": 4, "num_experts_per_tok": 2,
                               "clip_qkv": 8.0})


@pytest.mark.unit
def test_gemma3_reads_a_rope_for_its_sliding_layers_in_either_layout():
    """transformers 5's ``rope_parameters`` per layer type, or the older ``rope_theta`` and
    ``rope_scaling`` (the full layers', 1M by default) beside ``rope_local_base_freq`` (10k)."""
    gemma3 = {**BASE, "architectures": ["Gemma3ForCausalLM"], "num_hidden_layers": 3, "sliding_window": 64,
              "sliding_window_pattern": 3}
    legacy = ModelConfig.from_dict({**gemma3, "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    assert (legacy.rope.theta, legacy.rope.rope_type, legacy.rope.factor) == (1_000_000.0, "linear", 8.0)
    assert (legacy.local_rope.theta, legacy.local_rope.rope_type) == (10_000.0, "default")
    assert legacy.local_rope_layers == (True, True, False) and legacy.sliding_windows == (64, 64, None)
    assert (legacy.qk_norm, legacy.layer_norms, legacy.gemma_norms, legacy.attn_logit_softcap) == ("head", "both", True, None)
    typed = ModelConfig.from_dict({**gemma3, "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 500.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}}, max_model_len=64)
    assert (typed.rope.theta, typed.local_rope.theta, typed.sliding_windows) == (500.0, 50.0, ())
    assert typed.local_rope_layers == (True, True, False)   # a window as long as the context keeps its RoPE
    with pytest.raises(ValueError, match="per-layer-type rope_parameters are not supported for LlamaForCausalLM"):
        ModelConfig.from_dict({**BASE, "rope_parameters": {"full_attention": {"rope_type": "default"}}})
    with pytest.raises(ValueError, match="use_bidirectional_attention is not supported"):
        ModelConfig.from_dict({**gemma3, "use_bidirectional_attention": True})


@pytest.mark.unit
def test_an_image_text_checkpoint_is_read_as_its_text_model():
    text = {k: v for k, v in BASE.items() if k != "architectures"}
    outer = {"architectures": ["Gemma3ForConditionalGeneration"], "dtype": "bfloat16", "eos_token_id": [1, 106],
             "text_config": {**text, "sliding_window": 64}}
    config = ModelConfig.from_dict(outer)
    assert (config.architecture, config.dtype, config.eos_token_ids, config.tie_word_embeddings) == \
        ("Gemma3ForCausalLM", "bfloat16", (1, 106), True)
    assert (config.weights_prefix, config.skipped_weights) == ("language_model.", ("vision_tower.", "multi_modal_projector."))
    assert (ModelConfig.from_dict(BASE).weights_prefix, ModelConfig.from_dict(BASE).skipped_weights) == ("", ())
    with pytest.raises(ValueError, match="Gemma3ForConditionalGeneration config.json has no text_config"):
        ModelConfig.from_dict({"architectures": ["Gemma3ForConditionalGeneration"]})


@pytest.mark.unit
def test_sliding_windows_are_read_per_layer_as_transformers_reads_them():
    """Every layer of a Mistral or Phi-3; ``layer_types`` where given; Qwen's from ``max_window_layers``
    on and only with ``use_sliding_window``; none where the window covers the longest sequence."""
    four = {**BASE, "num_hidden_layers": 4, "sliding_window": 256}
    assert ModelConfig.from_dict({**four, "architectures": ["MistralForCausalLM"]}).sliding_windows == (256,) * 4
    assert ModelConfig.from_dict({**four, "architectures": ["Phi3ForCausalLM"]}).sliding_windows == (256,) * 4
    assert ModelConfig.from_dict({**four, "architectures": ["Gemma2ForCausalLM"]}).sliding_windows == (256, None, 256, None)
    typed = {**four, "layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]}
    assert ModelConfig.from_dict(typed).sliding_windows == (None, 256, 256, None)
    qwen2 = {**four, "architectures": ["Qwen2ForCausalLM"], "max_window_layers": 3}
    assert ModelConfig.from_dict(qwen2).sliding_windows == ()
    assert ModelConfig.from_dict({**qwen2, "use_sliding_window": True}).sliding_windows == (None, None, None, 256)
    assert ModelConfig.from_dict({**four, "use_sliding_window": False}).sliding_windows == ()
    assert ModelConfig.from_dict(four, max_model_len=256).sliding_windows == ()
    assert ModelConfig.from_dict(four, max_model_len=257).sliding_windows == (256,) * 4
    gemma3 = {**four, "architectures": ["Gemma3ForCausalLM"], "num_hidden_layers": 7}
    assert ModelConfig.from_dict(gemma3).sliding_windows == (256,) * 5 + (None, 256)
    with pytest.raises(ValueError, match="sliding_window=0 must be a positive integer"):
        ModelConfig.from_dict({**four, "sliding_window": 0})
    with pytest.raises(ValueError, match="layer_types names 1 layers, the model has 4"):
        ModelConfig.from_dict({**four, "layer_types": ["sliding_attention"]})


@pytest.mark.unit
@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
])
def test_rope_cache_matches_transformers(rope_parameters):
    hf_config = LlamaConfig(**{k: v for k, v in BASE.items() if k != "architectures"}, head_dim=32,
                            rope_parameters=dict(rope_parameters))
    ours = ModelConfig.from_dict({**BASE, "head_dim": 32, "rope_parameters": dict(rope_parameters)})
    kind = rope_parameters["rope_type"]
    init = LlamaRotaryEmbedding.compute_default_rope_parameters if kind == "default" else ROPE_INIT_FUNCTIONS[kind]
    assert torch.equal(inverse_frequencies(ours.rope, 32), init(hf_config)[0])
    cache = build_cos_sin_cache(ours.rope, 32, 300)
    positions = torch.randint(0, 300, (1, 40))
    cos, sin = LlamaRotaryEmbedding(hf_config)(torch.zeros(1, dtype=torch.float32), positions)
    assert torch.equal(cache[positions[0], :16], cos[0, :, :16])
    assert torch.equal(cache[positions[0], 16:], sin[0, :, :16])


@pytest.mark.model
def test_missing_shard_is_named(tmp_path: Path):
    for path in DEMO.iterdir():
        if path.name != "model-00002-of-00003.safetensors":
            (tmp_path / path.name).symlink_to(path)
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
        ModelRunner(str(tmp_path), EngineConfig(num_blocks=4))


@pytest.mark.model
def test_sharded_and_single_file_load_identically(tmp_path: Path):
    config = load_model_config(DEMO)
    sharded = build_model(DEMO, config, torch.float32, torch.device("cpu"))
    single = build_model(single_file_copy(tmp_path, demo_tensors()), config, torch.float32, torch.device("cpu"))
    a, b = sharded.state_dict(), single.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The fused projections hold the checkpoint's slices in q, k, v / gate, up order.
    tensors = demo_tensors()
    qkv = a["model.layers.3.self_attn.qkv_proj.weight"]
    expected = torch.cat([tensors[f"model.layers.3.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(qkv, expected)
    gate_up = a["model.layers.5.mlp.gate_up_proj.weight"]
    assert torch.equal(gate_up, torch.cat([tensors["model.layers.5.mlp.gate_proj.weight"],
                                           tensors["model.layers.5.mlp.up_proj.weight"]]))


@pytest.mark.model
def test_missing_and_unexpected_tensors_are_named(tmp_path: Path):
    config = load_model_config(DEMO)
    tensors = demo_tensors()
    del tensors["model.layers.2.mlp.up_proj.weight"]
    (tmp_path / "missing").mkdir()
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.2\.mlp\.up_proj\.weight"):
        build_model(single_file_copy(tmp_path / "missing", tensors), config, torch.float32, torch.device("cpu"))
    tensors = demo_tensors()
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(3)
    (tmp_path / "extra").mkdir()
    with pytest.raises(ValueError, match=r"unexpected.*model\.layers\.0\.self_attn\.extra\.weight"):
        build_model(single_file_copy(tmp_path / "extra", tensors), config, torch.float32, torch.device("cpu"))


@pytest.mark.model
def test_dtype_override_and_cache_sizing():
    runner = ModelRunner(str(DEMO), EngineConfig(block_size=16, dtype="float16", kv_cache_memory_bytes=1 << 20))
    assert runner.dtype == torch.float16 and runner.vocab_size == 1024 and runner.max_model_len == 2048
    assert all(p.dtype == torch.float16 for p in runner.model.parameters())
    # 6 layers * K,V * 16 slots * 2 heads * 64 dims * 2 bytes = 49,152 bytes per block
    assert runner.block_bytes() == 49152 and runner.num_blocks == (1 << 20) // 49152
    assert runner.kv_caches[0].shape == (runner.num_blocks, 2, 16, 2, 64)
    with pytest.raises(ValueError, match="max_model_len"):
        ModelRunner(str(DEMO), EngineConfig(num_blocks=4, max_model_len=4096))


@pytest.mark.unit
def test_hub_id_without_network_gives_clear_error():
    with pytest.raises(OSError, match="baton-test-org/no-such-model"):
        resolve_model_dir("baton-test-org/no-such-model")
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        resolve_model_dir("/nonexistent/checkpoint/dir")


@pytest.mark.unit
def test_a_hub_model_is_fetched_at_its_revision_into_the_download_dir(monkeypatch, tmp_path):
    """vLLM's ``--revision`` and ``--download-dir``, as ``baton up``, a worker and ``EngineConfig``
    take them, reach the hub client; a local directory is used as it is."""
    import huggingface_hub

    from baton.services import launcher
    from baton.services.worker import engine_config, worker_arg_parser

    asked = []

    def snapshot_download(repo_id, revision=None, cache_dir=None, allow_patterns=None):
        asked.append((repo_id, revision, cache_dir))
        return str(DEMO)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert resolve_model_dir("org/poet", "v2", str(tmp_path)) == DEMO and asked == [("org/poet", "v2", str(tmp_path))]
    assert resolve_model_dir(str(DEMO), "v2") == DEMO.resolve() and len(asked) == 1
    args = worker_arg_parser("prefill", default_port=1).parse_args(
        ["--model", "org/poet", "--revision", "v3", "--download-dir", str(tmp_path)])
    config = engine_config(args, "prefill")
    assert (config.revision, config.download_dir) == ("v3", str(tmp_path))
    assert ModelRunner("org/poet", EngineConfig(num_blocks=4, revision="v3")).model_dir == DEMO
    assert asked[-1] == ("org/poet", "v3", None)
    monkeypatch.setattr(launcher, "make_plan", lambda args: (_ for _ in ()).throw(SystemExit(args.model)))
    with pytest.raises(SystemExit, match=str(DEMO)):
        launcher.main(["serve", "org/poet", "--revision", "v4", "--no-redis"])
    assert asked[-1] == ("org/poet", "v4", None)
