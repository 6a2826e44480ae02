"""The engine on a CUDA GPU: greedy output of ``LLM`` (CUDA graphs on) against the
CPU engine (fp32) and transformers (bf16), and CUDA-graph decode against eager
decode on ragged batches that need padding. The batch-size and step-kind rules of
the graph runner are checked on the CPU.

bf16 note: the engine's Triton kernels and transformers' bf16 kernels round
differently, so a greedy tie-break may flip where transformers' top-two logits are
within bf16 rounding of each other; the bf16 test compares tokens up to the first
divergence and requires that any divergence sits on such a narrow margin.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DEMO_MODEL
from transformers import AutoModelForCausalLM, AutoTokenizer

from baton.engine.config import EngineConfig, SpeculativeConfig
from baton.engine.cuda_graph import capture_sizes, is_graph_step
from baton.engine.llm import LLM
from baton.engine.model_runner import ModelRunner
from baton.engine.sampling_params import SamplingParams
from baton.engine.sequence import ScheduledChunk, Sequence
from baton.kernels import pdl
from lora_adapters import make_adapter
from test_model_parity import all_logits
from test_quantization import fp8_blocks, write_fp8_checkpoint

DEMO = str(DEMO_MODEL)
PROMPTS = [
    "JULIET:\nO Romeo",
    "ROMEO:\nBut, soft! what light",
    "First Citizen:\nBefore we proceed any further",
    "KING",
    "HAMLET:\nTo be, or not",
]
NEW_TOKENS = 24
BF16_MARGIN = 0.02   # relative to the top logit: a greedy pick this close to transformers' runner-up may flip

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.mark.unit
def test_capture_sizes_cover_max_num_seqs():
    assert capture_sizes([1, 2, 4, 8, 16, 32], 5) == [1, 2, 4, 8]
    assert capture_sizes([8, 1, 4, 4], 4) == [1, 4]
    assert capture_sizes([1, 2], 64) == [1, 2]
    with pytest.raises(ValueError, match="cuda_graph_batch_sizes"):
        EngineConfig(cuda_graph_batch_sizes=[0, 4])


@pytest.mark.unit
def test_graph_steps_are_sampled_single_tokens():
    seq = Sequence("a", [5, 6, 7], SamplingParams())
    seq.num_computed_tokens = 2
    assert is_graph_step([ScheduledChunk(seq, 1)])             # the last prompt token
    mid = Sequence("b", [5, 6, 7], SamplingParams())
    mid.num_computed_tokens = 1
    assert not is_graph_step([ScheduledChunk(seq, 1), ScheduledChunk(mid, 1)])  # does not sample
    assert not is_graph_step([ScheduledChunk(mid, 2)])
    wants = Sequence("c", [5, 6, 7], SamplingParams(prompt_logprobs=1))
    wants.num_computed_tokens = 2
    assert not is_graph_step([ScheduledChunk(wants, 1)])
    wants.output_token_ids.append(9)
    wants.num_computed_tokens = 3
    assert is_graph_step([ScheduledChunk(wants, 1)])            # decoding: prompt logits long done
    assert is_graph_step([ScheduledChunk(wants, 3, [5, 6])])    # its token, then a speculative draft


def _token_ids(llm: LLM) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in llm.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def cpu_tokens() -> list[list[int]]:
    return _token_ids(LLM(DEMO, num_blocks=256))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("enforce_eager, async_scheduling", [(False, None), (True, None), (False, False)])
def test_fp32_greedy_matches_cpu_engine(cpu_tokens, enforce_eager, async_scheduling):
    llm = LLM(DEMO, device="cuda", dtype="float32", num_blocks=256, max_num_seqs=8, enforce_eager=enforce_eager,
              async_scheduling=async_scheduling)
    assert (llm.runner.cuda_graphs is None) == enforce_eager
    assert llm.core.async_scheduling == (async_scheduling is None)   # on by default on CUDA
    ours = _token_ids(llm)
    assert ours == cpu_tokens
    assert llm.tokenizer.decode(ours[0]).startswith(", Romeo! wherefore art thou Romeo?")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_fp8_kv_cache_greedy_matches_the_cpu_engines(enforce_eager):
    """``kv_cache_dtype="fp8"``: the kernels round keys and values to E4M3 as torch does on the CPU and
    read them back widened, in CUDA graphs and eagerly."""
    want = _token_ids(LLM(DEMO, num_blocks=256, kv_cache_dtype="fp8"))
    llm = LLM(DEMO, device="cuda", dtype="float32", num_blocks=256, max_num_seqs=8, kv_cache_dtype="fp8",
              enforce_eager=enforce_eager)
    assert llm.runner.kv_caches[0].dtype == torch.float8_e4m3fn and (llm.runner.cuda_graphs is None) == enforce_eager
    assert _token_ids(llm) == want


# How much farther an FP8 model's decode logits on the GPU may sit from the unquantized model's than
# the CPU FP8 engine's do (``_fp8_decode_ratio``).
FP8_RATIO = 1.15


def _fp8_decode_ratio(model: str, unquantized: str, quantization: str | None, enforce_eager: bool) -> float:
    """Decode logits of an FP8 model on the GPU (float32, one row a step: the rows' quantization and
    the FP8 GEMVs; the prompt through the FP8 GEMMs), against the unquantized model's on the CPU on the
    same teacher-forced tokens, over the CPU FP8 engine's (the torch reference) distance from them.
    The GPU's logits cannot be held to the CPU FP8 engine's own: any difference in a sum's order moves
    a layer input across an E4M3 rounding midpoint somewhere, and on the demo checkpoint that moves the
    decode logits as far as quantizing does. Simulated on the CPU (every FP8 product's output times
    1 + e * noise): e = 1e-6 moves them 0.6 times as far from the CPU FP8 engine's as quantizing
    moves them from the unquantized model's, 1e-3 0.87 times (the H200 measured 0.81 and 0.82 with
    the GEMMs' tensor-core sums), yet their distance from the unquantized model's stays within 1.04 of
    the CPU FP8 engine's; outputs 5% off (a wrong scale) take it to 1.34, and a wrong row or block
    further."""
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    prompt, decode = tokenizer(PROMPTS[2]).input_ids, tokenizer(PROMPTS[4]).input_ids[:16]
    engine = dict(num_blocks=64, block_size=8)
    cpu = all_logits(ModelRunner(model, EngineConfig(**engine, quantization=quantization)), prompt, decode)
    ref = all_logits(ModelRunner(unquantized, EngineConfig(**engine)), prompt, decode)
    runner = ModelRunner(model, EngineConfig(**engine, device="cuda", dtype="float32", quantization=quantization,
                                             enforce_eager=enforce_eager))
    assert runner.model.model.layers[0].mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    assert (runner.cuda_graphs is None) == enforce_eager
    gpu = all_logits(runner, prompt, decode).cpu()
    steps = slice(len(prompt), None)
    quantizing = (cpu[steps] - ref[steps]).norm()
    ratio = float((gpu[steps] - ref[steps]).norm() / quantizing)
    print(f"FP8 decode logits: |GPU - unquantized| = {ratio:.4f} x |CPU - unquantized|; "
          f"|GPU - CPU| = {float((gpu[steps] - cpu[steps]).norm() / quantizing):.4f} x")
    return ratio


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_fp8_weights_decode_like_the_cpu_engine(enforce_eager):
    """``quantization="fp8"`` (per output channel): decode's rows quantized by the RMSNorm before
    them (``rms_norm_fp8``, for q/k/v and gate/up) or by ``quantize_rows`` (o, down with the
    activation), and multiplied by the FP8 GEMVs (the fused q/k/v one, the gated one), in CUDA
    graphs and eagerly."""
    assert _fp8_decode_ratio(DEMO, DEMO, "fp8", enforce_eager) < FP8_RATIO


@pytest.mark.gpu
@needs_gpu
def test_block_fp8_checkpoint_decodes_like_the_cpu_engine(tmp_path):
    """A block-wise FP8 checkpoint (128 x 128 blocks, DeepSeek-V3's and Qwen3-FP8's): decode's rows
    quantized per group by the RMSNorm before them (q/k/v, gate/up) or by ``quantize_groups`` (o,
    down with the activation), and multiplied by the block-scaled GEMVs."""
    AutoModelForCausalLM.from_pretrained(DEMO).save_pretrained(tmp_path / "float")   # the demo's shards as one file
    checkpoint = tmp_path / "fp8-blocks"
    write_fp8_checkpoint(tmp_path / "float", checkpoint, fp8_blocks([128, 128]), per_channel=False)
    for f in Path(DEMO).iterdir():   # the tokenizer's files
        if "safetensors" not in f.name and not (checkpoint / f.name).exists():
            shutil.copy(f, checkpoint)
    assert _fp8_decode_ratio(str(checkpoint), DEMO, None, enforce_eager=False) < FP8_RATIO


@pytest.mark.gpu
@needs_gpu
def test_bf16_greedy_matches_transformers():
    llm = LLM(DEMO, device="cuda", dtype="bfloat16", num_blocks=256, max_num_seqs=8)
    assert llm.runner.cuda_graphs is not None
    hf = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.bfloat16).to("cuda").eval()
    matched = compared = 0
    for prompt, ours in zip(PROMPTS, _token_ids(llm)):
        ids = llm.tokenizer(prompt, return_tensors="pt").input_ids.to("cuda")
        with torch.inference_mode():   # stops after EOS; ours runs on (ignore_eos), so compare up to there
            out = hf.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS, output_logits=True,
                              return_dict_in_generate=True)
        ref = out.sequences[0, ids.shape[1]:].tolist()
        same = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), len(ref))
        matched, compared = matched + same, compared + len(ref)
        if same < len(ref):
            top2 = out.logits[same][0].float().topk(2).values
            margin = float(top2[0] - top2[1])
            assert margin <= BF16_MARGIN * max(1.0, abs(float(top2[0]))), (
                f"{prompt!r}: token {same} differs where transformers' top-2 margin is {margin:.3f} (top {float(top2[0]):.2f})"
            )
    assert matched >= compared // 2, f"only {matched} of {compared} tokens agree"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("gate", [None, 3], ids=["always", "disable-by-batch-3"])
def test_speculation_on_cuda_writes_what_one_token_a_step_writes_on_the_cpu(gate):
    """Drafted steps replay graphs of 1 + k rows beside graph-replayed plain decode steps;
    greedy fp32 output equals the CPU engine's without speculation, and drafts are accepted.
    With disable_by_batch_size 3, the four sequences decode asynchronously without drafts
    until two have finished; the other two then draft."""
    line = "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name.\n\n"
    prompts = [line * 3, line * 2 + "JULIET:\nO Romeo,", *PROMPTS[1:3]]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (64, 64, 12, 20)]
    want = [o.outputs[0].token_ids for o in LLM(DEMO, num_blocks=256).generate(prompts, params)]
    llm = LLM(DEMO, device="cuda", dtype="float32", num_blocks=256, max_num_seqs=8,
              speculative=SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_max=3, disable_by_batch_size=gate))
    graphs = llm.runner.cuda_graphs
    assert graphs is not None and llm.core.async_scheduling == (gate is not None) and (4, 5, False) in graphs.graphs
    replayed = []
    replay = graphs.replay
    graphs.replay = lambda chunks, shape, fed=None: replayed.append(shape) or replay(chunks, shape, fed)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want
    assert llm.core.spec_stats.accepted_tokens > 0 and llm.core.stats().used_blocks == 0
    assert (2, 5, False) in replayed and (4, 1, False) in replayed      # steps with drafts and without, from graphs
    assert ((4, 5, False) in replayed) == (gate is None)


@pytest.mark.gpu
@needs_gpu
def test_embeddings_on_cuda_match_the_cpu_engine():
    def embeddings(llm: LLM) -> torch.Tensor:
        return torch.tensor([out.outputs.embedding for out in llm.embed(PROMPTS)])

    want = embeddings(LLM(DEMO, num_blocks=256))
    got = embeddings(LLM(DEMO, device="cuda", dtype="float32", num_blocks=256, max_num_seqs=8))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    bf16 = embeddings(LLM(DEMO, device="cuda", dtype="bfloat16", num_blocks=256, max_num_seqs=8))
    assert torch.nn.functional.cosine_similarity(bf16, want).min() > 0.99


def _ragged_batch(runner: ModelRunner, rng: random.Random, batch: int, tag: str,
                  loras: list[str | None] | None = None) -> list[Sequence]:
    """``batch`` sequences of random prompts (1..60 tokens) on shuffled blocks, prefilled eagerly;
    sequence ``i`` under LoRA adapter ``loras[i]`` where given."""
    blocks = list(range(runner.num_blocks))
    rng.shuffle(blocks)
    seqs = []
    for i in range(batch):
        prompt = [rng.randrange(runner.vocab_size) for _ in range(rng.randrange(1, 61))]
        seq = Sequence(f"{tag}{i}", prompt, SamplingParams(temperature=0, max_tokens=8), lora=loras[i] if loras else None)
        need = -(-(len(prompt) + 8) // runner.block_size)
        seq.block_table, blocks = blocks[:need], blocks[need:]
        seqs.append(seq)
    _advance(runner.execute([ScheduledChunk(s, s.num_prompt_tokens) for s in seqs]).logits, seqs)
    return seqs


def _advance(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    for seq, token in zip(seqs, logits.argmax(-1).tolist()):
        seq.num_computed_tokens = seq.num_tokens
        seq.output_token_ids.append(token)


def _graph_decode_equals_eager(runner: ModelRunner, seqs: list[Sequence], steps: int = 3) -> None:
    """``steps`` decode steps of ``seqs``, each replayed from the smallest graph that holds them (with
    adapters where a sequence has one) and then run eagerly over the same cache: equal logits,
    equal K/V, written to each sequence's own slot only."""
    graphs, bs = runner.cuda_graphs, runner.block_size
    for _ in range(steps):
        chunks = [ScheduledChunk(s, 1) for s in seqs]
        adapted = any(s.lora is not None for s in seqs)
        assert graphs.graph_shape(chunks) == (next(b for b in (1, 2, 4, 8) if b >= len(seqs)), 1, adapted)
        before = [c.clone() for c in runner.kv_caches]
        graph_logits = runner.execute(chunks).logits.clone()
        after_graph = [c.clone() for c in runner.kv_caches]
        assert _written_slots(before, after_graph) == {c.seq.block_table[c.start // bs] * bs + c.start % bs for c in chunks}
        eager_logits = runner.execute(chunks, on_layer_done=lambda layer: None).logits
        assert graph_logits.shape == (len(seqs), runner.vocab_size)
        torch.testing.assert_close(graph_logits, eager_logits, rtol=1e-4, atol=1e-4)
        for graph_cache, eager_cache in zip(after_graph, runner.kv_caches):
            torch.testing.assert_close(graph_cache, eager_cache, rtol=1e-5, atol=1e-5)
        _advance(graph_logits, seqs)


@pytest.mark.gpu
@needs_gpu
def test_graph_decode_logits_match_eager():
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    runner = ModelRunner(DEMO, EngineConfig(device="cuda", dtype="float32", num_blocks=96, block_size=8,
                                            max_num_seqs=8, cuda_graph_batch_sizes=[1, 2, 4, 8]))
    graphs = runner.cuda_graphs
    assert graphs is not None and sorted(graphs.graphs) == [(1, 1, False), (2, 1, False), (4, 1, False), (8, 1, False)]
    for batch in (1, 3, 5, 7):
        _graph_decode_equals_eager(runner, _ragged_batch(runner, rng, batch, f"b{batch}-"))


@pytest.mark.gpu
@needs_gpu
def test_lora_graph_decode_logits_match_eager(tmp_path):
    """Decode steps with LoRA sequences (two adapters, among base sequences) replay graphs captured
    with the adapters, equal to eager steps; after an unload moves the other adapter's rows and a
    load adds one, the graphs captured again are too. A step under an adapter the graphs lack is
    refused."""
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    one = make_adapter(DEMO, tmp_path / "one", std=0.05)
    two = make_adapter(DEMO, tmp_path / "two", rank=4, targets=("q_proj", "v_proj", "down_proj"), seed=1, std=0.08)
    runner = ModelRunner(DEMO, EngineConfig(device="cuda", dtype="float32", num_blocks=96, block_size=8, max_num_seqs=8,
                                            cuda_graph_batch_sizes=[1, 2, 4, 8], max_loras=2,
                                            lora_modules={"one": str(one), "two": str(two)}))
    graphs = runner.cuda_graphs
    assert graphs is not None and sorted(graphs.graphs) == sorted((b, 1, a) for b in (1, 2, 4, 8) for a in (False, True))
    for i, loras in enumerate((["one", None, "two", "two", None, "one", None], ["two"], [None, "one", "two"], [None, None])):
        _graph_decode_equals_eager(runner, _ragged_batch(runner, rng, len(loras), f"l{i}-", loras))
    runner.remove_lora("one")
    assert graphs.lora is not None and graphs.lora.index == {"two": 0}
    stale = _ragged_batch(runner, rng, 1, "stale", ["two"])
    stale[0].lora = "one"
    with pytest.raises(ValueError, match="'one', which this CUDA graph lacks"):
        graphs.replay([ScheduledChunk(stale[0], 1)], (1, 1, True))
    runner.add_lora(runner.read_lora("three", str(one)))
    for i, loras in enumerate((["two", None, "two"], ["three", "two", None, "three", "three"])):
        _graph_decode_equals_eager(runner, _ragged_batch(runner, rng, len(loras), f"r{i}-", loras))
    runner.remove_lora("two")
    runner.remove_lora("three")
    assert graphs.lora is None and sorted(graphs.graphs) == [(1, 1, False), (2, 1, False), (4, 1, False), (8, 1, False)]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_graph_drafted_logits_match_eager(lora, tmp_path):
    """Steps whose chunks carry drafts of 0 to k tokens replay the graph of k + 1 rows a
    sequence (with ``lora``, the one captured with an adapter, which the first sequence and
    some others run under): each real row's logits and the K/V written equal the eager
    step's, and padding rows write nothing."""
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    k = 3
    adapters = {"one": str(make_adapter(DEMO, tmp_path / "one", std=0.05))} if lora else {}
    runner = ModelRunner(DEMO, EngineConfig(device="cuda", dtype="float32", num_blocks=96, block_size=8, max_num_seqs=8,
                                            cuda_graph_batch_sizes=[1, 2, 4, 8], speculative=SpeculativeConfig(k),
                                            lora_modules=adapters))
    graphs = runner.cuda_graphs
    assert graphs is not None and sorted(s for s in graphs.graphs if s[1] > 1) == sorted(
        (b, 4, a) for b in (1, 2, 4, 8) for a in {False, lora})
    for batch in (1, 3, 6):
        loras = ["one" if lora and (i == 0 or rng.random() < 0.5) else None for i in range(batch)]
        seqs = _ragged_batch(runner, rng, batch, f"d{batch}-", loras)
        for _ in range(3):
            drafts = [[rng.randrange(runner.vocab_size) for _ in range(rng.randrange(k + 1))] for _ in seqs]
            drafts[0] = drafts[0] or [7]
            chunks = [ScheduledChunk(s, 1 + len(d), d) for s, d in zip(seqs, drafts)]
            assert graphs.graph_shape(chunks) == (next(b for b in (1, 2, 4, 8) if b >= batch), k + 1, lora)
            before = [c.clone() for c in runner.kv_caches]
            graph_logits = runner.execute(chunks).logits.clone()
            after_graph = [c.clone() for c in runner.kv_caches]
            bs = runner.block_size
            assert _written_slots(before, after_graph) == {
                c.seq.block_table[p // bs] * bs + p % bs for c in chunks for p in range(c.start, c.start + c.num_new_tokens)}
            eager_logits = runner.execute(chunks, on_layer_done=lambda layer: None).logits
            assert graph_logits.shape == (sum(c.num_new_tokens for c in chunks), runner.vocab_size)
            torch.testing.assert_close(graph_logits, eager_logits, rtol=1e-4, atol=1e-4)
            for graph_cache, eager_cache in zip(after_graph, runner.kv_caches):
                torch.testing.assert_close(graph_cache, eager_cache, rtol=1e-5, atol=1e-5)
            _advance(graph_logits[[sum(c.num_new_tokens for c in chunks[:i]) for i in range(len(chunks))]], seqs)


@pytest.mark.gpu
@needs_gpu
def test_pdl_launches_compute_what_plain_launches_compute(monkeypatch):
    """Decode steps of bf16 ragged batches, eager and from CUDA graphs, with programmatic
    dependent launch and without: the same kernels on the same inputs, so the logits and
    the KV written must be equal bit for bit (a kernel that reads before its wait would not be)."""
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(pdl, "enabled", enabled)
        runner = ModelRunner(DEMO, EngineConfig(device="cuda", dtype="bfloat16", num_blocks=96, block_size=8,
                                                max_num_seqs=8, cuda_graph_batch_sizes=[8]))
        seqs = _ragged_batch(runner, random.Random(11), 7, "p")
        logits = []
        for step in range(4):
            chunks = [ScheduledChunk(s, 1) for s in seqs]
            eager = step % 2 == 1
            out = runner.execute(chunks, on_layer_done=(lambda layer: None) if eager else None).logits.clone()
            logits.append(out)
            _advance(out, seqs)
        results.append((logits, [c.clone() for c in runner.kv_caches]))
    (with_pdl, cache_pdl), (plain, cache_plain) = results
    assert all(torch.equal(a, b) for a, b in zip(with_pdl, plain))
    assert all(torch.equal(a, b) for a, b in zip(cache_pdl, cache_plain))


def _written_slots(before: list[torch.Tensor], after: list[torch.Tensor]) -> set[int]:
    """Cache slots (``block * block_size + offset``) whose K or V differ in any layer."""
    slots: set[int] = set()
    for old, new in zip(before, after):
        changed = (old != new).any(dim=4).any(dim=3).any(dim=1)   # [num_blocks, block_size]
        block_size = changed.shape[1]
        slots.update(int(b) * block_size + int(o) for b, o in changed.nonzero().tolist())
    return slots


@pytest.mark.gpu
@needs_gpu
def test_batches_past_the_largest_graph_run_eagerly():
    runner = ModelRunner(DEMO, EngineConfig(device="cuda", dtype="float32", num_blocks=96, block_size=8,
                                            max_num_seqs=2, cuda_graph_batch_sizes=[1, 2, 4]))
    assert runner.cuda_graphs is not None and sorted(runner.cuda_graphs.graphs) == [(1, 1, False), (2, 1, False)]
    seqs = _ragged_batch(runner, random.Random(3), 3, "x")
    chunks = [ScheduledChunk(s, 1) for s in seqs]
    assert runner.cuda_graphs.graph_shape(chunks) is None
    cpu = ModelRunner(DEMO, EngineConfig(num_blocks=96, block_size=8))
    for gpu_cache, cpu_cache in zip(runner.kv_caches, cpu.kv_caches):
        cpu_cache.copy_(gpu_cache.cpu())
    torch.testing.assert_close(runner.execute(chunks).logits.cpu(), cpu.execute(chunks).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@needs_gpu
def test_gpu_memory_utilization_fills_its_share_of_the_device_with_kv_blocks():
    """The KV pool fills ``gpu_memory_utilization`` of the device beside the weights and the
    activations of the largest step (measured by running it), and the engine still writes what
    the CPU engine writes."""
    torch.cuda.empty_cache()
    llm = LLM(DEMO, device="cuda", dtype="float32", gpu_memory_utilization=0.05, max_num_batched_tokens=512)
    runner = llm.runner
    _, total = torch.cuda.mem_get_info()
    kv = runner.num_blocks * runner.block_bytes()
    weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    assert 0.05 * total - kv <= 512 * 2**20 and kv + weights <= 0.05 * total      # the activations of 512 tokens fit in 512 MiB
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(DEMO, num_blocks=64).generate(PROMPTS, params)]
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)] == want

