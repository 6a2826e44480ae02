"""The engine core's requests: each request's sequences, which request a sequence is of, and the
children of an ``n > 1`` request held back until its first sequence's prompt is computed (so
that they reuse its full prompt blocks through the prefix cache). Pure bookkeeping: the core
hands released children to its scheduler."""

from __future__ import annotations

from baton.engine.sequence import Sequence


class RequestTable:
    def __init__(self) -> None:
        self.requests: dict[str, list[Sequence]] = {}     # request_id -> its sequences
        self.pending: dict[str, list[Sequence]] = {}      # request_id -> children 1..n-1 not yet scheduled
        self._request_of: dict[str, str] = {}              # seq_id -> request_id

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.requests

    def taken(self, seq_ids: list[str]) -> list[str]:
        """Those of ``seq_ids`` an unforgotten request's sequences use."""
        return [seq_id for seq_id in seq_ids if seq_id in self._request_of]

    def add(self, request_id: str, seqs: list[Sequence], held_back: bool = False) -> None:
        """Track a request's sequences; with ``held_back``, those past the first wait for
        ``release_children``."""
        self.requests[request_id] = seqs
        for seq in seqs:
            self._request_of[seq.seq_id] = request_id
        if held_back and len(seqs) > 1:
            self.pending[request_id] = seqs[1:]

    def forget(self, request_id: str) -> list[Sequence]:
        """Drop a request; returns its sequences (none for an unknown one)."""
        self.pending.pop(request_id, None)
        seqs = self.requests.pop(request_id, [])
        for seq in seqs:
            self._request_of.pop(seq.seq_id, None)
        return seqs

    def request_of(self, seq_id: str) -> str | None:
        return self._request_of.get(seq_id)

    def release_children(self) -> list[Sequence]:
        """The held-back children whose first sequence has its prompt computed (or finished)."""
        released = []
        for request_id, children in list(self.pending.items()):
            first = self.requests[request_id][0]
            if first.is_finished or first.num_computed_tokens >= first.num_prompt_tokens:
                del self.pending[request_id]
                released += children
        return released

    def forget_if_done(self, seq: Sequence) -> None:
        """Drop ``seq``'s request once all its sequences are finished (and none is held back)."""
        request_id = self._request_of[seq.seq_id]
        if request_id not in self.pending and all(s.is_finished for s in self.requests[request_id]):
            self.forget(request_id)

    def num_held_back(self) -> int:
        return sum(len(children) for children in self.pending.values())

    def unfinished_under(self, lora: str) -> int:
        """How many unfinished sequences run under LoRA adapter ``lora``."""
        return sum(1 for seqs in self.requests.values() for seq in seqs if seq.lora == lora and not seq.is_finished)
