"""LoRA adapters against the base model: output tokens/s of one batch run all on the base
model, all under one adapter, and spread evenly over several, on the same engine in the same run.

    python bench/bench_lora.py                                              # demo checkpoint, CPU
    python bench/bench_lora.py --model DIR --device cuda --dtype bfloat16 --adapters 1 4 --rank 16

The adapters are random, in PEFT's format, on every projection of every layer (the tests'
``make_adapter``), written to a temporary directory. Greedy, EOS ignored, so every run writes
batch x output-len tokens. On the GPU a decode step under adapters replays CUDA graphs captured
with them, which run the adapted projections unfused (``engine/lora.py``); prompts run eagerly.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from baton.engine.llm import LLM
from baton.engine.sampling_params import SamplingParams
from baton.services.launcher import default_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from lora_adapters import make_adapter  # noqa: E402  (the tests' random adapters)

LINE = "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name.\n\n"


def tokens_per_s(llm: LLM, prompts: list[str], params: SamplingParams, lora: list[str | None], device: str) -> float:
    """Output tokens/s of one batch, after an untimed run of the same batch (kernel variants compile)."""
    llm.generate(prompts, params, lora=lora, use_tqdm=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate(prompts, params, lora=lora, use_tqdm=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(prompts) * params.max_tokens / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=default_model())
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 4], help="how many adapters the batch is spread over")
    args = p.parse_args()

    prompts = [LINE] * args.batch
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        most = max(args.adapters)
        names = [f"lora{i}" for i in range(most)]
        modules = {name: str(make_adapter(args.model, Path(tmp) / name, rank=args.rank, seed=i)) for i, name in enumerate(names)}
        llm = LLM(args.model, device=args.device, dtype=args.dtype, enable_prefix_caching=False,
                  lora_modules=modules, max_loras=most, max_lora_rank=args.rank)
        print(f"model={args.model} device={args.device} batch={args.batch} out={args.output_len} rank={args.rank} "
              f"threads={torch.get_num_threads()}")
        print(f"{'adapters':>8} {'tok/s':>10} {'vs base':>8}")
        base = tokens_per_s(llm, prompts, params, [None] * args.batch, args.device)
        print(f"{0:>8} {base:>10.1f} {1:>8.2f}")
        for count in args.adapters:
            spread = [names[i % count] for i in range(args.batch)]
            rate = tokens_per_s(llm, prompts, params, spread, args.device)
            print(f"{count:>8} {rate:>10.1f} {rate / base:>8.2f}")
        # A load or unload while serving stalls the engine's steps: reading the adapter, restacking
        # the loaded ones and, on the GPU, capturing their CUDA graphs again.
        for action, run in (("unload", lambda: llm.unload_lora(names[0])), ("load", lambda: llm.load_lora(names[0], modules[names[0]]))):
            start = time.perf_counter()
            run()
            print(f"runtime {action} of one adapter ({most} loaded at most): {(time.perf_counter() - start) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
