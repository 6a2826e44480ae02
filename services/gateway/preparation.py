"""A request's preparation, before any backend: its prompts tokenized (the chat template for chat,
truncated as it asks), checked against the context length and the vocabulary, its sampling
parameters built with the model's defaults (``sampling_defaults``), and its fan-out into one
``Choice`` per sample, each with the backend sequence it sends (``serving.py`` has the order).
Every refusal is an ``APIError`` naming the request's parameter."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from baton.engine.model_config import load_model_config
from baton.engine.request_checks import truncated_prompt
from baton.engine.sampling_params import SamplingParams, bad_word_sequences
from baton.services.gateway import sampling_defaults, tools
from baton.services.gateway.backend import GenerationRequest
from baton.services.gateway.choice import Choice, Prompt
from baton.services.gateway.config import GatewayConfig
from baton.services.gateway.protocol import (
    APIError, BaseGenerationRequest, ChatCompletionRequest, EmbeddingRequest, ScoringRequest, TokenizeRequest,
)
from baton.services.gateway.tokenizer import (
    ChatTemplateError, GatewayTokenizer, IncrementalDetokenizer, StopStringMatcher,
)

logger = logging.getLogger(__name__)


class RequestPreparer:
    """Prompts, parameters and choices of requests for the model in ``config.model_dir``."""

    def __init__(self, config: GatewayConfig, tokenizer: GatewayTokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        model_config = load_model_config(Path(config.model_dir))
        # --max-model-len, else the engine's default: the model's max_position_embeddings (or its fallback)
        self.max_model_len = (config.max_model_len if config.max_model_len is not None
                              else model_config.max_position_embeddings)
        self.eos_token_ids = frozenset(model_config.eos_token_ids)
        self.generation_defaults = sampling_defaults.load(config.model_dir, config.generation_config,
                                                          config.override_generation_config)
        sampling_defaults.log_defaults(self.generation_defaults)

    @property
    def logprob_limit(self) -> int:
        """The most log-probs a request may ask for a token (``--max-logprobs``; -1: the vocabulary)."""
        return self.tokenizer.vocab_size if self.config.max_logprobs == -1 else self.config.max_logprobs

    def logprobs(self, k: int | None, kind: str, param: str) -> int | None:
        """A request's log-probs a token (-1: the whole vocabulary, as vLLM reads it), checked as vLLM
        checks them (and in its words) against ``--max-logprobs``."""
        if k == -1:
            k = self.tokenizer.vocab_size
        limit = self.logprob_limit
        if k is not None and k > limit:
            raise APIError(f"Requested {kind} logprobs of {k}, which is greater than max allowed: {limit}", param=param)
        return k

    def prompt_logprobs(self, req: BaseGenerationRequest) -> int | None:
        """How many alternatives come with each prompt token's log-prob (vLLM's ``prompt_logprobs``);
        None: not asked for, or a stream (which has no place for them). -1 asks for the whole
        vocabulary."""
        if req.stream:
            return None
        return self.logprobs(req.prompt_logprobs, "prompt", "prompt_logprobs")

    def chat_token_ids(self, req: ChatCompletionRequest | TokenizeRequest, add_special_tokens: bool = False) -> list[int]:
        """The messages through the chat template, as token ids; the tokenizer's special tokens (the
        BOS) added around the template's text only where asked (a template writes its own)."""
        if req.continue_final_message and (not req.messages or req.messages[-1].role != "assistant"):
            raise APIError("continue_final_message continues an assistant message: the last message must be one",
                           param="continue_final_message")
        if req.chat_template is not None and not self.config.trust_request_chat_template:
            raise APIError("Chat template is passed with request, but --trust-request-chat-template is not set. "
                           "Refused request with untrusted chat template.", param="chat_template")
        try:
            return self.tokenizer.encode_chat(
                [m.template_dict() for m in req.messages or []],
                add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
                template_kwargs=req.chat_template_kwargs,
                tools=req.template_tools,
                chat_template=req.chat_template,
                documents=req.documents,
                add_special_tokens=add_special_tokens,
            )
        except ChatTemplateError as exc:
            raise APIError(str(exc), param="messages" if req.chat_template is None else "chat_template") from exc

    def token_ids(self, prompt: str | list[int] | list[str] | list[list[int]], param: str,
                  add_special_tokens: bool = True) -> list[list[int]]:
        """A completion's prompts (or an embedding request's inputs) as token ids, each text with the
        tokenizer's special tokens unless told not to (token ids are taken as they are)."""
        if isinstance(prompt, str):
            return [self.tokenizer.encode(prompt, add_special_tokens)]
        if all(isinstance(p, int) for p in prompt):
            batch = [list(prompt)]
        else:
            batch = [self.tokenizer.encode(p, add_special_tokens) if isinstance(p, str) else list(p) for p in prompt]
        vocab = self.tokenizer.vocab_size
        if any(not 0 <= t < vocab for ids in batch for t in ids):
            raise APIError(f"token ids must be in [0, {vocab})", param=param)
        return batch

    def truncate(self, req: BaseGenerationRequest | EmbeddingRequest | ScoringRequest, token_ids: list[int],
                 output_limit: int | None = None) -> list[int]:
        """The prompt as the request's ``truncate_prompt_tokens`` keeps it (``truncated_prompt``)."""
        try:
            return truncated_prompt(token_ids, req.truncate_prompt_tokens, self.max_model_len, output_limit)
        except ValueError as exc:
            raise APIError(str(exc), param="truncate_prompt_tokens") from exc

    def prompt(self, token_ids: list[int], with_text: bool) -> Prompt:
        prompt = Prompt(token_ids)
        if with_text:  # echo: the prompt's text and each token's offset in it
            detok = IncrementalDetokenizer(self.tokenizer, [])
            for t in token_ids:
                prompt.offsets.append(len(prompt.text))
                prompt.text += detok.add(t)
            prompt.text += detok.flush()
        return prompt

    def params(
        self, req: BaseGenerationRequest, prompts: list[Prompt], limit: int | None, limit_param: str, prompt_param: str
    ) -> SamplingParams:
        longest = max(len(p.token_ids) for p in prompts)
        if longest >= self.max_model_len:
            raise APIError(
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has {longest}.",
                param=prompt_param,
            )
        limit = sampling_defaults.capped(limit, self.generation_defaults)
        if limit is not None and longest + limit > self.max_model_len:
            raise APIError(
                f"This model's maximum context length is {self.max_model_len} tokens; you requested "
                f"{longest + limit} ({longest} in the prompt, {limit} for the completion).",
                param=limit_param,
            )
        vocab, logit_bias = self.tokenizer.vocab_size, req.token_logit_bias
        if any(t >= vocab for t in logit_bias):
            raise APIError(f"logit_bias token ids must be in [0, {vocab})", param="logit_bias")
        if any(not 0 <= t < vocab for t in req.stop_token_ids):
            raise APIError(f"stop_token_ids must be in [0, {vocab})", param="stop_token_ids")
        if any(not 0 <= t < vocab for t in req.allowed_token_ids or ()):
            raise APIError(f"allowed_token_ids must be in [0, {vocab})", param="allowed_token_ids")
        forced_tools = isinstance(req, ChatCompletionRequest) and req.forced_tools
        structured_output = tools.grammar(req) if forced_tools else req.structured_output
        try:
            return SamplingParams(
                max_tokens=limit if limit is not None else sampling_defaults.default_limit(self.max_model_len - longest,
                                                                                            self.generation_defaults),
                min_tokens=req.min_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                min_p=req.min_p, repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty, seed=req.seed, stop_token_ids=list(req.stop_token_ids),
                ignore_eos=req.ignore_eos, logit_bias=logit_bias, structured_output=structured_output,
                allowed_token_ids=req.allowed_token_ids, bad_words_token_ids=bad_word_sequences(
                    req.bad_words, lambda text: self.tokenizer.encode(text, add_special_tokens=False)),
            )
        except ValueError as exc:
            raise APIError(str(exc)) from exc

    def choices(
        self, request_id: str, prompts: list[Prompt], params: SamplingParams, req: BaseGenerationRequest,
        lora: str | None, kept: frozenset[int] = frozenset(),
    ) -> list[Choice]:
        """One choice per sample of each prompt, each a backend sequence under LoRA adapter ``lora``,
        its text keeping the special tokens in ``kept`` (the markers a parser reads), its output left
        out where the request scores the prompt alone (``prompt_only``)."""
        choices = []
        for p, prompt in enumerate(prompts):
            self.log_request(f"{request_id}-{p * req.n}", prompt.token_ids, params, lora)
            for i in range(req.n):
                index = p * req.n + i
                seed = None if params.seed is None else (params.seed + i) % 2**64   # the engine's seed + i, on the wire
                scored = params.prompt_logprobs if i == 0 else None   # the prompt's log-probs: its first sample's
                gen = GenerationRequest(f"{request_id}-{index}", prompt.token_ids,
                                        replace(params, seed=seed, prompt_logprobs=scored), priority=req.priority,
                                        lora=lora, cache_salt=req.cache_salt, stream_each_token=bool(req.stop_strings))
                detok = IncrementalDetokenizer(self.tokenizer, prompt.token_ids, req.skip_special_tokens, kept)
                stop = StopStringMatcher(req.stop_strings, include=req.include_stop_str_in_output)
                choices.append(Choice(index, i, prompt, gen, detok, stop, eos_token_ids=self.eos_token_ids,
                                      prompt_only=req.prompt_only))
        return choices

    def log_request(self, request_id: str, token_ids: list[int], params: SamplingParams | None, lora: str | None) -> None:
        """vLLM's ``--enable-log-requests`` line for a prompt (its first sample's id): the prompt, its
        token ids (each cut to ``--max-log-len`` characters / ids), the sampling parameters, the adapter."""
        if not self.config.enable_log_requests:
            return
        cap = self.config.max_log_len
        text = self.tokenizer.decode(token_ids)
        logger.info("request %s: prompt %r, prompt_token_ids %s, params %s, lora %s", request_id, text[:cap],
                    token_ids[:cap], params, lora)

    def embedding_inputs(self, texts: str | list, req: EmbeddingRequest | ScoringRequest, param: str,
                         add_special_tokens: bool = True) -> list[list[int]]:
        """Texts (or token ids) to embed as token ids (``token_ids``), truncated as the request asks;
        each must fit the context."""
        inputs = [self.truncate(req, ids) for ids in self.token_ids(texts, param, add_special_tokens)]
        longest = max(len(ids) for ids in inputs)
        if longest >= self.max_model_len:   # as a prompt: the engine keeps one position past it
            raise APIError(f"This model's maximum context length is {self.max_model_len} tokens; an input has {longest}.",
                           param=param)
        return inputs
