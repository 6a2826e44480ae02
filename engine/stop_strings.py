"""Stop strings over detokenized text (the offline ``LLM``'s; the gateway streams its own
through ``StopStringMatcher``). Pure functions."""

from __future__ import annotations

from collections.abc import Sequence

TAIL_EXTRA_TOKENS = 8   # tokens decoded past the longest stop string's length: a token's text may be empty


def tail_tokens(stops: Sequence[str]) -> int:
    """How many of the last tokens to decode to see any stop string the newest token completed."""
    return max(len(s) for s in stops) + TAIL_EXTRA_TOKENS


def first_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """The stop string that starts first in ``text`` (the longest of those starting there), and
    where; None where there is none."""
    found = [(text.find(s), -len(s), s) for s in stops if s in text]
    if not found:
        return None
    start, _, stop = min(found)
    return start, stop


def cut_at_stop(text: str, stops: Sequence[str], include: bool) -> tuple[str, str | None]:
    """``text`` cut before its first stop string (after it, with ``include``), and that string."""
    hit = first_stop(text, stops)
    if hit is None:
        return text, None
    start, stop = hit
    return text[: start + len(stop) if include else start], stop
