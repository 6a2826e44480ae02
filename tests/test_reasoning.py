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
MISTRAL_CASES = [
    # (output, reasoning, answer): thinking only where the output opens [THINK]; the answer as written
    ("[THINK]Two beats one.[/THINK]It is 2.", "Two beats one.", "It is 2."),
    ("\n [THINK]\nsums\n[/THINK]\n\nIt is 2.", "\nsums\n", "\n\nIt is 2."),
    ("[THINK]a [THINK] b[/THINK]c[/THINK]d", "a [THINK] b", "c[/THINK]d"),
    ("[THINK]cut short before [/THI", "cut short before [/THI", None),
    ("[THINK]", None, None),
    ("[THINK][/THINK]", None, None),
    ("[THINK]hmm[/THINK]", "hmm", None),
    ("It is 2. [THINK]late[/THINK] 3", None, "It is 2. [THINK]late[/THINK] 3"),
    ("[/THINK]It is 2.", None, "[/THINK]It is 2."),
    ("[Thinking] aloud", None, "[Thinking] aloud"),
    ("[THIN", None, "[THIN"),
    ("<think>x</think>", None, "<think>x</think>"),
]
ALL = ([("qwen3", *case) for case in CASES] + [("granite", False, *case) for case in GRANITE_CASES]
       + [("mistral", False, *case) for case in MISTRAL_CASES])


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


@pytest.mark.parametrize(("text", "reasoning", "answer"), MISTRAL_CASES)
def test_mistral_splits_the_same_cut_at_every_character(text, reasoning, answer) -> None:
    """Magistral's output, in two pieces cut at each of its characters and a character at a time,
    splits as it does whole: a marker cut across pieces is held until it is whole or is not one."""
    pieces = [[text[:cut], text[cut:]] for cut in range(len(text) + 1)] + [list(text)]
    for cut in pieces:
        stream = ThinkStream(False, FORMATS["mistral"])
        steps = [stream.add(piece) for piece in cut] + [stream.finish()]
        assert ("".join(r for r, _ in steps), "".join(a for _, a in steps)) == (reasoning or "", answer or ""), cut


def test_mistral_holds_only_what_may_be_a_marker() -> None:
    """A character at a time, Magistral's thinking goes out as it comes but for a possible
    ``[/THINK]``, and the answer once it cannot open ``[THINK]``."""
    stream = ThinkStream(False, FORMATS["mistral"])
    assert [stream.add(c) for c in "[Tx"] == [("", ""), ("", ""), ("", "[Tx")]
    stream = ThinkStream(False, FORMATS["mistral"])
    text = "[THINK]a[b[/THINK]c"
    steps = [stream.add(c) for c in text]
    assert steps[:7] == [("", "")] * 7 and steps[7:10] == [("a", ""), ("", ""), ("[b", "")]
    assert steps[10:-1] == [("", "")] * 8 and steps[-1] == ("", "c")


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
    assert PARSERS == ("deepseek_r1", "qwen3", "granite", "mistral") == tuple(FORMATS)


def test_a_formats_markers_are_its_openers_and_closers() -> None:
    """What the gateway keeps in the text, where the tokenizer makes a marker a special token."""
    assert FORMATS["mistral"].markers == ("[THINK]", "[/THINK]") and FORMATS["qwen3"].markers == ("<think>", "</think>")
