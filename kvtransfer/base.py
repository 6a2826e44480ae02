"""The KV transport interface. Services use only this module; backends (gRPC
stream, UCX, NCCL) implement it and register under a name.

Sender side (prefill worker), per request::

    session = sender.open(ticket, local_layout)                  # on the event loop
    session.submit_layer(layer, kv_cache, src_block_ids, first)  # engine thread, after each layer
    stats = await session.finish(timeout_s)  # after the last layer; waits for the ack
    await session.abort()                    # on failure or cancellation

Receiver side (decode worker), per request::

    receiver.expect(request_id, block_ids, layout)   # when reserving, before the ticket leaves
    stats = await receiver.wait_complete(request_id, timeout_s)
    receiver.cancel(request_id)                      # abort; stops writes into the blocks

``submit_layer`` sends source blocks ``src_block_ids[j]`` (of the sender's
cache) into ``ticket.block_ids[first + j]`` on the receiver (``first`` defaults
to 0; a chunked prefill submits each chunk's blocks with its offset);
``ticket.block_ids`` holds the blocks of the prompt's KV in sequence order, less
the ``ticket.cached_blocks`` leading ones the receiver already holds. A transfer completes when every layer of
every block has landed and the sender's final message has arrived.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from baton.kvtransfer.errors import LayoutMismatch, TransferError
from baton.kvtransfer.layout import KVLayout
from baton.protos import kvtransfer_pb2

__all__ = [
    "KVReceiver", "KVSender", "LayoutMismatch", "TransferError", "TransferSession",
    "TransferStats", "TransferTicket", "create_receiver", "create_sender",
    "known_transports", "register_transport",
]


@dataclass(frozen=True)
class TransferTicket:
    """Where and how to send a request's KV; issued by the decode worker."""

    request_id: str
    transport: str
    address: str
    block_ids: tuple[int, ...]
    layout: KVLayout
    num_tokens: int
    cached_blocks: int = 0

    @classmethod
    def from_proto(cls, msg: kvtransfer_pb2.TransferTicket) -> TransferTicket:
        return cls(
            request_id=msg.request_id, transport=msg.transport, address=msg.address,
            block_ids=tuple(msg.block_ids), layout=KVLayout.from_proto(msg.layout),
            num_tokens=msg.num_tokens, cached_blocks=msg.cached_blocks,
        )

    def to_proto(self) -> kvtransfer_pb2.TransferTicket:
        return kvtransfer_pb2.TransferTicket(
            request_id=self.request_id, transport=self.transport, address=self.address,
            block_ids=list(self.block_ids), layout=self.layout.to_proto(),
            num_tokens=self.num_tokens, cached_blocks=self.cached_blocks,
        )


@dataclass(frozen=True)
class TransferStats:
    """What one transfer moved: KV payload bytes, and seconds from first byte to ack."""

    bytes: int
    seconds: float


class TransferSession(abc.ABC):
    """The sending half of one request's transfer."""

    @abc.abstractmethod
    def submit_layer(self, layer: int, kv_cache: torch.Tensor, src_block_ids: Sequence[int], first: int = 0) -> None:
        """Pack source blocks ``src_block_ids`` of ``layer`` from ``kv_cache`` now and
        queue them for the ticket's destination blocks ``first .. first + len - 1``.
        Thread-safe and non-blocking: call it from the compute thread right after the
        layer is written; the cache may be overwritten as soon as it returns. With
        chunked prefill, call it once per step for the blocks that step wrote. After a
        failure or abort it does nothing; the failure is raised by ``finish``."""

    @abc.abstractmethod
    async def finish(self, timeout_s: float) -> TransferStats:
        """Send the final message and wait for the receiver's acknowledgement.
        Raises ``TransferError`` if a layer-block was never submitted, on a refusal
        or transport failure, or after ``timeout_s``; the session is aborted then."""

    @abc.abstractmethod
    async def abort(self) -> None:
        """Stop sending and tear the transfer down (the receiver sees a failure). Idempotent."""


class KVSender(abc.ABC):
    """Opens transfer sessions to receivers of one transport."""

    transport: ClassVar[str]

    @abc.abstractmethod
    def open(self, ticket: TransferTicket, local_layout: KVLayout) -> TransferSession:
        """Start a transfer for ``ticket``. Call on the event loop thread. Raises
        ``LayoutMismatch`` before anything is sent if ``ticket.layout`` differs from
        ``local_layout``, and ``TransferError`` for an unusable ticket."""

    async def close(self) -> None:
        """Release connections."""


class KVReceiver(abc.ABC):
    """Lands incoming KV into the ``kv_caches`` given at construction.
    All methods run on the event loop thread. Every expected request ends in
    ``wait_complete`` or ``cancel``; only then may its blocks be freed."""

    transport: ClassVar[str]
    address: str  # the endpoint to put in tickets

    @abc.abstractmethod
    def expect(self, request_id: str, block_ids: list[int], layout: KVLayout) -> None:
        """Register destination ``block_ids`` (sequence order) for ``request_id``.
        Raises ``ValueError`` for a duplicate request, bad block ids, or a layout that
        does not describe this receiver's caches."""

    @abc.abstractmethod
    async def wait_complete(self, request_id: str, timeout_s: float) -> TransferStats:
        """Return once every layer of every block has landed and the final message
        arrived. Raises ``TransferError`` on failure, cancellation or timeout (a timed
        out transfer is cancelled, so nothing writes into its blocks afterwards).
        The request is forgotten afterwards either way."""

    @abc.abstractmethod
    def cancel(self, request_id: str) -> bool:
        """Abort the transfer: the sender fails promptly and no more data is written
        into the request's blocks. Returns whether the request was known."""

    async def close(self) -> None:
        """Release resources."""


SenderFactory = Callable[..., KVSender]
ReceiverFactory = Callable[..., KVReceiver]

_REGISTRY: dict[str, tuple[SenderFactory, ReceiverFactory]] = {}
# Built-in backends, imported on first use so optional dependencies stay optional.
_BUILTIN_MODULES: dict[str, str] = {
    "grpc": "baton.kvtransfer.grpc_transport", "ucx": "baton.kvtransfer.ucx_transport",
    "nccl": "baton.kvtransfer.nccl_transport",
}


def register_transport(name: str, sender: SenderFactory, receiver: ReceiverFactory) -> None:
    """Make a backend available to ``create_sender`` / ``create_receiver`` as ``name``."""
    _REGISTRY[name] = (sender, receiver)


def known_transports() -> list[str]:
    return sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))


def _lookup(transport: str) -> tuple[SenderFactory, ReceiverFactory]:
    if transport not in _REGISTRY and transport in _BUILTIN_MODULES:
        try:
            importlib.import_module(_BUILTIN_MODULES[transport])
        except ImportError as e:
            raise ValueError(f"KV transport {transport!r} needs the {e.name!r} package, which is not installed "
                             f"(pip install 'baton[{transport}]')") from e
    if transport not in _REGISTRY:
        raise ValueError(f"unknown KV transport {transport!r}; known: {', '.join(known_transports())}")
    return _REGISTRY[transport]


def create_sender(transport: str, **options: object) -> KVSender:
    """A sender of backend ``transport``; ``options`` go to the backend."""
    return _lookup(transport)[0](**options)


def create_receiver(transport: str, kv_caches: list[torch.Tensor], **options: object) -> KVReceiver:
    """A receiver of backend ``transport`` landing into ``kv_caches`` (one per layer)."""
    return _lookup(transport)[1](kv_caches, **options)
