"""A reasoning model's thinking, apart from its answer, as vLLM's ``--reasoning-parser`` gives it:
the thinking is the message's ``reasoning``, the answer after it its content.

* ``deepseek_r1``, ``qwen3``: the text between ``<think>`` and ``</think>``. Where the output
  starts is read off the prompt, as the chat template left it: a template that ends the prompt
  inside ``<think>`` (DeepSeek-R1, Qwen3.5) starts the output in reasoning, one that closed it
  (Qwen3 with ``enable_thinking`` false) in the answer; otherwise the output is the answer unless
  it opens ``<think>`` itself. The answer's leading whitespace after ``</think>`` is dropped.
* ``granite`` (Granite 3.2 with ``thinking`` on): the text between ``Here is my thought
  process:`` and ``Here is my response:`` (or ``Here's ...``), where the output opens with the
  first; the answer is the text after the second, as written.
* ``mistral`` (Magistral from 1.1, Ministral 3 Reasoning): the text between ``[THINK]`` and
  ``[/THINK]``, where the output opens with the first (the prompt is not read: Magistral's system
  prompt shows both markers, in its instructions); the answer is the text after the second, as
  written. Both are special tokens in Mistral's tokenizers, which the gateway keeps in the text it
  reads here though ``skip_special_tokens`` skips the others (a format's ``markers``, where they
  are special tokens, as vLLM keeps them).

An output that never closes its thinking (cut short) is all reasoning. Streamed, text that may be
the start of a marker is held until it is not.

A grammar (structured output, a forced tool call) binds the answer, not the thinking: with
``<think>``, unless the prompt closed the thinking, and with ``[THINK]``, the gateway has the
workers apply it only after the output's ``</think>`` (``[/THINK]``;
``StructuredOutputParams.reasoning_end``), as vLLM does, so an output that never closes its
thinking is never constrained. Granite's markers are plain text, written in more than one way, so
there a grammar binds the whole output, which is then all answer (vLLM takes no grammar with
Granite's thinking).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from baton.services.gateway.tokenizer import partial_suffix
from baton.services.gateway.tool_json import opens_with

_START, THINK_END = "<think>", "</think>"


@dataclass(frozen=True)
class ThinkFormat:
    """How a model family marks its thinking."""

    opens: tuple[str, ...]      # what opens the thinking, at the output's start
    closes: tuple[str, ...]     # what closes it, before the answer
    strip_answer: bool          # the answer's leading whitespace is dropped
    read_prompt: bool           # <think> tags: the chat template may leave them open or closed
    grammar_after: str | None   # a grammar binds the text after this marker (None: the whole output)

    @property
    def markers(self) -> tuple[str, ...]:
        """Its openers and closers: kept in the output's text where they are special tokens."""
        return self.opens + self.closes


THINK = ThinkFormat((_START,), (THINK_END,), strip_answer=True, read_prompt=True, grammar_after=THINK_END)
GRANITE = ThinkFormat(("Here is my thought process:", "Here's my thought process:"),
                      ("Here is my response:", "Here's my response:"), strip_answer=False, read_prompt=False,
                      grammar_after=None)
MISTRAL = ThinkFormat(("[THINK]",), ("[/THINK]",), strip_answer=False, read_prompt=False, grammar_after="[/THINK]")
FORMATS = {"deepseek_r1": THINK, "qwen3": THINK, "granite": GRANITE, "mistral": MISTRAL}
PARSERS = tuple(FORMATS)


def closed_in_prompt(prompt_tail: str) -> bool:
    """Whether the chat template closed the thinking before the output (Qwen3 with
    ``enable_thinking`` false): then the output is all answer."""
    closed = prompt_tail.rfind(THINK_END)
    return closed >= 0 and closed > prompt_tail.rfind(_START)


def starts_in_reasoning(prompt_tail: str) -> bool:
    """Whether the chat template left the prompt inside ``<think>`` (``prompt_tail``: the end of
    the rendered prompt, special tokens included)."""
    opened = prompt_tail.rfind(_START)
    return opened >= 0 and prompt_tail.find(THINK_END, opened) < 0


class ThinkStream:
    """Splits one output, piece by piece, into reasoning and answer."""

    def __init__(self, in_reasoning: bool, fmt: ThinkFormat = THINK) -> None:
        self._state = "reasoning" if in_reasoning else "opening"   # opening: the answer, unless thinking opens first
        self._fmt = fmt
        self._close = re.compile("|".join(map(re.escape, fmt.closes)))
        self._buf = ""

    def add(self, text: str) -> tuple[str, str]:
        """The reasoning and the answer that can go out now."""
        self._buf += text
        reasoning = answer = ""
        while self._buf:
            if self._state == "opening":
                opens = opens_with(self._buf, self._fmt.opens)
                if opens is None:
                    break
                if opens:
                    head = self._buf.lstrip()
                    opener = next(o for o in self._fmt.opens if head.startswith(o))
                    self._buf, self._state = head[len(opener):], "reasoning"
                else:
                    self._state = "answer"
            elif self._state == "reasoning":
                close = self._close.search(self._buf)
                if close is None:
                    keep = partial_suffix(self._buf, self._fmt.closes)
                    reasoning += self._buf[: len(self._buf) - keep]
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                reasoning += self._buf[: close.start()]
                self._buf, self._state = self._buf[close.end():], "after"
            elif self._state == "after":          # the answer's leading whitespace is dropped, where the format does
                if self._fmt.strip_answer:
                    self._buf = self._buf.lstrip()
                if self._buf:
                    self._state = "answer"
            else:
                answer, self._buf = answer + self._buf, ""
        return reasoning, answer

    def finish(self) -> tuple[str, str]:
        """What was held back, once the output has ended."""
        rest, self._buf = self._buf, ""
        if self._state == "reasoning":
            return rest, ""
        return "", rest if self._state != "after" else ""

    def split(self, text: str) -> tuple[str | None, str | None]:
        """A whole output's reasoning and answer (None: none)."""
        reasoning, answer = self.add(text)
        more_reasoning, more_answer = self.finish()
        return (reasoning + more_reasoning) or None, (answer + more_answer) or None
