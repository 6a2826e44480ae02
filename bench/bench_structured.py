"""What structured output costs: the host's time to build each constrained row's token mask
(xgrammar) and apply it, beside generation throughput with and without a grammar.

    python bench/bench_structured.py                           # demo checkpoint, CPU
    python bench/bench_structured.py --model DIR --device cuda --dtype bfloat16 --batches 1 64

1. Masks: ``B`` matchers of a JSON schema take random paths through it (each step, every row
   takes a random token its mask allows); per step, the time to fill the ``B`` bitmasks and mask
   ``[B, vocab]`` float32 logits on the device. In the engine this runs on the host while the
   device computes the step's forward pass.
2. Generation: the same prompts, greedy, free and under the schema. Output tokens/s of each
   (the lengths differ: a constrained answer ends where its JSON closes).
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from baton.engine.llm import LLM
from baton.engine.sampling_params import SamplingParams, StructuredOutputParams
from baton.engine.structured_output import mask_logits
from baton.services.launcher import default_model

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["merry", "sad", "noble", "base"]}, "maxItems": 4},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
SPEC = StructuredOutputParams(json=json.dumps(SCHEMA), disable_any_whitespace=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_masks(llm: LLM, batch: int, steps: int, device: str, rng: random.Random) -> float:
    """Median seconds per step to fill and apply ``batch`` rows' masks."""
    structured = llm.core.structured_outputs
    matchers = [structured.matcher(SPEC) for _ in range(batch)]
    logits = torch.zeros(batch, llm.runner.vocab_size, device=device)
    times = []
    for _ in range(steps):
        logits.zero_()
        sync(device)
        start = time.perf_counter()
        mask_logits(logits, matchers)
        sync(device)
        times.append(time.perf_counter() - start)
        allowed = (logits > float("-inf")).cpu()
        for i, m in enumerate(matchers):
            m.accept_token(rng.choice(allowed[i].nonzero().flatten().tolist()))
            if m.is_terminated():   # took EOS where the JSON was whole: start another
                matchers[i] = structured.matcher(SPEC)
    return sorted(times)[len(times) // 2]


def bench_generate(llm: LLM, prompts: list[str], params: SamplingParams, device: str) -> tuple[float, int]:
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, structured_output=params.structured_output))  # warm-up
    sync(device)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    sync(device)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return tokens / (time.perf_counter() - start), tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=default_model())
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--steps", type=int, default=64, help="mask steps timed per batch")
    p.add_argument("--max-tokens", type=int, default=96)
    args = p.parse_args()

    llm = LLM(args.model, device=args.device, dtype=args.dtype)
    rng = random.Random(0)
    print(f"model {args.model}, vocab {llm.runner.vocab_size}, device {args.device}")
    print("masks (fill + apply, median per step):")
    bench_masks(llm, 1, 4, args.device, rng)   # compiles the grammar and the apply kernel
    for batch in args.batches:
        step = bench_masks(llm, batch, args.steps, args.device, rng)
        print(f"  batch {batch:4d}: {step * 1e6:9.1f} us per step, {step * 1e6 / batch:7.1f} us per row")
    print("generation (greedy):")
    lines = ["JULIET:\nO Romeo", "ROMEO:\nBut, soft!", "HAMLET:\nTo be", "KING RICHARD III:\nNow is"]
    for batch in args.batches:
        prompts = [lines[i % len(lines)] + " " * (i // len(lines)) for i in range(batch)]
        free, n_free = bench_generate(llm, prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens), args.device)
        constrained, n_constrained = bench_generate(
            llm, prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens, structured_output=SPEC), args.device
        )
        print(f"  batch {batch:4d}: free {free:9.1f} tok/s ({n_free} tokens), "
              f"JSON schema {constrained:9.1f} tok/s ({n_constrained} tokens), ratio {constrained / free:.2f}")


if __name__ == "__main__":
    main()
