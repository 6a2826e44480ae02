"""A reasoning model's thinking, apart from its answer, as vLLM's ``--reasoning-parser`` gives it
(``deepseek_r1``, ``qwen3``): the text between ``<think>`` and ``</think>`` is the message's
``reasoning``, the text after it its content.

Where the output starts is read off the prompt, as the chat template left it: a template that
ends the prompt inside ``<think>`` (DeepSeek-R1, Qwen3.5) starts the output in reasoning, one
that closed it (Qwen3 with ``enable_thinking`` false) in the answer; otherwise the output is the
answer unless it opens ``<think>`` itself. An output that never closes its thinking (cut short)
is all reasoning. The answer's leading whitespace after ``</think>`` is dropped. Streamed,
text that may be the start of a tag is held until it is not.

A grammar (structured output, a forced tool call) binds the answer, not the thinking: unless
the prompt closed the thinking, the gateway has the workers apply it only after the output's
``</think>`` (``StructuredOutputParams.reasoning_end``), as vLLM does. So an output that never
closes its thinking is never constrained.
"""

from __future__ import annotations

from baton.services.gateway.tokenizer import partial_suffix

PARSERS = ("deepseek_r1", "qwen3")
_START, THINK_END = "<think>", "</think>"


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

    def __init__(self, in_reasoning: bool) -> None:
        self._state = "reasoning" if in_reasoning else "opening"   # opening: the answer, unless <think> comes first
        self._buf = ""

    def add(self, text: str) -> tuple[str, str]:
        """The reasoning and the answer that can go out now."""
        self._buf += text
        reasoning = answer = ""
        while self._buf:
            if self._state == "opening":
                head = self._buf.lstrip()
                if not head or (_START.startswith(head) and head != _START):
                    break
                if head.startswith(_START):
                    self._buf, self._state = head[len(_START):], "reasoning"
                else:
                    self._state = "answer"
            elif self._state == "reasoning":
                end = self._buf.find(THINK_END)
                if end < 0:
                    keep = partial_suffix(self._buf, [THINK_END])
                    reasoning += self._buf[: len(self._buf) - keep]
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                reasoning += self._buf[:end]
                self._buf, self._state = self._buf[end + len(THINK_END):], "after"
            elif self._state == "after":          # the answer's leading whitespace is dropped
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
