"""Log-probs in the response shapes of OpenAI and vLLM: a completion's text with its
``logprobs`` (the prompt's first, where it echoes them), a chat message's ``logprobs``, and
vLLM's ``prompt_logprobs``. A log-prob names its token by the token's text, or (vLLM's
``return_tokens_as_token_ids``: the request's, else the gateway's) as ``"token_id:{id}"``,
which no tokenizer can make ambiguous."""

from __future__ import annotations

from collections.abc import Callable

from baton.engine.sequence import Logprob, TokenLogprob
from baton.services.gateway.backend import BackendError
from baton.services.gateway.choice import Delta, Prompt
from baton.services.gateway.protocol import (
    BaseGenerationRequest, ChatCompletionRequest, ChatLogprobs, ChatLogprobToken, CompletionLogprobs,
    CompletionRequest, PromptLogprob, PromptLogprobs, TopLogprob,
)
from baton.services.gateway.tokenizer import GatewayTokenizer

MIN_LOGPROB = -9999.0     # what vLLM writes for a log-prob of -inf (which JSON cannot hold)


class LogprobFormatter:
    def __init__(self, tokenizer: GatewayTokenizer, return_tokens_as_token_ids: bool) -> None:
        """``return_tokens_as_token_ids``: the gateway's default, for requests that leave it out."""
        self.tokenizer = tokenizer
        self.return_tokens_as_token_ids = return_tokens_as_token_ids

    def completion_text(
        self, req: CompletionRequest, prompt: Prompt, deltas: list[Delta]
    ) -> tuple[str, CompletionLogprobs | None]:
        """The text of ``deltas`` (after the prompt's, where the request echoes it and they are the
        first), and their log-probs where the request asks for them."""
        echo = req.echo and bool(deltas) and deltas[0].first
        base = len(prompt.text) if req.echo else 0
        text = (prompt.text if echo else "") + "".join(d.text for d in deltas)
        if req.logprobs is None:
            return text, None
        out = CompletionLogprobs()
        if echo:
            scored = [None] + list(prompt.logprobs or [None] * (len(prompt.token_ids) - 1))
            for token_id, offset, lp in zip(prompt.token_ids, prompt.offsets, scored):
                self._append(req, out, token_id, offset, lp)
        for d in deltas:
            for token, offset in zip(d.tokens, d.offsets):
                self._append(req, out, token.token_id, base + offset, token)
        return text, out

    def _append(
        self, req: CompletionRequest, out: CompletionLogprobs, token_id: int, offset: int, lp: TokenLogprob | None
    ) -> None:
        token = self._token_name(req)
        out.tokens.append(token(token_id))
        out.text_offset.append(offset)
        out.token_logprobs.append(lp.logprob if lp is not None else None)
        out.top_logprobs.append({token(t): v for t, v in lp.top[: req.logprobs]} if lp is not None else None)

    def _token_name(self, req: BaseGenerationRequest) -> Callable[[int], str]:
        as_ids = req.return_tokens_as_token_ids
        if as_ids is None:
            as_ids = self.return_tokens_as_token_ids
        if as_ids:
            return lambda token_id: f"token_id:{token_id}"
        return self.tokenizer.token_text

    def prompt_entries(self, prompt: Prompt, k: int) -> PromptLogprobs:
        """vLLM's ``prompt_logprobs``: None for the first token; for each other, keyed by token id, the
        token itself (its rank: how many tokens are at least as likely) and its top-``k`` alternatives
        (ranks 1 to ``k``), each with its log-prob and text."""
        scored = prompt.logprobs or []
        if len(scored) != len(prompt.token_ids) - 1:
            raise BackendError(f"a worker scored {len(scored)} of the prompt's {len(prompt.token_ids) - 1} tokens "
                               "after its first", 502)

        def entry(token_id: int, lp: Logprob) -> PromptLogprob:
            return PromptLogprob(logprob=max(lp.logprob, MIN_LOGPROB), rank=lp.rank, decoded_token=self.tokenizer.token_text(token_id))

        entries: PromptLogprobs = [None]
        entries += [{str(token_id): entry(token_id, e) for token_id, e in lp.ranked(k).items()} for lp in scored]
        return entries

    def chat(self, req: ChatCompletionRequest, tokens: list[TokenLogprob]) -> ChatLogprobs:
        """A chat message's (or a streamed piece's) ``logprobs`` for its ``tokens``."""
        tok, token = self.tokenizer, self._token_name(req)
        return ChatLogprobs(
            content=[
                ChatLogprobToken(
                    token=token(t.token_id), logprob=t.logprob, bytes=tok.token_bytes(t.token_id),
                    top_logprobs=[TopLogprob(token=token(i), logprob=v, bytes=tok.token_bytes(i)) for i, v in t.top],
                )
                for t in tokens
            ]
        )
