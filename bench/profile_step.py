"""Where one CUDA-graph decode step's device time goes: replays the step of a
random-weight model (Llama-3.2-1B shape by default) under ``torch.profiler`` and
prints each kernel's time per step, largest first, beside the whole replay.

    python3 bench/profile_step.py --shape llama-3.2-1b --batch 64 --context 512 [--quantization fp8]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import SHAPES, bench_llm, decoding_batch, write_checkpoint

from baton.engine.quantization import QUANTIZATION_METHODS

REPLAYS = 20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3.2-1b", choices=list(SHAPES))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--top", type=int, default=20, help="kernels to list")
    p.add_argument("--quantization", choices=list(QUANTIZATION_METHODS), default=None,
                   help="the linear layers quantized as the checkpoint loads (the engine's flag)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py needs a CUDA GPU")
    workdir = Path(tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    try:
        write_checkpoint(args.shape, workdir)
        torch.cuda.empty_cache()
        llm = bench_llm(workdir, args.batch, 4096, quantization=args.quantization)
        runner = llm.runner
        chunks = decoding_batch(runner, args.batch, args.context)
        runner.execute(chunks)
        graphs = runner.cuda_graphs
        graph = graphs.graphs[graphs.graph_shape(chunks)]
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(REPLAYS):
                graph.replay()
            torch.cuda.synchronize()
        per_kernel: dict[str, list[float]] = defaultdict(list)
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                per_kernel[event.name].append(event.time_range.elapsed_us())
        total = sum(sum(times) for times in per_kernel.values()) / REPLAYS
        print(f"{args.shape} decode batch {args.batch} ctx {args.context}"
              f"{', linear layers ' + args.quantization if args.quantization else ''}: {total:.0f} us of kernels per step")
        print("| kernel | launches per step | us per step | share |\n| --- | --- | --- | --- |")
        rows = sorted(per_kernel.items(), key=lambda kv: -sum(kv[1]))
        for name, times in rows[: args.top]:
            us = sum(times) / REPLAYS
            print(f"| {name[:90]} | {len(times) // REPLAYS} | {us:.1f} | {us / total:.0%} |")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
