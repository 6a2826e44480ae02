"""Wall time of every engine step of one offline batch on a CUDA GPU (random-weight
Llama-3.2-1B shape by default), for each token budget given: where a generate's time
goes between the prefill steps and the decode steps, host work included.
``--profile`` then runs the batch once more (async scheduling) under ``cProfile``
and once under ``torch.profiler``: the host functions that take the most time,
how much of the wall time the GPU spent running kernels, and the
operations that take the most host and device time.

    python3 bench/step_times.py --batch 64 --input-len 512 --output-len 128 --budgets 4096 8192 [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import pstats
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
from torch.profiler import ProfilerActivity, profile

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


def profile_host_and_device(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> None:
    """Where the host's time goes (cProfile, top functions by own time) and the GPU's
    busy fraction (the kernels' spans over the wall time, torch.profiler) for one async batch."""
    llm.core.async_scheduling = True
    prof = cProfile.Profile()
    prof.enable()
    step_times(llm, prompts, params)
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    print(text.getvalue(), flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
        start = time.perf_counter()
        step_times(llm, prompts, params)
        wall_us = (time.perf_counter() - start) * 1e6
    # The union of the kernels' spans: with programmatic dependent launch, a kernel starts before the one before ends.
    busy_us, covered = 0.0, float("-inf")
    for start, end in sorted((e.time_range.start, e.time_range.end) for e in trace.events() if e.device_type == torch.autograd.DeviceType.CUDA):
        busy_us += max(0.0, end - max(start, covered))
        covered = max(covered, end)
    print(f"GPU busy {busy_us / 1e3:.1f} ms of {wall_us / 1e3:.1f} ms wall ({busy_us / wall_us:.0%}, profiler on)")
    print(trace.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
    print(trace.key_averages().table(sort_by="self_device_time_total", row_limit=15), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3.2-1b", choices=list(SHAPES))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--budgets", type=int, nargs="+", default=[4096, 8192], help="max_num_batched_tokens values")
    p.add_argument("--profile", action="store_true", help="then profile the host and the GPU (async scheduling)")
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
            if args.profile:
                profile_host_and_device(llm, prompts, params)
            del llm
            torch.cuda.empty_cache()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
