"""Moving KV blocks between workers: one interface (``base``), the layout
handshake (``layout``), and backends registered by name (``grpc``, ``ucx`` and ``nccl`` built in)."""

from baton.kvtransfer.base import (
    KVReceiver, KVSender, TransferSession, TransferStats, TransferTicket,
    create_receiver, create_sender, known_transports, register_transport,
)
from baton.kvtransfer.errors import LayoutMismatch, TransferError
from baton.kvtransfer.layout import KVLayout, check_layout
from baton.kvtransfer.session import warm_up_block_copies

__all__ = [
    "KVLayout", "KVReceiver", "KVSender", "LayoutMismatch", "TransferError", "TransferSession",
    "TransferStats", "TransferTicket", "check_layout", "create_receiver", "create_sender",
    "known_transports", "register_transport", "warm_up_block_copies",
]
