"""Errors raised by KV transports: one base class, and the layout refusal that
names the field the two ends disagree on."""

from __future__ import annotations


class TransferError(Exception):
    """A KV transfer failed, was refused, timed out or was cancelled."""


class LayoutMismatch(TransferError):
    """The two ends of a transfer lay out their KV caches differently."""

    def __init__(self, field: str, local_value: object, remote_value: object) -> None:
        self.field = field
        self.local_value = local_value
        self.remote_value = remote_value
        super().__init__(
            f"KV layout mismatch: {field} is {_show(local_value)} here "
            f"but {_show(remote_value)} at the peer"
        )


def _show(value: object) -> str:
    return repr(value) if isinstance(value, str) else str(value)
