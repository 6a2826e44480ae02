"""A chat choice's output as OpenAI's chat API gives it: streamed chunks (the role first, then
each piece of content, reasoning or tool calls, with log-probs where asked) and the finished
message. A reasoning model's thinking (``--reasoning-parser``) is split off first, from where
the prompt left it; then the answer is the text, or the tool calls a forced ``tool_choice``
made, or those the tool-call parser (``--tool-call-parser``) reads for ``tool_choice`` 'auto'.
The parsers' markers that are special tokens stay in the text they read (``kept_tokens``)."""

from __future__ import annotations

from dataclasses import replace

from baton.engine.sampling_params import SamplingParams
from baton.services.gateway import tools
from baton.services.gateway.choice import Choice, Delta
from baton.services.gateway.logprobs import LogprobFormatter
from baton.services.gateway.protocol import (
    ChatCompletionChunk, ChatCompletionRequest, ChatResponseMessage, ChatStreamChoice, DeltaMessage, NamedToolChoice,
)
from baton.services.gateway.reasoning import FORMATS, ThinkStream, closed_in_prompt, starts_in_reasoning
from baton.services.gateway.tokenizer import GatewayTokenizer
from baton.services.gateway.tool_parsers import ToolParser, make_parser

PROMPT_TAIL_TOKENS = 16   # where a chat template leaves <think> open or closed: the prompt's end


