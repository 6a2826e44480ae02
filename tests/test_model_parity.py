"""The engine's model on the paged KV cache against Hugging Face transformers:
greedy decoding token for token on the demo checkpoint (batched, prefix-cached,
chunked, shuffled block tables) and full logits on small random checkpoints of every
supported family."""

from __future__ import annotations

import itertools
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM, AutoTokenizer, Gemma2Config, Gemma3TextConfig, GemmaConfig, GraniteConfig, LlamaConfig, MistralConfig,
    GraniteMoeConfig, MixtralConfig, Olmo2Config, OlmoeConfig, Phi3Config, PretrainedConfig, Qwen2Config, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig,
)

from baton.engine.attention import build_attention_metadata, paged_attention_forward
from baton.engine.config import EngineConfig
from baton.engine.loader import build_model
from baton.engine.lora_loader import load_adapter
from baton.engine.model_config import load_model_config
from baton.engine.model_runner import ModelRunner
from baton.engine.sampling_params import SamplingParams
from baton.engine.sequence import ScheduledChunk, Sequence
from baton.kernels.attention import ref_paged_attention
from lora_adapters import make_adapter, merge_adapter

pytestmark = pytest.mark.model

DEMO = str(Path(__file__).resolve().parents[2] / "shared" / "models" / "shakespeare-llama-5m")
PROMPTS = ["JULIET:\nO Romeo", "ROMEO:\nBut, soft! what light", "First Citizen:\nBefore we proceed any further", "KING"]
NEW_TOKENS = 12


class BlockPool:
    """Hands out block ids in a shuffled order, so block tables are not contiguous."""

    def __init__(self, num_blocks: int, seed: int) -> None:
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)

    def take(self, n: int) -> list[int]:
        taken, self.free = self.free[:n], self.free[n:]
        assert len(taken) == n, "test pool exhausted"
        return taken


