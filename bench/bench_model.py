"""Model-level GPU benchmarks on Llama-3.2-1B- and Llama-3-8B-shaped models (and, asked for,
a Gemma-2-2B-shaped one and mixture-of-experts ones: Qwen3-30B-A3B's and Mixtral-8x7B's layers,
fewer of them) with random bf16 weights (written as a safetensors checkpoint, no hub), in one run:

(a) decode step latency at several batch sizes, next to the floor
    ``(weight bytes + KV bytes read) / copy bandwidth``, where the bandwidth is a
    large device-to-device copy measured in the same run (bytes read + written) and an MoE
    layer's expert bytes count the experts a batch is expected to hit (``weight_bytes``);
(b) offline generation throughput (output tokens/s) of Baton's ``LLM`` against
    transformers' ``generate`` on the same model, prompts and lengths (greedy, EOS ignored).

    python bench/bench_model.py                                  # both Llama shapes
    python bench/bench_model.py --shapes gemma-2-2b              # GeGLU, head dim 256, soft caps
    python bench/bench_model.py --shapes qwen3-moe-12l mixtral-8l   # experts
    python bench/bench_model.py --shapes llama-3.2-1b --skip-hf
    python bench/bench_model.py --shapes llama-3-8b --skip-hf --fp8-blocks   # a block-wise FP8 checkpoint

Decode latency is given three ways: the graph replay alone (device time), one
``ModelRunner.execute`` with metadata upload and a sync (CUDA graphs, and eager),
and one engine step (scheduler, runner, sampler) from ``LLM.generate``, with async
scheduling (the default on CUDA) and without it. The table
is printed and, when ``OUT`` is set, written to ``$OUT/model_bench.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM, Gemma2Config, LlamaConfig, MixtralConfig, PretrainedConfig, PreTrainedTokenizerFast, Qwen3MoeConfig,
)

from baton.engine.config import KV_CACHE_DTYPE_NAMES
from baton.engine.llm import LLM
from baton.engine.model_runner import ModelRunner
from baton.engine.quantization import QUANTIZATION_METHODS
from baton.engine.sampling_params import SamplingParams
from baton.engine.sequence import ScheduledChunk, Sequence
from baton.kernels import pdl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_offline import bench_baton, bench_hf, make_prompts

SHAPES: dict[str, tuple[type[PretrainedConfig], dict[str, object]]] = {
    "llama-3.2-1b": (LlamaConfig, {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                                   "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                                   "tie_word_embeddings": True, "rope_theta": 500000.0, "rms_norm_eps": 1e-5}),
    "llama-3-8b": (LlamaConfig, {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                                 "tie_word_embeddings": False, "rope_theta": 500000.0, "rms_norm_eps": 1e-5}),
    # Its 4096-key windows are longer than MAX_MODEL_LEN here, so they drop out (as in the engine).
    "gemma-2-2b": (Gemma2Config, {"hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                                  "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                                  "query_pre_attn_scalar": 256, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
                                  "final_logit_softcapping": 30.0, "tie_word_embeddings": True}),
    # Qwen3-30B-A3B's layers (128 experts, 8 a token), 12 of its 48; Mixtral-8x7B's (8 experts, 2 a
    # token), 8 of its 32: a quarter of each model, so that transformers' copy fits beside Baton's.
    "qwen3-moe-12l": (Qwen3MoeConfig, {"hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                                       "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
                                       "num_hidden_layers": 12, "num_attention_heads": 32, "num_key_value_heads": 4,
                                       "head_dim": 128, "rope_theta": 1_000_000.0, "tie_word_embeddings": False}),
    "mixtral-8l": (MixtralConfig, {"hidden_size": 4096, "intermediate_size": 14336, "num_local_experts": 8,
                                   "num_experts_per_tok": 2, "num_hidden_layers": 8, "num_attention_heads": 32,
                                   "num_key_value_heads": 8, "rope_theta": 1_000_000.0, "sliding_window": None,
                                   "tie_word_embeddings": False}),
}
LLAMA_SHAPES = ["llama-3.2-1b", "llama-3-8b"]
VOCAB = 128256
MAX_MODEL_LEN = 1024
COPY_BYTES = 2 << 30


@dataclass
class Row:
    model: str
    case: str
    value: str
    floor: str = ""
    ratio: str = ""


def write_checkpoint(shape: str, directory: Path, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """A random-weight model of ``shape`` in ``dtype`` saved to ``directory`` (safetensors, with a
    word-level tokenizer over the vocab); returns the transformers model, on the GPU."""
    config_class, fields = SHAPES[shape]
    config = config_class(vocab_size=VOCAB, max_position_embeddings=MAX_MODEL_LEN, bos_token_id=1, eos_token_id=2,
                          pad_token_id=0, **fields)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model.save_pretrained(directory)
    vocab = {f"<{i}>": i for i in range(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<0>", bos_token="<1>", eos_token="<2>").save_pretrained(directory)
    return model


def quantize_checkpoint_blocks(directory: Path, block: tuple[int, int] = (128, 128)) -> None:
    """Rewrite the checkpoint in ``directory`` as a block-wise FP8 tool writes it (DeepSeek-V3's and
    Qwen3-FP8's format): each decoder projection in E4M3 with a ``weight_scale_inv`` per ``block``
    (its largest magnitude taken to 448), and the ``quantization_config`` that names them."""
    (bn, bk), index = block, directory / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    for path in sorted(directory.glob("*.safetensors")):
        tensors = load_file(path, device="cuda")
        for name in [n for n in tensors if ".layers." in n and n.endswith("_proj.weight")]:
            n, k = tensors[name].shape
            w = tensors[name].float().view(n // bn, bn, k // bk, bk)
            scale = w.abs().amax(dim=(1, 3)).clamp(min=1e-12) * (1.0 / 448.0)
            tensors[name] = (w / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(n, k)
            tensors[name + "_scale_inv"] = scale
            if weight_map is not None:
                weight_map[name + "_scale_inv"] = path.name
        save_file({key: t.contiguous().cpu() for key, t in tensors.items()}, path, metadata={"format": "pt"})
    if weight_map is not None:
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": [bn, bk]}
    (directory / "config.json").write_text(json.dumps(config))


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * COPY_BYTES / (ms * 1e-3)


def weight_bytes(runner: ModelRunner, batch: int) -> int:
    """Bytes a decode step of ``batch`` tokens reads from the weights: all of them but the embedding
    table, unless the table is also the output projection; of an MoE layer's experts, the share a
    batch is expected to hit if each token's ``top_k`` were drawn at random, 1 - (1 - k/E)^batch."""
    tied = runner.model.lm_head is None
    moe = runner.model_config.moe
    hit = 1.0 - (1.0 - moe.top_k / moe.num_experts) ** batch if moe is not None else 1.0
    return int(sum(
        p.numel() * p.element_size() * (hit if ".experts." in name else 1.0)
        for name, p in runner.model.named_parameters()
        if tied or not name.endswith("embed_tokens.weight")
    ))


def decoding_batch(runner: ModelRunner, batch: int, context: int) -> list[ScheduledChunk]:
    """``batch`` sequences with ``context - 1`` prompt tokens prefilled and one output
    token, as the decode chunks of the next step."""
    per_seq = -(-MAX_MODEL_LEN // runner.block_size)
    seqs = []
    for i, prompt in enumerate(make_prompts(batch, context - 1, VOCAB, seed=batch)):
        seq = Sequence(f"lat{i}", prompt, SamplingParams(temperature=0, max_tokens=8))
        seq.block_table = list(range(i * per_seq, (i + 1) * per_seq))
        seqs.append(seq)
    group = max(1, 4096 // context)
    for first in range(0, batch, group):
        part = seqs[first : first + group]
        logits = runner.execute([ScheduledChunk(s, s.num_prompt_tokens) for s in part]).logits
        for seq, token in zip(part, logits.argmax(-1).tolist()):
            seq.num_computed_tokens = seq.num_tokens
            seq.output_token_ids.append(token)
    return [ScheduledChunk(s, 1) for s in seqs]


def step_ms(fn, iters: int = 50) -> float:
    """Median wall time of ``fn()`` followed by a device sync, in ms."""
    times = []
    for i in range(iters + 5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i >= 5:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def engine_step_ms(llm: LLM, batch: int, context: int) -> float:
    """Per-token time of ``LLM.generate`` decode: (129 tokens - 1 token) / 128."""
    prompts = make_prompts(batch, context - 1, VOCAB, seed=7 + batch)
    def run(n: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
        torch.cuda.synchronize()
        return time.perf_counter() - start
    run(129)   # warm-up: every step shape of the measured runs (Triton specializes on some sizes);
    run(1)     # the 1-token run's prefill steps are shaped differently (its sequences end at once)
    return (run(129) - run(1)) / 128 * 1e3


def latency_rows(name: str, llm: LLM, batches: list[int], context: int, bandwidth: float) -> list[Row]:
    runner = llm.runner
    mc = runner.model_config
    rows = []
    for batch in batches:
        chunks = decoding_batch(runner, batch, context)
        kv = batch * context * mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim * runner.kv_dtype.itemsize
        floor = (weight_bytes(runner, batch) + kv) / bandwidth * 1e3
        graphs = runner.cuda_graphs
        shape = graphs.graph_shape(chunks) if graphs is not None else None
        assert shape is not None, f"no graph holds a decode step of batch {batch}"
        runner.execute(chunks)
        graph = graphs.graphs[shape]
        cases = [
            ("graph replay", triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median")),
            ("runner.execute (graphs)", step_ms(lambda c=chunks: runner.execute(c))),
            ("runner.execute (eager)", step_ms(lambda c=chunks: runner.execute(c, on_layer_done=lambda layer: None))),
            ("engine step (LLM.generate)", engine_step_ms(llm, batch, context)),
        ]
        llm.core.async_scheduling = False
        cases.append(("engine step (LLM.generate), sync scheduling", engine_step_ms(llm, batch, context)))
        llm.core.async_scheduling = True
        for case, ms in cases:
            rows.append(Row(name, f"decode b={batch} ctx={context}: {case}", f"{ms:.3f} ms", f"{floor:.3f} ms", f"{ms / floor:.2f}x"))
    return rows


def throughput_rows(name: str, llm: LLM, hf: torch.nn.Module | None, batches: list[int], input_len: int, output_len: int,
                    repeats: int) -> list[Row]:
    """Output tokens/s of Baton with async scheduling and, on the same engine, without
    it (each step's tokens read back before the next is scheduled), against transformers.
    Both sides first generate the whole batch once untimed: transformers' first run at a
    new batch shape is several times slower than its next (1,210 against 4,926-5,572 tok/s
    for the 1B shape at batch 64 on an H200; its cache grows through fresh allocations).
    Then Baton (async) and transformers run ``repeats`` times each, alternately, and the
    ratio is of their medians."""
    rows = []
    for batch in batches:
        prompts = make_prompts(batch, input_len, VOCAB, seed=batch)
        tokens = batch * output_len
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True), use_tqdm=False)   # warm-up, as above
        llm.core.async_scheduling = False
        sync_rate = tokens / bench_baton(llm, prompts, output_len, "cuda")
        llm.core.async_scheduling = True
        case = f"offline b={batch} in={input_len} out={output_len}"
        rows.append(Row(name, f"{case}: baton, sync scheduling", f"{sync_rate:.0f} tok/s"))
        if hf is not None:
            with torch.inference_mode():
                bench_hf(hf, prompts, output_len, "cuda")   # warm-up, as Baton's above
        baton, ref = [], []
        for _ in range(repeats):
            baton.append(tokens / bench_baton(llm, prompts, output_len, "cuda"))
            if hf is not None:
                with torch.inference_mode():
                    ref.append(tokens / bench_hf(hf, prompts, output_len, "cuda"))
        b = statistics.median(baton)
        if hf is None:
            rows.append(Row(name, f"{case}: baton", f"{b:.0f} tok/s{_spread(baton)}"))
            continue
        h = statistics.median(ref)
        rows.append(Row(name, f"{case}: baton / transformers", f"{b:.0f} / {h:.0f} tok/s{_spread(baton, ref)}", "", f"{b / h:.1f}x"))
    return rows


def _spread(*runs: list[float]) -> str:
    """`` (median of n: low-high / low-high)`` for repeated runs; nothing for one."""
    if len(runs[0]) < 2:
        return ""
    return f" (median of {len(runs[0])}: " + " / ".join(f"{min(r):.0f}-{max(r):.0f}" for r in runs) + ")"


def bench_llm(directory: Path, max_batch: int, max_num_batched_tokens: int, kv_cache_dtype: str = "auto",
              quantization: str | None = None, dtype: str = "bfloat16") -> LLM:
    """Baton on the checkpoint in ``directory`` as the benchmarks run it: ``dtype``, CUDA graphs,
    blocks for ``max_batch`` full-length sequences, no prefix caching."""
    return LLM(str(directory), device="cuda", dtype=dtype, max_model_len=MAX_MODEL_LEN, max_num_seqs=max_batch,
               max_num_batched_tokens=max_num_batched_tokens, num_blocks=max_batch * (MAX_MODEL_LEN // 16) + 16,
               enable_prefix_caching=False, kv_cache_dtype=kv_cache_dtype, quantization=quantization)


def bench_shape(name: str, args: argparse.Namespace, bandwidth: float, workdir: Path) -> list[Row]:
    directory = workdir / name
    model = write_checkpoint(name, directory, getattr(torch, args.dtype))
    if args.fp8_blocks:
        quantize_checkpoint_blocks(directory)
    hf = None if args.skip_hf else model
    del model
    torch.cuda.empty_cache()
    max_batch = max(max(args.latency_batches), max(args.batches))
    llm = bench_llm(directory, max_batch, args.max_num_batched_tokens, args.kv_cache_dtype, args.quantization, args.dtype)
    rows = latency_rows(name, llm, args.latency_batches, args.context, bandwidth)
    rows += throughput_rows(name, llm, hf, args.batches, args.input_len, args.output_len, args.repeats)
    del llm, hf
    torch.cuda.empty_cache()
    shutil.rmtree(directory)
    return rows


def table(rows: list[Row], header: str) -> str:
    lines = [header, "", "| model | case | measured | floor | ratio |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r.model} | {r.case} | {r.value} | {r.floor} | {r.ratio} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=LLAMA_SHAPES, choices=list(SHAPES))
    p.add_argument("--latency-batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--context", type=int, default=512, help="context length of the decode latency cases")
    p.add_argument("--batches", type=int, nargs="+", default=[32, 64], help="offline throughput batch sizes")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096, help="Baton's token budget per step")
    p.add_argument("--repeats", type=int, default=3, help="offline runs of each side; the ratio is of the medians")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--no-pdl", action="store_true", help="launch the decode kernels without programmatic dependent launch")
    p.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPE_NAMES), default="auto",
                   help="Baton's KV cache (the engine's flag; transformers keeps its own in bf16)")
    p.add_argument("--quantization", choices=list(QUANTIZATION_METHODS), default=None,
                   help="Baton's linear layers (the engine's flag, quantizing as the checkpoint loads; transformers "
                        "keeps bf16): the floor counts the weights' bytes as loaded")
    p.add_argument("--fp8-blocks", action="store_true",
                   help="write Baton's checkpoint block-wise FP8 (128 x 128 blocks, E4M3 weights with weight_scale_inv: "
                        "DeepSeek-V3's and Qwen3-FP8's format; transformers keeps bf16)")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16",
                   help="the random weights' dtype, both sides (float16: FP8 prefill takes the Triton GEMM)")
    p.add_argument("--workdir", default=None, help="where the checkpoints go (default: /dev/shm if it has room)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_model.py needs a CUDA GPU")
    pdl.enabled = not args.no_pdl
    shm = Path("/dev/shm")
    default = shm if shm.is_dir() and shutil.disk_usage(shm).free > 20 << 30 else Path(tempfile.gettempdir())
    workdir = Path(tempfile.mkdtemp(dir=args.workdir or default))
    bandwidth = copy_bandwidth()
    props = torch.cuda.get_device_properties(0)
    header = (f"# Model benchmarks: {props.name}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
              f"torch {torch.__version__}, triton {triton.__version__}; {args.dtype} random weights; Baton's KV cache {args.kv_cache_dtype}, linear layers "
              f"{'fp8, 128x128 blocks (the checkpoint)' if args.fp8_blocks else args.quantization or args.dtype}; "
              f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (2 GiB D2D, read + write); floor = (weights + KV read) / copy bandwidth; "
              f"programmatic dependent launch {'on' if pdl.enabled else 'off'}")
    rows: list[Row] = []
    try:
        for name in args.shapes:
            rows += bench_shape(name, args, bandwidth, workdir)
            print(table(rows, header), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "model_bench.md").write_text(table(rows, header) + "\n")


if __name__ == "__main__":
    main()
