"""A pairwise process group: rank 0 a receiver, rank 1 one sender process, built
alone (``torch.distributed.ProcessGroupNCCL`` for CUDA caches,
``ProcessGroupGloo`` for CPU ones) rather than through ``init_process_group``,
whose one global world cannot admit workers that come and go. Both ranks meet in
the receiver's ``TCPStore`` under the pair's own prefix.

Posting a ``send`` or ``recv`` does not block; waiting for one does (and a NCCL
receive whose sender died never returns on its own). So every wait runs in the
group's own thread, in the order posted, each under the group's deadline, and
``abort`` gives the group up: the NCCL communicator is aborted, which ends its
pending work. Building the group (the communicator's setup blocks until both
ranks arrive) and a first one-byte exchange that sets up the pair's connection
run in that thread too, under the same deadline. An operation past the deadline
fails its wait, and torch's NCCL watchdog aborts that communicator, rather than
taking the whole process down (its default): a worker outlives its peers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import os

import torch
import torch.distributed as dist

from baton.kvtransfer.errors import TransferError

os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")  # CleanUpOnly: abort the communicator, no crash
RECEIVER, SENDER = 0, 1


def backend_for(device: torch.device) -> str:
    """The process group backend for caches on ``device``."""
    return "nccl" if device.type == "cuda" else "gloo"


class PairGroup:
    """One side of a pair's process group; ``await PairGroup.join(...)`` builds it."""

    def __init__(self, device: torch.device, timeout_s: float) -> None:
        self.device = device
        self._timeout = datetime.timedelta(seconds=timeout_s)
        initializer = (lambda: torch.cuda.set_device(device)) if device.type == "cuda" else None
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kv-pair", initializer=initializer)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._group: dist.ProcessGroup | None = None
        self._aborted = False

    @classmethod
    async def join(cls, store: dist.Store | tuple[str, int], prefix: str, rank: int, backend: str,
                   device: torch.device, timeout_s: float) -> PairGroup:
        """The group of the pair named ``prefix`` in ``store`` (the receiver's own, or the
        ``(host, port)`` of its ``TCPStore``), once both ranks joined it. Raises
        ``TransferError`` when that fails or takes longer than ``timeout_s``."""
        if backend != backend_for(device):
            raise TransferError(f"the receiver's KV moves over {backend}, which does not take KV on {device}: "
                                "the nccl transport needs both caches on CUDA or both on the CPU")
        group = cls(device, timeout_s)
        try:
            await asyncio.wrap_future(group._thread.submit(group._build, store, prefix, rank, backend))
        except (RuntimeError, ValueError) as e:  # torch.distributed errors are RuntimeErrors
            group.abort()
            raise TransferError(f"could not build the {backend} pair group: {e}") from e
        except BaseException:
            group.abort()
            raise
        return group

    def _build(self, store: dist.Store | tuple[str, int], prefix: str, rank: int, backend: str) -> None:
        if isinstance(store, tuple):
            store = dist.TCPStore(*store, is_master=False, timeout=self._timeout)
        store = dist.PrefixStore(prefix, store)
        if backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = self._timeout
            options.config.blocking = 0  # a pending setup or operation can be aborted
            self._group = dist.ProcessGroupNCCL(store, rank, 2, options)
        else:
            self._group = dist.ProcessGroupGloo(store, rank, 2, self._timeout)
        probe = torch.zeros(1, dtype=torch.uint8, device=self.device)
        op = self._group.send if rank == SENDER else self._group.recv
        op([probe], 1 - rank, 0).wait(self._timeout)
        if self._aborted:  # given up while it was being built
            self._group.abort()

    def send(self, data: torch.Tensor) -> asyncio.Future:
        """Post sending ``data`` to the peer; the future completes once it went."""
        return self._post(self._group.send, RECEIVER, data)

    def recv(self, data: torch.Tensor) -> asyncio.Future:
        """Post receiving ``data`` from the peer; the future completes once it is filled."""
        return self._post(self._group.recv, SENDER, data)

    def _post(self, operation, peer: int, data: torch.Tensor) -> asyncio.Future:
        # Posted from the group's own stream: posted from the caller's (a compute stream), the
        # transfer would wait behind every kernel already queued there.
        with torch.cuda.stream(self._stream):
            work = operation([data], peer, 0)
        return asyncio.wrap_future(self._thread.submit(self._wait, work, data))

    def _wait(self, work: dist.Work, data: torch.Tensor) -> None:
        """Wait for ``work`` (in the group's thread); ``data`` stays alive until it is done."""
        work.wait(self._timeout)

    def abort(self) -> None:
        """Give the group up: its pending operations fail or are dropped."""
        self._aborted = True
        if self._group is not None:
            self._group.abort()
        self._thread.shutdown(wait=False, cancel_futures=True)
