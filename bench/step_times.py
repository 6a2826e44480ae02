"""Wall time of every engine step of one offline batch on a CUDA GPU (random-weight
Llama-3.2-1B shape by default), for each token budget given: where a generate's time
goes between the prefill steps and the decode steps, host work included.

    python3 bench/step_times.py --batch 64 --input-len 512 --output-len 128 --budgets 4096 8192
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import SHAPES, VOCAB, bench_llm, write_checkpoint
from bench_offline import make_prompts

from baton.engine.llm import LLM
from baton.engine.sampling_params import SamplingParams


def step_times(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[float]:
    """Milliseconds between the ends of consecutive ``EngineCore.step`` calls for one batch:
    each step waits for tokens on the host (its own, or with async scheduling the step
    before's), so this is the period at which steps complete, host work included."""
    core = llm.core
    for i, prompt in enumerate(prompts):
        core.add_request(f"timed-{time.monotonic_ns()}-{i}", prompt, params)
    times = []
    torch.cuda.synchronize()
    last = time.perf_counter()
    while core.has_unfinished():
        core.step()
        now = time.perf_counter()
        times.append((now - last) * 1e3)
        last = now
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3.2-1b", choices=list(SHAPES))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--budgets", type=int, nargs="+", default=[4096, 8192], help="max_num_batched_tokens values")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("step_times.py needs a CUDA GPU")
    workdir = Path(tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    try:
        write_checkpoint(args.shape, workdir)   # the transformers copy it returns is not needed here
        torch.cuda.empty_cache()
        prompts = make_prompts(args.batch, args.input_len, VOCAB, seed=1)
        params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
        for budget in args.budgets:
            llm = bench_llm(workdir, args.batch, budget)
            llm.generate(prompts, params)   # warm-up: compiles every step shape
            for mode in ("sync", "async"):
                llm.core.async_scheduling = mode == "async"
                times = step_times(llm, prompts, params)
                # The leading steps run the prompts (eagerly, many tokens); the rest are decode steps.
                cutoff = 5 * statistics.median(times)
                num_prefill = len(list(itertools.takewhile(lambda t: t > cutoff, times)))
                decode = times[num_prefill:]
                print(f"{args.shape} batch {args.batch} {args.input_len}/{args.output_len}, budget {budget}, {mode} scheduling: "
                      f"{len(times)} steps, {sum(times):.1f} ms; first steps {[round(t, 1) for t in times[:num_prefill + 2]]} ms; "
                      f"then {len(decode)} steps, median {statistics.median(decode):.3f} ms", flush=True)
            del llm
            torch.cuda.empty_cache()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