def make_seq(seq_id: str, prompt: list[int], runner: ModelRunner, pool: BlockPool, max_new: int) -> Sequence:
    seq = Sequence(seq_id, list(prompt), SamplingParams(temperature=0, max_tokens=max_new))
    seq.block_table = pool.take(-(-(len(prompt) + max_new) // runner.block_size))
    return seq


def greedy(runner: ModelRunner, seqs: list[Sequence], max_new: int, chunk_size: int | None = None) -> None:
    """A tiny engine loop: prefill (in chunks of ``chunk_size``), then decode, all in shared steps."""
    while any(len(s.output_token_ids) < max_new for s in seqs):
        chunks = []
        for s in seqs:
            if len(s.output_token_ids) < max_new:
                remaining = s.num_tokens - s.num_computed_tokens
                chunks.append(ScheduledChunk(s, min(remaining, chunk_size or remaining)))
        samples = [c.samples for c in chunks]
        out = runner.execute(chunks)
        assert out.logits.shape == (sum(samples), runner.model_config.vocab_size)
        assert out.logits.dtype == runner.dtype
        rows = iter(out.logits.argmax(-1).tolist())
        for chunk, samples_now in zip(chunks, samples):
            chunk.seq.num_computed_tokens += chunk.num_new_tokens
            if samples_now:
                chunk.seq.output_token_ids.append(next(rows))


def random_chunks(kinds: str, rng: random.Random, pool: BlockPool, block_size: int) -> list[ScheduledChunk]:
    """One chunk per letter of ``kinds``: ``d`` one generated token (a decode), ``l`` a prompt's
    last token (the rest of it cached), ``p`` 2 to 11 prompt tokens, ``r`` 1 to 11; each after up
    to 29 computed tokens (a decode after at least one), with a spare block now and then."""
    chunks = []
    for i, kind in enumerate(kinds):
        computed = rng.randrange(1 if kind == "d" else 0, 30)
        new = 1 if kind in "dl" else rng.randrange(2 if kind == "p" else 1, 12)
        prompt = computed if kind == "d" else computed + new
        seq = Sequence(f"m{i}", [1] * prompt, SamplingParams())
        seq.output_token_ids = [1] * (computed + new - prompt)
        seq.num_computed_tokens = computed
        seq.block_table = pool.take(-(-(computed + new) // block_size) + rng.randrange(0, 2))
        chunks.append(ScheduledChunk(seq, new))
    return chunks


@pytest.mark.unit
@pytest.mark.parametrize("kinds,leading", [("dddpdppd", 3), ("ddldpd", 2), ("lll", 0), ("ldd", 0)])
def test_mixed_step_attention_splits_decodes_from_prompts(kinds: str, leading: int):
    """A step of leading decodes then prompt chunks and decodes (which, not leading, stay with
    the prompts) takes the decode kernel for the decodes and the prefill kernel for the rest: the
    same output as the reference over every chunk at once. A prompt's last token alone (``l``)
    is a prompt chunk, not a decode."""
    rng = random.Random(7)
    block_size, pool = 4, BlockPool(200, seed=7)
    chunks = random_chunks(kinds, rng, pool, block_size)
    meta = build_attention_metadata(chunks, block_size)
    assert meta.num_decode_chunks == leading and not meta.is_decode_only
    assert meta.rest_cu_query_lens.tolist() == [v - leading for v in meta.cu_query_lens.tolist()[leading:]]
    kv_cache = torch.randn(200, 2, block_size, 2, 16)
    q = torch.randn(meta.num_tokens, 4, 16)
    want = ref_paged_attention(q, kv_cache, meta.cu_query_lens, meta.seq_lens, meta.block_tables, 0.25)
    torch.testing.assert_close(paged_attention_forward(q, kv_cache, meta, 0.25), want)


@pytest.mark.unit
@pytest.mark.parametrize("decode_only", [False, True])
def test_attention_metadata_matches_per_token_walk(decode_only: bool):
    rng = random.Random(int(decode_only))
    block_size, pool = 4, BlockPool(200, seed=5)
    chunks = random_chunks("d" * 6 if decode_only else "r" * 6, rng, pool, block_size)
    meta = build_attention_metadata(chunks, block_size)
    positions = [p for c in chunks for p in range(c.start, c.start + c.num_new_tokens)]
    tables = [c.seq.block_table for c in chunks for _ in range(c.num_new_tokens)]
    assert meta.positions.tolist() == positions
    assert meta.slot_mapping.tolist() == [t[p // block_size] * block_size + p % block_size for p, t in zip(positions, tables)]
    assert meta.seq_lens.tolist() == [c.start + c.num_new_tokens for c in chunks]
    assert meta.cu_query_lens.tolist() == [0] + list(itertools.accumulate(c.num_new_tokens for c in chunks))
    assert meta.cu_query_lens.dtype == meta.seq_lens.dtype == meta.block_tables.dtype == torch.int32
    for row, chunk in zip(meta.block_tables.tolist(), chunks):
        assert row[: len(chunk.seq.block_table)] == chunk.seq.block_table
    assert meta.is_decode_only == decode_only and meta.max_seq_len == max(meta.seq_lens.tolist())
    leading = next((i for i, c in enumerate(chunks) if c.num_new_tokens != 1 or c.start < c.seq.num_prompt_tokens), len(chunks))
    assert meta.num_decode_chunks == leading
    if not decode_only:
        assert meta.rest_cu_query_lens.tolist() == [v - leading for v in meta.cu_query_lens.tolist()[leading:]]
    short = Sequence("short", [1] * 9, SamplingParams())
    short.block_table = [0, 1]
    with pytest.raises(ValueError, match="short: 2 blocks cannot hold 9 tokens"):
        build_attention_metadata([ScheduledChunk(short, 9)], block_size)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO)


@pytest.fixture(scope="module")
def hf_demo():
    return AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()


def assert_matches_hf(hf, prompt: list[int], ours: list[int]) -> None:
    """``ours`` equals transformers' greedy output (which stops after an EOS; ours runs on)."""
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=len(ours), do_sample=False)
    ref = out[0, len(prompt) :].tolist()
    assert ours[: len(ref)] == ref
    assert len(ref) == len(ours) or ref[-1] == hf.generation_config.eos_token_id


@pytest.mark.parametrize("block_size,chunk_size", [(16, None), (4, 5), (8, 3)])
def test_demo_batch_greedy_matches_transformers(tokenizer, hf_demo, block_size, chunk_size):
    runner = ModelRunner(DEMO, EngineConfig(block_size=block_size, num_blocks=256))
    pool = BlockPool(runner.num_blocks, seed=block_size)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    seqs = [make_seq(f"s{i}", p, runner, pool, NEW_TOKENS) for i, p in enumerate(prompts)]
    greedy(runner, seqs, NEW_TOKENS, chunk_size)
    for seq, prompt in zip(seqs, prompts):
        assert_matches_hf(hf_demo, prompt, seq.output_token_ids)
    assert tokenizer.decode(seqs[0].output_token_ids).startswith(", Romeo! wherefore art thou Romeo?")


def test_demo_shared_prefix_blocks(tokenizer, hf_demo):
    runner = ModelRunner(DEMO, EngineConfig(block_size=4, num_blocks=128))
    pool = BlockPool(runner.num_blocks, seed=7)
    first = tokenizer("ROMEO:\nBut, soft! what light through yonder window breaks?")["input_ids"]
    cached = (len(first) // runner.block_size) * runner.block_size
    second = first[:cached] + tokenizer("JULIET:\nO Romeo")["input_ids"][1:]
    a = make_seq("a", first, runner, pool, NEW_TOKENS)
    greedy(runner, [a], NEW_TOKENS)
    b = Sequence("b", second, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
    own = pool.take(-(-(len(second) + NEW_TOKENS - cached) // runner.block_size))
    b.block_table = a.block_table[: cached // runner.block_size] + own
    b.num_computed_tokens = b.num_cached_tokens = cached
    greedy(runner, [b], NEW_TOKENS)
    assert_matches_hf(hf_demo, first, a.output_token_ids)
    assert_matches_hf(hf_demo, second, b.output_token_ids)


def test_execute_leaves_sequences_alone_and_reports_layers_in_order(tokenizer):
    runner = ModelRunner(DEMO, EngineConfig(block_size=8, num_blocks=32))
    seq = make_seq("s", tokenizer("JULIET:\nO Romeo")["input_ids"], runner, BlockPool(32, seed=1), 4)
    first_slot = seq.block_table[0]
    seen: list[int] = []

    def on_layer_done(layer: int) -> None:
        seen.append(layer)
        # This layer's KV is already in the cache; the next layer's is not yet.
        assert runner.kv_caches[layer][first_slot].abs().sum() > 0
        if layer + 1 < len(runner.kv_caches):
            assert runner.kv_caches[layer + 1][first_slot].abs().sum() == 0

    before = (seq.num_computed_tokens, list(seq.output_token_ids), list(seq.block_table))
    runner.execute([ScheduledChunk(seq, seq.num_tokens)], on_layer_done)
    assert seen == list(range(runner.model_config.num_layers))
    assert (seq.num_computed_tokens, seq.output_token_ids, seq.block_table) == before


def test_bad_batches_are_refused():
    runner = ModelRunner(DEMO, EngineConfig(block_size=8, num_blocks=8, max_model_len=20))
    pool = BlockPool(8, seed=2)
    bad_token = make_seq("v", [1, 5, 4096], runner, pool, 1)
    with pytest.raises(ValueError, match="token ids must be in"):
        runner.execute([ScheduledChunk(bad_token, 3)])
    too_long = make_seq("l", [1] * 21, runner, pool, 1)
    with pytest.raises(ValueError, match="max_model_len=20"):
        runner.execute([ScheduledChunk(too_long, 21)])
    past_end = make_seq("e", [1, 2, 3], runner, pool, 1)
    with pytest.raises(ValueError, match="runs past its 3 tokens"):
        runner.execute([ScheduledChunk(past_end, 4)])


def test_demo_bfloat16_logits_close(tokenizer):
    prompt = tokenizer("JULIET:\nO Romeo, Romeo! wherefore art thou")["input_ids"]
    runner = ModelRunner(DEMO, EngineConfig(block_size=16, num_blocks=16, dtype="bfloat16"))
    assert runner.dtype == torch.bfloat16 and runner.kv_caches[0].dtype == torch.bfloat16
    ours = all_logits(runner, prompt, [])
    hf = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        ref = hf(torch.tensor([prompt])).logits[0].float()
    scale = ref.abs().max()
    assert (ours - ref).abs().max() < 0.05 * scale
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def all_logits(runner: ModelRunner, prompt: list[int], decode_tokens: list[int],
               lora: str | None = None) -> torch.Tensor:
    """Prefill ``prompt`` (asking for prompt logits), then feed ``decode_tokens`` one by one, under
    the LoRA adapter ``lora``. Returns the logits at every position:
    ``[len(prompt) + len(decode_tokens), vocab]``."""
    params = SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=0)
    seq = Sequence("p", list(prompt), params, lora=lora)
    seq.block_table = BlockPool(runner.num_blocks, seed=3).take(-(-(len(prompt) + len(decode_tokens)) // runner.block_size))
    out = runner.execute([ScheduledChunk(seq, len(prompt))])
    rows = [out.prompt_logits["p"]]
    torch.testing.assert_close(out.prompt_logits["p"][-1], out.logits[0], rtol=1e-5, atol=1e-5)
    seq.num_computed_tokens = len(prompt)
    for token in decode_tokens:
        seq.output_token_ids.append(token)
        out = runner.execute([ScheduledChunk(seq, 1)])
        assert out.prompt_logits == {}
        rows.append(out.logits.clone())   # a CUDA graph's output buffer: the next replay writes it again
        seq.num_computed_tokens += 1
    return torch.cat(rows)


SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
RANDOM_CONFIGS = {
    "mistral": lambda: MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=None),
    # A window of 8 keys over 19 prompt tokens and 4 decode steps in blocks of 4: the prompt's
    # queries and every decode see only part of their context.
    "mistral-window": lambda: MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=8),
    "qwen2": lambda: Qwen2Config(**SMALL, num_key_value_heads=2, use_sliding_window=False),
    "qwen3": lambda: Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=32),
    "llama3-rope": lambda: LlamaConfig(
        **SMALL,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        },
    ),
    "llama-linear-rope-bias": lambda: LlamaConfig(
        **SMALL, num_key_value_heads=4, attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    ),
    "llama-mqa-tied": lambda: LlamaConfig(**SMALL, num_key_value_heads=1, tie_word_embeddings=True),
    "phi3": lambda: Phi3Config(**SMALL, num_key_value_heads=2, pad_token_id=0, eos_token_id=2),
    "phi3-partial-rotary": lambda: Phi3Config(**SMALL, num_key_value_heads=2, pad_token_id=0, eos_token_id=2,
                                              partial_rotary_factor=0.5),
    "olmo2": lambda: Olmo2Config(**SMALL, num_key_value_heads=2, pad_token_id=0),
    "olmo2-bias-tied": lambda: Olmo2Config(**SMALL, num_key_value_heads=4, pad_token_id=0, attention_bias=True,
                                           tie_word_embeddings=True),
    "granite": lambda: GraniteConfig(**SMALL, num_key_value_heads=2, embedding_multiplier=12.0,
                                     residual_multiplier=0.22, attention_multiplier=0.0078125, logits_scaling=8.0,
                                     tie_word_embeddings=True),
    "gemma": lambda: GemmaConfig(**SMALL, num_key_value_heads=2, head_dim=32),
    # Caps small enough to bend this random model's scores and logits.
    "gemma2": lambda: Gemma2Config(**SMALL, num_key_value_heads=2, head_dim=32, sliding_window=8, query_pre_attn_scalar=24,
                                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    # A sliding layer (window 8, its own RoPE base) and a full one (linear RoPE scaling).
    "gemma3": lambda: Gemma3TextConfig(
        **SMALL, num_key_value_heads=2, head_dim=32, sliding_window=8, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
    "granite-bias-untied": lambda: GraniteConfig(**SMALL, num_key_value_heads=4, attention_bias=True, mlp_bias=True,
                                                 embedding_multiplier=3.0, residual_multiplier=0.5,
                                                 attention_multiplier=0.05, logits_scaling=2.0),
    "mixtral": lambda: MixtralConfig(**SMALL, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    # A shared expert, and a dense layer (mlp_only_layers) beside a sparse one.
    "qwen2-moe": lambda: Qwen2MoeConfig(**SMALL, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                        shared_expert_intermediate_size=48, mlp_only_layers=[1], use_sliding_window=False),
    "qwen3-moe": lambda: Qwen3MoeConfig(**SMALL, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=3,
                                        moe_intermediate_size=32, norm_topk_prob=True),
    "olmoe": lambda: OlmoeConfig(**SMALL, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, pad_token_id=0),
    # Granite's multipliers over stacked experts (the residual one folds into every expert's down projection).
    "granitemoe": lambda: GraniteMoeConfig(**{**SMALL, "intermediate_size": 32}, num_key_value_heads=2, num_local_experts=4,
                                           num_experts_per_tok=2, embedding_multiplier=6.0, residual_multiplier=0.3,
                                           attention_multiplier=0.05, logits_scaling=4.0),
}


def random_checkpoint(name: str, directory: Path, config: PretrainedConfig | None = None) -> AutoModelForCausalLM:
    """transformers' model of ``RANDOM_CONFIGS[name]`` (or of ``config``), its weights moved off their
    init values (norms, biases and q/k norms all matter), saved in ``directory``. Its attention is
    the eager one: transformers' SDPA path has no score cap (huggingface/transformers#32877), and
    releases that take it for Gemma 2 drop Gemma 2's cap (the likely reason why, on the GPU
    machine's transformers, Gemma 2's logits missed ours while Gemma 3's, uncapped, matched)."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config or RANDOM_CONFIGS[name](), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    hf.save_pretrained(directory)
    assert (directory / "model.safetensors").is_file() or (directory / "model.safetensors.index.json").is_file()
    return hf



def assert_matches_transformers(ours: torch.Tensor, hf: AutoModelForCausalLM, tokens: list[int]) -> None:
    """``ours`` (``all_logits`` of ``tokens``) are transformers' logits of them, to 1e-4 relative."""
    with torch.inference_mode():
        ref = hf(torch.tensor([tokens])).logits[0].float()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))

@pytest.mark.parametrize("name", list(RANDOM_CONFIGS))
def test_random_checkpoint_logits_match_transformers(name: str, tmp_path: Path):
    hf = random_checkpoint(name, tmp_path)
    config = hf.config
    tokens = torch.randint(0, config.vocab_size, (23,)).tolist()
    prompt, decode = tokens[:19], tokens[19:]
    runner = ModelRunner(str(tmp_path), EngineConfig(block_size=4, num_blocks=32))
    assert runner.model_config.tie_word_embeddings == bool(config.tie_word_embeddings)
    ours = all_logits(runner, prompt, decode)
    assert_matches_transformers(ours, hf, tokens)


def test_a_granite_adapter_equals_its_merged_checkpoint(tmp_path: Path):
    """Granite scales what the output and down projections add to the residual stream: an
    adapter's deltas there are scaled with them."""
    random_checkpoint("granite", tmp_path / "base")
    adapter = make_adapter(str(tmp_path / "base"), tmp_path / "adapter", rank=4, alpha=8, std=0.3)
    assert_adapter_equals_merged(tmp_path, adapter)


def assert_adapter_equals_merged(tmp_path: Path, adapter: Path) -> None:
    """The checkpoint in ``tmp_path / "base"`` under ``adapter`` gives the logits of the two merged."""
    merged = merge_adapter(str(tmp_path / "base"), adapter, tmp_path / "merged")
    tokens = torch.randint(0, 128, (23,)).tolist()
    config = EngineConfig(block_size=4, num_blocks=32, lora_modules={"a": str(adapter)})
    ours = all_logits(ModelRunner(str(tmp_path / "base"), config), tokens[:19], tokens[19:], lora="a")
    want = all_logits(ModelRunner(str(merged), EngineConfig(block_size=4, num_blocks=32)), tokens[:19], tokens[19:])
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_a_moe_adapter_on_attention_equals_its_merged_checkpoint_and_one_on_experts_is_refused(tmp_path: Path):
    """Qwen2-MoE: an adapter of every attention projection applies as merged weights do; one of a
    sparse layer's MLP (its experts) is refused by name rather than left out."""
    random_checkpoint("qwen2-moe", tmp_path / "base")
    adapter = make_adapter(str(tmp_path / "base"), tmp_path / "adapter", rank=4, alpha=8, std=0.3,
                           targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    assert_adapter_equals_merged(tmp_path, adapter)
    experts = make_adapter(str(tmp_path / "base"), tmp_path / "experts", rank=4, targets=("gate_proj",), layers=range(1))
    config = load_model_config(tmp_path / "base")
    with pytest.raises(ValueError, match="adapts layer 0's MLP, a mixture of experts: LoRA on experts is not supported"):
        load_adapter("experts", experts, config, max_rank=8)


def test_stacked_experts_load_as_each_experts_own_tensors_and_a_missing_one_is_named(tmp_path: Path):
    """A checkpoint holding each layer's experts stacked (as transformers 5 does in memory) loads as
    Mixtral's per-expert tensors do; a missing expert's projection is named."""
    random_checkpoint("mixtral", tmp_path / "experts")
    tensors = load_file(str(tmp_path / "experts" / "model.safetensors"))
    stacked = {k: v for k, v in tensors.items() if ".experts." not in k}
    for layer in range(2):
        prefix = f"model.layers.{layer}.block_sparse_moe"
        one = [{w: tensors.pop(f"{prefix}.experts.{e}.{w}.weight") for w in ("w1", "w2", "w3")} for e in range(4)]
        stacked[f"model.layers.{layer}.mlp.gate.weight"] = stacked.pop(f"{prefix}.gate.weight")
        stacked[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([w["w1"], w["w3"]]) for w in one])
        stacked[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack([w["w2"] for w in one])
    (tmp_path / "stacked").mkdir()
    shutil.copy(tmp_path / "experts" / "config.json", tmp_path / "stacked" / "config.json")
    save_file(stacked, str(tmp_path / "stacked" / "model.safetensors"))
    config = load_model_config(tmp_path / "experts")
    a, b = (build_model(tmp_path / d, config, torch.float32, torch.device("cpu")).state_dict() for d in ("experts", "stacked"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tensors = load_file(str(tmp_path / "experts" / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, str(tmp_path / "experts" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight"):
        build_model(tmp_path / "experts", config, torch.float32, torch.device("cpu"))


def test_a_gemma2_adapter_equals_its_merged_checkpoint(tmp_path: Path):
    """LoRA's unfused path through Gemma 2's GeGLU and its four norms a layer."""
    random_checkpoint("gemma2", tmp_path / "base")
    adapter = make_adapter(str(tmp_path / "base"), tmp_path / "adapter", rank=4, alpha=8, std=0.3)
    assert_adapter_equals_merged(tmp_path, adapter)


def gemma2_head_dim_256() -> PretrainedConfig:
    return Gemma2Config(**SMALL, num_key_value_heads=2, head_dim=256, sliding_window=8, attn_logit_softcapping=2.0,
                        final_logit_softcapping=3.0)


def test_a_gemma3_image_text_checkpoint_serves_its_text_model(tmp_path: Path):
    """Gemma 3's 4B, 12B and 27B ship as image-text checkpoints: Baton reads the text model's config
    and weights out of them and leaves the vision tower's and projector's; a text prompt gets the
    logits transformers gives the whole model. A LoRA adapter applies under any of the names PEFT
    gives the text model's layers."""
    from transformers import Gemma3Config

    text = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=32, vocab_size=300, sliding_window=8, query_pre_attn_scalar=24,
                layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    hf = random_checkpoint("gemma3-image-text", tmp_path, Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                                                        boi_token_index=290, eoi_token_index=291,
                                                                        image_token_index=292))
    tokens = torch.randint(0, 280, (23,)).tolist()
    runner = ModelRunner(str(tmp_path), EngineConfig(block_size=4, num_blocks=32))
    config = runner.model_config
    assert (config.architecture, config.weights_prefix, config.tie_word_embeddings) == ("Gemma3ForCausalLM", "language_model.", True)
    base = all_logits(runner, tokens[:19], tokens[19:])
    assert_matches_transformers(base, hf, tokens)
    # PEFT names its layers language_model.model.layers (transformers 4) or model.language_model.layers (5).
    adapter = make_adapter(str(tmp_path), tmp_path / "adapter", rank=4, alpha=8, std=0.3)
    with_adapter = []
    for layers in ("model.layers.", "language_model.model.layers.", "model.language_model.layers."):
        renamed = tmp_path / layers.replace(".", "-")
        shutil.copytree(adapter, renamed)
        tensors = load_file(adapter / "adapter_model.safetensors")
        save_file({k.replace("model.model.layers.", f"model.{layers}"): v for k, v in tensors.items()}, renamed / "adapter_model.safetensors")
        lora = ModelRunner(str(tmp_path), EngineConfig(block_size=4, num_blocks=32, lora_modules={"a": str(renamed)}))
        with_adapter.append(all_logits(lora, tokens[:19], tokens[19:], lora="a"))
    assert not torch.allclose(with_adapter[0], base, atol=1e-3)
    assert torch.equal(with_adapter[1], with_adapter[0]) and torch.equal(with_adapter[2], with_adapter[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["granite", "gemma2", "gemma2-head-dim-256", "gemma3", "mistral-window", "mixtral", "qwen2-moe"])
def test_logits_on_cuda_match_transformers(name: str, tmp_path: Path):
    """The GPU path's Triton kernels and CUDA graphs under each family's numerics: Granite's
    multipliers (attention scale, embedding and logits scales), Gemma 2's GeGLU, norms, soft caps and
    sliding windows (at its real head dim of 256 too), Gemma 3's two RoPE tables, Mistral's window,
    Mixtral's and Qwen2-MoE's experts (the fused MoE kernel, its routing captured in the graph)."""
    config = gemma2_head_dim_256() if name == "gemma2-head-dim-256" else None
    hf = random_checkpoint(name, tmp_path, config)
    tokens = torch.randint(0, hf.config.vocab_size, (23,)).tolist()
    runner = ModelRunner(str(tmp_path), EngineConfig(device="cuda", dtype="float32", block_size=4, num_blocks=32,
                                                     cuda_graph_batch_sizes=[1]))
    assert runner.cuda_graphs is not None
    ours = all_logits(runner, tokens[:19], tokens[19:]).cpu()
    assert_matches_transformers(ours, hf, tokens)


def test_a_phi3_adapter_on_its_fused_projections_equals_its_merged_checkpoint(tmp_path: Path):
    """PEFT adapts Phi-3 on its fused ``qkv_proj`` and ``gate_up_proj``: one A each, B's rows split
    among the projections they stack. An adapter that also adapts one of those alone is refused."""
    random_checkpoint("phi3", tmp_path / "base")
    fused = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    adapter = make_adapter(str(tmp_path / "base"), tmp_path / "adapter", rank=4, alpha=8, std=0.3, targets=fused)
    assert_adapter_equals_merged(tmp_path, adapter)
    both = make_adapter(str(tmp_path / "base"), tmp_path / "both", targets=("qkv_proj", "k_proj"))
    with pytest.raises(ValueError, match="layer 0 adapts k_proj both alone and within a fused projection"):
        load_adapter("both", both, ModelRunner(str(tmp_path / "base"), EngineConfig(num_blocks=8)).model_config, 16)


@pytest.mark.parametrize("max_model_len, length", [(32, 23), (128, 44)], ids=["short-factors", "long-factors"])
def test_phi3_longrope_logits_match_transformers(max_model_len: int, length: int, tmp_path: Path):
    """LongRoPE divides each frequency by a factor of its own and scales the rotation. transformers
    takes the long factors for a forward whose sequence passes ``original_max_position_embeddings``
    (32 here), Baton for every sequence once it serves past it: at a max model length of 32 both
    take the short factors, at 128 and 44 tokens both the long ones."""
    config = Phi3Config(
        **SMALL, num_key_value_heads=2, pad_token_id=0, eos_token_id=2, max_position_embeddings=128,
        original_max_position_embeddings=32, partial_rotary_factor=0.5,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "short_factor": [1.0 + 0.1 * i for i in range(4)],
                         "long_factor": [2.0 + 0.7 * i for i in range(4)]})
    hf = random_checkpoint("phi3-longrope", tmp_path, config)
    tokens = torch.randint(0, hf.config.vocab_size, (length,)).tolist()
    runner = ModelRunner(str(tmp_path), EngineConfig(block_size=4, num_blocks=32, max_model_len=max_model_len))
    assert runner.model_config.rotary_dim == 8 and runner.model_config.rope.rope_type == "longrope"
    ours = all_logits(runner, tokens[:-4], tokens[-4:])
    assert_matches_transformers(ours, hf, tokens)
