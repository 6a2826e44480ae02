"""Speculative decoding by n-gram lookup against one token a step: output tokens/s, engine
steps, and how many proposed tokens were accepted, on the same prompts in the same run.

    python bench/bench_speculative.py                                    # demo checkpoint, CPU
    python bench/bench_speculative.py --model DIR --device cuda --dtype bfloat16 --k 2 4 8

The prompts are Shakespeare lines, each repeated ``--repeats`` times, so that the text has
n-grams to look up (as a prompt that quotes a document does); greedy, EOS ignored, so every
run writes batch x output-len tokens. In float32 the outputs must be the same with and
without speculation: the script stops if they are not. In bf16 / fp16 a drafted step's
attention splits each context where its last row's length puts the splits, one token a
step where that token's does, so the two round differently and a greedy near-tie may
flip: "same" counts the outputs that match one token a step, "1st diff" is where the
others first differ, on average. Each engine schedules as
it would serve: on CUDA plain decoding is asynchronous, speculation synchronous (asynchronous
above ``--disable-by-batch-size``); "async" says which.
"""

from __future__ import annotations

import argparse
import time

import torch

from baton.engine.config import SpeculativeConfig
from baton.engine.llm import LLM
from baton.engine.sampling_params import SamplingParams
from baton.services.launcher import default_model

LINES = [
    "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name.\n\n",
    "ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n\n",
    "HAMLET:\nTo be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n\n",
    "KING RICHARD III:\nNow is the winter of our discontent\nMade glorious summer by this sun of York;\n\n",
]


def run(llm: LLM, prompts: list[str], params: SamplingParams, device: str) -> tuple[float, int, list[list[int]]]:
    """Seconds, engine steps and output tokens of one batch."""
    for i, prompt in enumerate(prompts):
        llm.core.add_request(f"r{i}-{time.monotonic_ns()}", llm.tokenizer(prompt).input_ids, params)
    seqs = [seq for request in llm.core.requests.values() for seq in request]
    steps = 0
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    while llm.core.has_unfinished():
        llm.core.step()
        steps += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, steps, [s.output_token_ids for s in seqs]


def first_difference(got: list[list[int]], want: list[list[int]]) -> float:
    """Mean index of the first differing token, over the outputs that differ (nan if none)."""
    firsts = [next(i for i, (a, b) in enumerate(zip(g, w)) if a != b) for g, w in zip(got, want) if g != w]
    return sum(firsts) / len(firsts) if firsts else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=default_model())
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--k", type=int, nargs="+", default=[2, 4, 8], help="num_speculative_tokens to try")
    p.add_argument("--lookup-max", type=int, default=4)
    p.add_argument("--disable-by-batch-size", type=int, default=None, help="no drafts while this many sequences run")
    args = p.parse_args()

    prompts = [LINES[i % len(LINES)] * args.repeats for i in range(args.batch)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    engine = dict(device=args.device, dtype=args.dtype, enable_prefix_caching=False)
    # Each engine first runs the whole batch untimed: drafts of varying lengths make steps of
    # varying row counts, whose kernel variants (sampling, attention) compile on first sight.
    base = LLM(args.model, **engine)
    run(base, prompts, params, args.device)
    seconds, steps, want = run(base, prompts, params, args.device)
    tokens = args.batch * args.output_len
    print(f"model={args.model} device={args.device} batch={args.batch} out={args.output_len} "
          f"prompt tokens={len(base.tokenizer(prompts[0]).input_ids)} threads={torch.get_num_threads()}")
    print(f"{'k':>3} {'tok/s':>9} {'steps':>6} {'tok/step':>9} {'proposed':>9} {'accepted':>9} {'rate':>6} "
          f"{'same':>9} {'1st diff':>8} {'async':>5}")
    print(f"{'-':>3} {tokens / seconds:>9.1f} {steps:>6} {tokens / steps:>9.2f} {'-':>9} {'-':>9} {'-':>6} {'-':>9} {'-':>8} "
          f"{base.core.async_scheduling!s:>5}")
    for k in args.k:
        spec = LLM(args.model, **engine, speculative=SpeculativeConfig(
            k, prompt_lookup_max=args.lookup_max, disable_by_batch_size=args.disable_by_batch_size))
        run(spec, prompts, params, args.device)
        proposed, accepted = spec.core.spec_stats.proposed_tokens, spec.core.spec_stats.accepted_tokens
        seconds, steps, got = run(spec, prompts, params, args.device)
        same = sum(g == w for g, w in zip(got, want))
        if same < len(want) and (args.dtype or "float32") == "float32":
            raise SystemExit(f"k={k}: speculative output differs from one token a step")
        proposed, accepted = spec.core.spec_stats.proposed_tokens - proposed, spec.core.spec_stats.accepted_tokens - accepted
        rate = accepted / proposed if proposed else 0.0
        print(f"{k:>3} {tokens / seconds:>9.1f} {steps:>6} {tokens / steps:>9.2f} {proposed:>9} {accepted:>9} {rate:>6.1%} "
              f"{same:>4}/{len(want)} {first_difference(got, want):>8.1f} {spec.core.async_scheduling!s:>5}")


if __name__ == "__main__":
    main()