class ChatOutput:
    def __init__(self, tokenizer: GatewayTokenizer, reasoning_parser: str | None, tool_call_parser: str | None,
                 logprobs: LogprobFormatter, response_role: str) -> None:
        self._tokenizer = tokenizer
        self._response_role = response_role
        self._think = FORMATS[reasoning_parser] if reasoning_parser else None
        self._tool_call_parser = tool_call_parser
        self.tool_parser = make_parser(tool_call_parser) if tool_call_parser else None
        self._new_id = self.tool_parser.new_id if self.tool_parser else tools.call_id   # forced calls' ids too
        self._logprobs = logprobs
        after = self._think.grammar_after if self._think else None   # None: a grammar binds the whole output
        self._think_end = tuple(tokenizer.encode(after, add_special_tokens=False)) if after else ()
        self._think_markers = tokenizer.special_token_ids(self._think.markers if self._think else ())
        self._tool_markers = tokenizer.special_token_ids(self.tool_parser.markers if self.tool_parser else ())

    def kept_tokens(self, req: ChatCompletionRequest) -> frozenset[int]:
        """The special tokens an answer's text keeps though ``skip_special_tokens`` skips the others:
        the markers the reasoning parser reads, and the tool-call parser's where it reads the
        answer (tool_choice 'auto'), as vLLM keeps them; the parsers take them out."""
        return self._think_markers | (self._tool_markers if req.auto_tools else frozenset())

    def bind_grammar_to_answer(self, params: SamplingParams, prompt_ids: list[int]) -> SamplingParams:
        """``params`` whose grammar the workers apply once the thinking ends (``</think>``,
        ``[/THINK]``), where the reasoning parser's grammar waits for that and the prompt does not
        close the thinking; else ``params``."""
        waits = bool(self._think_end) and params.structured_output is not None
        if not waits or (self._think.read_prompt and closed_in_prompt(self._prompt_tail(prompt_ids))):
            return params
        return replace(params, structured_output=replace(params.structured_output, reasoning_end=self._think_end))

    def attach_parsers(self, req: ChatCompletionRequest, choices: list[Choice]) -> None:
        """Give each chat choice what reads its output as it streams: the reasoning parser and, for
        tool_choice 'auto', the tool-call parser."""
        for choice in choices:
            choice.reasoning = self._think_stream(choice.prompt.token_ids)
        if req.stream and req.auto_tools:
            parser = self._request_parser(req)
            for choice in choices:
                choice.tool_stream = parser.stream()

    def _request_parser(self, req: ChatCompletionRequest) -> ToolParser:
        """The tool-call parser for ``req``, with its tools (``qwen3_coder`` types its calls' values by them)."""
        return make_parser(self._tool_call_parser, req.tools)

    def _prompt_tail(self, prompt_ids: list[int]) -> str:
        """The rendered prompt's end, special tokens included: whether the chat template left the
        output thinking."""
        return self._tokenizer.decode(prompt_ids[-PROMPT_TAIL_TOKENS:], skip_special_tokens=False)

    def _think_stream(self, prompt_ids: list[int]) -> ThinkStream | None:
        """A fresh reader of the output's thinking, which starts where the prompt left ``<think>``
        (None without a reasoning parser)."""
        if self._think is None:
            return None
        return ThinkStream(self._think.read_prompt and starts_in_reasoning(self._prompt_tail(prompt_ids)), self._think)

    def role(self, req: ChatCompletionRequest) -> str:
        """The answer's role: ``--response-role``'s, or the continued message's."""
        return req.answer_role(self._response_role)

    def echoed(self, req: ChatCompletionRequest) -> str:
        """What ``echo`` puts before the answer (``ChatCompletionRequest.echoed``)."""
        return req.echoed(self.role(req))

    def chunks(self, req: ChatCompletionRequest, request_id: str, choice: Choice, delta: Delta) -> list[ChatCompletionChunk]:
        out = []
        if delta.first:
            role = ChatStreamChoice(index=delta.index, delta=DeltaMessage(role=self.role(req), content=self.echoed(req)))
            out.append(ChatCompletionChunk(id=request_id, model=req.model, choices=[role],
                                           prompt_token_ids=choice.prompt.token_ids if req.return_token_ids else None))
        message, finish_reason = self._delta(req, choice, delta)
        if message is not None or finish_reason or ((req.logprobs or req.return_token_ids) and delta.tokens):
            content = ChatStreamChoice(
                index=delta.index,
                delta=message or DeltaMessage(),
                logprobs=self._logprobs.chat(req, delta.tokens) if req.logprobs else None,
                finish_reason=finish_reason,
                stop_reason=choice.stop_reason if finish_reason else None,
                token_ids=[t.token_id for t in delta.tokens] if req.return_token_ids else None,
            )
            out.append(ChatCompletionChunk(id=request_id, model=req.model, choices=[content]))
        return out

    def _delta(self, req: ChatCompletionRequest, choice: Choice, delta: Delta) -> tuple[DeltaMessage | None, str | None]:
        """What a delta adds to a streamed message (None: nothing), and its finish reason. A named
        function's arguments stream as they come, the first piece naming the call; the calls of
        tool_choice 'required' come whole once the array is complete; with 'auto', the tool-call
        parser decides (``_auto_tools_delta``). A reasoning model's thinking is split off first (and
        dropped where the request leaves it out: ``include_reasoning``)."""
        if choice.reasoning is not None:
            reasoning, answer = choice.reasoning.add(delta.text)
            if delta.finish_reason is not None:
                more_reasoning, more_answer = choice.reasoning.finish()
                reasoning, answer = reasoning + more_reasoning, answer + more_answer
            message, finish_reason = self._answer_delta(req, choice, replace(delta, text=answer))
            if reasoning and req.include_reasoning:
                message = (message or DeltaMessage()).model_copy(update={"reasoning": reasoning})
            return message, finish_reason
        return self._answer_delta(req, choice, delta)

    def _answer_delta(self, req: ChatCompletionRequest, choice: Choice, delta: Delta) -> tuple[DeltaMessage | None, str | None]:
        """``_delta`` past the thinking: the answer's text, tool calls and finish reason."""
        if choice.tool_stream is not None:
            return self._auto_tools_delta(choice, delta)
        if not req.forced_tools:
            return (DeltaMessage(content=delta.text) if delta.text else None), delta.finish_reason
        if isinstance(req.tool_choice, NamedToolChoice):
            if not delta.text:
                return None, delta.finish_reason
            first, choice.tool_calls_sent = not choice.tool_calls_sent, 1
            return DeltaMessage(tool_calls=[tools.named_call_piece(req, delta.text, first, self._new_id)]), delta.finish_reason
        if delta.finish_reason is None:
            return None, None
        message, finish_reason = self.message(req, choice)
        if message.tool_calls:
            return DeltaMessage(tool_calls=tools.as_deltas(message.tool_calls)), finish_reason
        return DeltaMessage(content=message.content or None), finish_reason

    def message(self, req: ChatCompletionRequest, choice: Choice) -> tuple[ChatResponseMessage, str | None]:
        """A finished choice's message and finish reason. With a forced tool_choice: the calls it
        made ('tool_calls' for 'required', 'stop' for a named function, as OpenAI and vLLM
        answer), or its text where it was cut short of a whole call. With 'auto': the content and
        calls the tool-call parser reads in its text ('tool_calls' if it made any). A reasoning
        model's thinking is split off first (and dropped where the request leaves it out)."""
        text, role = "".join(choice.text), self.role(req)
        reasoning, think = None, self._think_stream(choice.prompt.token_ids)
        if think is not None:
            reasoning, answer = think.split(text)
            text = answer or ""
            if not req.include_reasoning:
                reasoning = None
        if req.auto_tools:
            content, calls = self._request_parser(req).parse(text)
            message = ChatResponseMessage(role=role, content=content, reasoning=reasoning, tool_calls=calls)
            return message, "tool_calls" if calls else choice.finish_reason
        calls = tools.tool_calls(req, text, self._new_id) if req.forced_tools else None
        if calls is None:
            content = text if think is None else text or None
            return ChatResponseMessage(role=role, content=content, reasoning=reasoning), choice.finish_reason
        finish_reason = "tool_calls" if req.tool_choice == "required" else choice.finish_reason
        return ChatResponseMessage(role=role, reasoning=reasoning, tool_calls=calls), finish_reason

    @staticmethod
    def _auto_tools_delta(choice: Choice, delta: Delta) -> tuple[DeltaMessage | None, str | None]:
        """Content and the pieces of calls as the parser lets them go: a call's name first, then
        its arguments as the model writes them."""
        content, pieces = choice.tool_stream.add(delta.text)
        if delta.finish_reason is not None:
            rest, more = choice.tool_stream.finish()
            content, pieces = content + rest, pieces + more
        choice.tool_calls_sent += sum(p.id is not None for p in pieces)
        finish_reason = "tool_calls" if delta.finish_reason and choice.tool_calls_sent else delta.finish_reason
        if not (content or pieces):
            return None, finish_reason
        return DeltaMessage(content=content or None, tool_calls=pieces or None), finish_reason
