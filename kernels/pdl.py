"""Programmatic dependent launch (PDL) for the decode-step kernels.

A kernel launched with PDL may start while the kernel before it on the stream is
still running: its programs do the work that needs nothing from that kernel
(address arithmetic, block-id and weight loads), then wait at ``wait()`` until the
previous kernel has finished and its writes are visible. ``launch_dependents()``
lets the next kernel's programs start once every program of this one has called it:
right after ``wait()`` in short kernels (the next one's programs start and load
their weights meanwhile), after the main loop in decode attention (waiting programs
beside a long loop slowed it). In a CUDA graph of ~150 short kernels (batch-1
decode) this hides launch latency and the first loads behind the kernel before.

Every kernel that takes ``PDL`` must call ``wait()`` before its first load of
anything another kernel may write and before its first store. What it loads
before (weights, block tables, positions) must not be written by the kernel just
before it on the stream: model weights and step metadata copied in never are. Launches pass
``**launch_options(t)``: PDL on a CUDA device of compute capability 9.0 or newer
while ``enabled`` (benchmarks turn it off to compare), else a plain launch; the
Triton interpreter never sees the instructions.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

enabled = True


@functools.lru_cache(maxsize=8)
def _supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def launch_options(t: torch.Tensor) -> dict[str, bool]:
    """The ``PDL`` constexpr and the launch option for a kernel launched on ``t``'s device."""
    on = enabled and _supported(t.device)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@triton.jit
def wait(PDL: tl.constexpr):
    """Block until the previous kernel on the stream has finished (with PDL; else nothing)."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def launch_dependents(PDL: tl.constexpr):
    """Let the next kernel's programs start (with PDL; else nothing)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
