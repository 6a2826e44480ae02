"""Landing KV on CUDA: the receiver's copy stream against the compute stream (on the GPU
only; the CPU has one stream)."""

from __future__ import annotations

import pytest
import torch

from baton.kvtransfer import KVLayout
from baton.kvtransfer.landing import LandingReceiver


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
async def test_a_failed_transfers_queued_scatter_runs_before_the_compute_stream_reuses_its_block():
    cache = torch.zeros(4, 2, 16, 2, 64, device="cuda")
    receiver = LandingReceiver([cache])
    layout = KVLayout.from_caches([cache], model_fingerprint="0123456789abcdef")
    ones = torch.ones(layout.block_bytes // 4, device="cuda").view(torch.uint8)
    for rid, block in (("warm-up", 2), ("failed", 1)):
        receiver.expect(rid, [block], layout)
    receiver.land(receiver.bind("warm-up"), 0, 0, ones)   # the scatter kernel compiled before the timed part
    torch.cuda.synchronize()
    with torch.cuda.stream(receiver._copy_stream):
        torch.cuda._sleep(1_000_000_000)  # the copy stream is busy: the scatter below runs late
    receiver.land(receiver.bind("failed"), 0, 0, ones)
    assert receiver.cancel("failed")
    cache[1].fill_(7.0)   # the block, freed, written by its next owner on the compute stream
    torch.cuda.synchronize()
    assert bool((cache[1] == 7.0).all()), "the failed transfer's scatter overwrote the block's next owner"
