"""Reasoning parsers: a whole output's thinking and answer, where the prompt leaves the output
starting (``<think>``), and the same output streamed, cut anywhere, splits the same."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from baton.services.gateway.reasoning import FORMATS, PARSERS, ThinkStream, starts_in_reasoning

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
GRANITE_CASES = [
    # (output, reasoning, answer): the output starts in the answer, which keeps its text as written
    ("Here is my thought process:\nTwo beats one.\n\nHere is my response:\nIt is 2.", "\nTwo beats one.\n\n", "\nIt is 2."),
    ("Here's my thought process: hmm. Here's my response: 2", " hmm. ", " 2"),
    (" Here is my thought process:Mixed. Here's my response:2, Here is my response: 3", "Mixed. ", "2, Here is my response: 3"),
    ("Here is my thought process: cut short before Here is my resp", " cut short before Here is my resp", None),
    ("Here is my thought process:Here is my response:", None, None),
    ("It is 2. Here is my thought process: none. Here is my response: 2", None,
     "It is 2. Here is my thought process: none. Here is my response: 2"),
    ("Here is what I think: 2", None, "Here is what I think: 2"),
    ("Here's my", None, "Here's my"),
    ("<think>x</think>", None, "<think>x</think>"),
]
ALL = [("qwen3", *case) for case in CASES] + [("granite", False, *case) for case in GRANITE_CASES]


@pytest.mark.parametrize(("parser", "in_reasoning", "text", "reasoning", "answer"), ALL)
def test_split_reads_thinking_and_answer(parser, in_reasoning, text, reasoning, answer) -> None:
    assert ThinkStream(in_reasoning, FORMATS[parser]).split(text) == (reasoning, answer)


@settings(max_examples=300, deadline=None)
@given(case=st.sampled_from(ALL), cuts=st.lists(st.integers(0, 80), max_size=10))
def test_streamed_pieces_split_as_the_whole(case, cuts) -> None:
    parser, in_reasoning, text, reasoning, answer = case
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    stream, got_reasoning, got_answer = ThinkStream(in_reasoning, FORMATS[parser]), "", ""
    for a, b in zip(bounds, bounds[1:]):
        r, t = stream.add(text[a:b])
        got_reasoning, got_answer = got_reasoning + r, got_answer + t
    r, t = stream.finish()
    assert (got_reasoning + r, got_answer + t) == (reasoning or "", answer or "")


def test_the_prompt_says_where_the_output_starts() -> None:
    assert starts_in_reasoning("<|im_start|>assistant\n<think>\n")                    # DeepSeek-R1, Qwen3.5
    assert not starts_in_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # Qwen3, enable_thinking false
    assert not starts_in_reasoning("<|im_start|>assistant\n")                         # the model opens it, or not


def test_granite_holds_only_what_may_be_a_marker() -> None:
    """Streamed a character at a time, Granite's text goes out as soon as it cannot be part of a
    marker: the answer's first word once it is not ``Here``, the reasoning up to a possible
    ``Here is my response:``."""
    stream = ThinkStream(False, FORMATS["granite"])
    assert [stream.add(c) for c in "Hi"] == [("", ""), ("", "Hi")]
    stream = ThinkStream(False, FORMATS["granite"])
    text = "Here's my thought process:ok, Here we go. Here is my response:2"
    steps = [stream.add(c) for c in text]
    assert steps[text.index("ok") + 1] == ("k", "") and steps[text.index(" we") - 1] == ("", "")
    assert steps[text.index("we")] == ("Here w", "") and steps[text.index(":2"):] == [("", ""), ("", "2")]


def test_every_parser_is_known() -> None:
    assert PARSERS == ("deepseek_r1", "qwen3", "granite") == tuple(FORMATS)
