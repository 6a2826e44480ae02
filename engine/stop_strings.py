"""Stop strings over detokenized text (the offline ``LLM``'s; the gateway streams its own
through ``StopStringMatcher``). Pure functions."""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def tokens_through_stop(token_ids: Sequence[int], decode: Callable[[Sequence[int]], str], stops: Sequence[str]) -> int:
    """How many of ``token_ids`` the text needs to hold a stop string (all of them where it never
    does): a step that appends several tokens (a speculative step's accepted draft) may have gone
    past the one that completed it. A prefix's text is a prefix of the whole's, so the count is
    found by bisection (which ends at all of them where no prefix holds one)."""
    low, high = 0, len(token_ids)   # the text of ``low`` tokens holds none; ``high`` is the answer so far
    while high - low > 1:
        mid = (low + high) // 2
        if first_stop(decode(token_ids[:mid]), stops) is None:
            low = mid
        else:
            high = mid
    return high


def cut_at_stop(text: str, stops: Sequence[str], include: bool) -> tuple[str, str | None]:
    """``text`` cut before its first stop string (after it, with ``include``), and that string."""
    hit = first_stop(text, stops)
    if hit is None:
        return text, None
    start, stop = hit
    return text[: start + len(stop) if include else start], stop
