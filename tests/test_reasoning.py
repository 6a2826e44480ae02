"""Reasoning parsers: a whole output's thinking and answer, where the prompt leaves the output
starting, and the same output streamed, cut anywhere, splits the same."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from baton.services.gateway.reasoning import ThinkStream, starts_in_reasoning

pytestmark = pytest.mark.unit

CASES = [
    # (starts in reasoning, output, reasoning, answer)
    (True, "Two is even.\n</think>\n\nIt is 2.", "Two is even.\n", "It is 2."),
    (False, "<think>\nHmm.</think>It is 2.", "\nHmm.", "It is 2."),
    (False, "  <think>Hmm.</think>\n\n", "Hmm.", None),
    (False, "It is 2, no <think> here.", None, "It is 2, no <think> here."),
    (False, "<3 and <thin ice", None, "<3 and <thin ice"),
    (True, "Still thinking when cut sh", "Still thinking when cut sh", None),
    (True, "Ends on </thi", "Ends on </thi", None),
    (True, "</think>", None, None),
    (False, "", None, None),
]


@pytest.mark.parametrize(("in_reasoning", "text", "reasoning", "answer"), CASES)
def test_split_reads_thinking_and_answer(in_reasoning, text, reasoning, answer) -> None:
    assert ThinkStream(in_reasoning).split(text) == (reasoning, answer)


@settings(max_examples=300, deadline=None)
@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(0, 80), max_size=10))
def test_streamed_pieces_split_as_the_whole(case, cuts) -> None:
    in_reasoning, text, reasoning, answer = case
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    stream, got_reasoning, got_answer = ThinkStream(in_reasoning), "", ""
    for a, b in zip(bounds, bounds[1:]):
        r, t = stream.add(text[a:b])
        got_reasoning, got_answer = got_reasoning + r, got_answer + t
    r, t = stream.finish()
    assert (got_reasoning + r, got_answer + t) == (reasoning or "", answer or "")


def test_the_prompt_says_where_the_output_starts() -> None:
    assert starts_in_reasoning("<|im_start|>assistant\n<think>\n")                    # DeepSeek-R1, Qwen3.5
    assert not starts_in_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # Qwen3, enable_thinking false
    assert not starts_in_reasoning("<|im_start|>assistant\n")                         # the model opens it, or not
