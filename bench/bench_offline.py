"""Offline generation throughput: Baton's aggregated engine next to transformers'
``generate`` on the same model, prompts and lengths, in the same run.

    python bench/bench_offline.py                       # demo checkpoint, CPU, batches 1 16 64
    python bench/bench_offline.py --model DIR --device cuda --dtype bfloat16 --batches 1 64 --input-len 512 --output-len 128

Greedy decoding with EOS ignored, so both sides produce exactly
batch x output-len tokens. Each side first generates the whole batch once untimed
(transformers' first run at a batch shape is several times slower than its next on a
GPU), then once timed. Prints output tokens/s for each.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

from baton.engine.llm import LLM
from baton.engine.sampling_params import SamplingParams
from baton.services.launcher import default_model


def make_prompts(batch: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, input_len), generator=g).tolist()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_baton(llm: LLM, prompts: list[list[int]], output_len: int, device: str) -> float:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)  # warm-up
    sync(device)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    sync(device)
    elapsed = time.perf_counter() - start
    assert sum(len(o.outputs[0].token_ids) for o in outs) == len(prompts) * output_len
    return elapsed


def bench_hf(model, prompts: list[list[int]], output_len: int, device: str) -> float:
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)
    kwargs = dict(do_sample=False, min_new_tokens=output_len, max_new_tokens=output_len, pad_token_id=0)
    model.generate(ids[:1], attention_mask=mask[:1], **{**kwargs, "min_new_tokens": 2, "max_new_tokens": 2})
    sync(device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, **kwargs)
    sync(device)
    elapsed = time.perf_counter() - start
    assert out.shape[1] - ids.shape[1] == output_len
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=default_model())
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--skip-hf", action="store_true")
    args = p.parse_args()

    max_batch = max(args.batches)
    tokens_needed = max_batch * (args.input_len + args.output_len)
    llm = LLM(args.model, device=args.device, dtype=args.dtype, max_num_seqs=max_batch,
              max_num_batched_tokens=max(2048, args.input_len), num_blocks=tokens_needed // 16 + 2 * max_batch + 16,
              enable_prefix_caching=False)
    hf = None
    if not args.skip_hf:
        dtype = llm.runner.dtype
        hf = AutoModelForCausalLM.from_pretrained(llm.runner.model_dir, dtype=dtype).to(args.device).eval()
    vocab = llm.runner.model_config.vocab_size
    print(f"model={args.model} device={args.device} dtype={llm.runner.dtype} in={args.input_len} out={args.output_len} threads={torch.get_num_threads()}")
    print(f"{'batch':>5} {'baton tok/s':>12} {'hf tok/s':>10} {'speedup':>8}")
    for batch in args.batches:
        prompts = make_prompts(batch, args.input_len, vocab, seed=batch)
        tokens = batch * args.output_len
        bench_baton(llm, prompts, args.output_len, args.device)   # warm-up
        baton_tps = tokens / bench_baton(llm, prompts, args.output_len, args.device)
        if hf is None:
            print(f"{batch:>5} {baton_tps:>12.1f} {'-':>10} {'-':>8}")
            continue
        with torch.inference_mode():
            bench_hf(hf, prompts, args.output_len, args.device)   # warm-up
            hf_tps = tokens / bench_hf(hf, prompts, args.output_len, args.device)
        print(f"{batch:>5} {baton_tps:>12.1f} {hf_tps:>10.1f} {baton_tps / hf_tps:>7.2f}x")


if __name__ == "__main__":
    main()
