"""OpenAI completions and chat completions over an abstract ``Backend``.

A request passes through: validated (protocol.py) -> the model's sampling defaults for the
fields it left out (``sampling_defaults``) -> tokenized (chat template for chat) -> checked
against the context length -> fanned out into one backend sequence per choice (``n`` per prompt;
ids ``f"{id}-{suffix}-{i}"``, seeds ``seed + i``); those three in ``preparation.RequestPreparer``
-> started (a prompt's later samples beside its first once that one decodes, ``ChoiceRunner.merge``;
with ``use_beam_search``, its ``n`` best beams instead, ``beam_search``)
-> each choice's chunks are detokenized and stop-string matched (``Choice``)
-> merged into one response, or into SSE chunks when streaming (``choice_runner``; log-probs
in ``logprobs``).

``model`` names the base model (``served_model_name``) or one of the LoRA adapters the
workers load (``lora_modules``, vLLM's ``--lora-modules``, and those loaded since through vLLM's
``/v1/load_lora_adapter``): each backend sequence carries the adapter's name. An adapter is
served once every worker has loaded it, and no longer from the moment its unload starts (back
if the unload fails). Embeddings and scores come from the base model only. A request's
``cache_salt`` (vLLM's) goes with each of its backend sequences (all ``n`` samples share it).
vLLM's dev-mode ``/reset_prefix_cache`` resets every worker's prefix cache, answering as vLLM does.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
import uuid
from dataclasses import replace

from pydantic import ValidationError

from baton.services.gateway import beam_search, metrics, response_store, responses, sampling_defaults, scoring
from baton.services.gateway.backend import Backend, BackendError, EmbedRequest, EmbedResult
from baton.services.gateway.chat_output import ChatOutput
from baton.services.gateway.choice import Choice, Delta
from baton.services.gateway.choice_runner import ChoiceRunner, usage
from baton.services.gateway.config import GatewayConfig
from baton.services.gateway.logprobs import LogprobFormatter
from baton.services.gateway.preparation import RequestPreparer
from baton.services.gateway.protocol import (
    APIError, BaseGenerationRequest, ChatChoice, ChatCompletionRequest, ChatCompletionResponse, CompletionChoice,
    CompletionRequest, CompletionResponse, DetokenizeRequest, DetokenizeResponse, EmbeddingData, EmbeddingRequest,
    EmbeddingResponse, EmbeddingUsage, LoadLoRAAdapterRequest, ModelCard, ModelList, PromptLogprobs, RerankRequest,
    RerankResponse, ResponseDeleted, ResponseObject, ResponsesRequest, ScoreRequest, ScoreResponse, ScoringRequest,
    TokenizeRequest, TokenizeResponse, UnloadLoRAAdapterRequest,
)
from baton.services.gateway.streaming import PrimedStream, as_api_error
from baton.services.gateway.tokenizer import GatewayTokenizer

class OpenAIServing:
    """The completion and chat handlers; depends only on the abstract ``Backend``."""

    def __init__(self, config: GatewayConfig, backend: Backend, tokenizer: GatewayTokenizer) -> None:
        self.config = config
        self.backend = backend
        self.tokenizer = tokenizer
        self._logprobs = LogprobFormatter(tokenizer, config.return_tokens_as_token_ids)
        self._runner = ChoiceRunner(backend, config.block_size, config.enable_force_include_usage)
        self.prep = RequestPreparer(config, tokenizer)
        self._chat = ChatOutput(tokenizer, config.reasoning_parser, config.tool_call_parser, self._logprobs,
                                config.response_role)
        self.response_store = response_store.for_config(config)
        self._start_loras = dict(config.lora_modules)   # --lora-modules still served: name -> directory
        self._lora_updates = asyncio.Lock()             # one load or unload at a time

    @property
    def loras(self) -> dict[str, str]:
        """The LoRA adapters served, name: directory: those of ``--lora-modules`` not unloaded, then
        those loaded while serving (through this gateway or another)."""
        return {**self._start_loras, **self.backend.runtime_loras()}

    def models(self) -> ModelList:
        """The base model under each of its names, then each LoRA adapter (``root``: its directory,
        ``parent``: the base), as vLLM lists them."""
        base = self.config.served_model_name
        names = [ModelCard(id=name, root=self.config.model_dir, max_model_len=self.prep.max_model_len)
                 for name in self.config.served_model_names]
        adapters = [ModelCard(id=name, root=path, parent=base, max_model_len=self.prep.max_model_len)
                    for name, path in self.loras.items()]
        return ModelList(data=[*names, *adapters])

    async def load_lora_adapter(self, req: LoadLoRAAdapterRequest) -> str:
        """vLLM's ``/v1/load_lora_adapter``: every worker loads the adapter (or none does, and the
        reason is the error), then requests may name it."""
        name = req.lora_name
        async with self._lora_updates:
            if name in self.config.served_model_names:
                raise APIError(f"The lora adapter '{name}' takes the name of the served model.", param="lora_name")
            if name in self.loras:
                raise APIError(f"The lora adapter '{name}' has already been loaded.", param="lora_name")
            await self.backend.load_lora(name, req.lora_path)
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload_lora_adapter(self, req: UnloadLoRAAdapterRequest) -> str:
        """vLLM's ``/v1/unload_lora_adapter``: requests may no longer name the adapter, and every
        worker unloads it (or none does: a worker refuses while requests run under it)."""
        name = req.lora_name
        async with self._lora_updates:
            if name not in self.loras:
                raise APIError(f"The lora adapter '{name}' cannot be found.", status=404, param="lora_name",
                               type="not_found_error")
            path = self._start_loras.pop(name, None)
            try:
                await self.backend.unload_lora(name)
            except BaseException:
                if path is not None:
                    self._start_loras[name] = path
                raise
        return f"Success: LoRA adapter '{name}' removed successfully."

    async def reset_prefix_cache(self) -> None:
        """vLLM's ``/reset_prefix_cache``: every worker drops its cached blocks. Where one does not,
        vLLM's 409 ``Prefix cache reset failed.``, followed here by the workers' reasons."""
        try:
            await self.backend.reset_prefix_cache()
        except BackendError as exc:
            raise APIError(f"Prefix cache reset failed. {exc.message}", status=409, type="Conflict") from exc

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        """The token ids a completion (``prompt``) or a chat completion (``messages``) would send."""
        self._check_model(req.model)
        if req.prompt is not None:
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
        else:
            ids = self.prep.chat_token_ids(req, bool(req.add_special_tokens))
        strs = [self.tokenizer.token_piece(t) for t in ids] if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.prep.max_model_len, tokens=ids, token_strs=strs)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self._check_model(req.model)
        if any(not 0 <= t < self.tokenizer.vocab_size for t in req.tokens):
            raise APIError(f"token ids must be in [0, {self.tokenizer.vocab_size})", param="tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens))

    # ---- entry points -------------------------------------------------------

    async def create_completion(self, req: CompletionRequest) -> CompletionResponse | PrimedStream:
        arrival = time.perf_counter()
        lora = self._check_common(req)
        req = sampling_defaults.with_defaults(req, self.prep.generation_defaults)
        limit = 1 if req.prompt_only else req.max_tokens
        prompts = [self.prep.prompt(self.prep.truncate(req, ids, limit), with_text=req.echo)
                   for ids in self.prep.token_ids(req.prompt, "prompt", req.add_special_tokens)]
        params = self.prep.params(req, prompts, limit, "max_tokens", "prompt")
        sample_k = self.prep.logprobs(req.logprobs, "sample", "logprobs")
        prompt_k = self.prep.prompt_logprobs(req)
        # echo with logprobs scores the prompt too: both from one computation, with the larger top-k
        wanted = [k for k in (sample_k if req.echo else None, prompt_k) if k is not None]
        params = replace(params, logprobs=sample_k, prompt_logprobs=max(wanted, default=None))
        request_id = f"cmpl-{req.request_id or uuid.uuid4().hex}"
        choices = self.prep.choices(worker_request_id(request_id), prompts, params, req, lora)
        runner = self._runner_for(req, choices)
        if req.stream:
            return await PrimedStream.start(runner.stream(req, request_id, choices, self._completion_chunks, arrival))
        deltas = await runner.collect(choices, arrival)
        # Once per prompt: its n samples (choice p * n + i) share it.
        scored = [None if prompt_k is None else self._logprobs.prompt_entries(p, prompt_k) for p in prompts]
        return CompletionResponse(
            id=request_id,
            model=req.model,
            choices=[self._completion_choice(req, c, deltas[c.index], scored[c.index // req.n]) for c in choices],
            usage=usage(choices),
        )

    async def create_chat_completion(self, req: ChatCompletionRequest) -> ChatCompletionResponse | PrimedStream:
        arrival = time.perf_counter()
        lora = self._check_common(req)
        req = sampling_defaults.with_defaults(req, self.prep.generation_defaults)
        ids = self.prep.truncate(req, self.prep.chat_token_ids(req, req.add_special_tokens), req.output_limit)
        limit_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        prompts = [self.prep.prompt(ids, with_text=False)]
        params = self.prep.params(req, prompts, req.output_limit, limit_param, "messages")
        sample_k = self.prep.logprobs(req.top_logprobs, "sample", "top_logprobs")
        prompt_k = self.prep.prompt_logprobs(req)
        params = replace(params, logprobs=(sample_k or 0) if req.logprobs else None, prompt_logprobs=prompt_k)
        params = self._chat.bind_grammar_to_answer(params, ids)
        request_id = f"chatcmpl-{req.request_id or uuid.uuid4().hex}"
        choices = self.prep.choices(worker_request_id(request_id), prompts, params, req, lora,
                                    kept=self._chat.kept_tokens(req))
        self._chat.attach_parsers(req, choices)
        runner = self._runner_for(req, choices)
        if req.stream:
            return await PrimedStream.start(runner.stream(req, request_id, choices, self._chat.chunks, arrival))
        deltas = await runner.collect(choices, arrival)
        echoed = self._chat.echoed(req)
        return ChatCompletionResponse(
            id=request_id,
            model=req.model,
            choices=[
                ChatChoice(
                    index=c.index,
                    message=message.model_copy(update={"content": echoed + (message.content or "")}) if echoed else message,
                    logprobs=self._logprobs.chat(req, [t for d in deltas[c.index] for t in d.tokens]) if req.logprobs else None,
                    finish_reason=finish_reason,
                    stop_reason=c.stop_reason,
                    token_ids=[t.token_id for d in deltas[c.index] for t in d.tokens] if req.return_token_ids else None,
                )
                for c in choices
                for message, finish_reason in [self._chat.message(req, c)]
            ],
            usage=usage(choices),
            prompt_logprobs=None if prompt_k is None else self._logprobs.prompt_entries(choices[0].prompt, prompt_k),
            prompt_token_ids=ids if req.return_token_ids else None,
        )

    async def create_response(self, req: ResponsesRequest) -> ResponseObject | PrimedStream:
        """A Responses API request, answered as the chat completion it makes (see ``responses``),
        with the model's defaults for what it left out (its answer echoes them)."""
        req = sampling_defaults.with_defaults(req, self.prep.generation_defaults)
        if not self.config.responses_store_mb:
            req = req.model_copy(update={"store": False})
        req = await self._with_history(req)

        async def keep(response: ResponseObject) -> bool:
            """Store the answer where the request asks; whether it is stored."""
            return req.store and await self.response_store.put(response, req.input_items())

        try:
            chat = req.chat_request()
        except ValidationError as exc:
            first = exc.errors()[0]
            param = responses.field_name(str(first["loc"][0])) if first.get("loc") else None
            raise APIError(f"{param}: {first['msg']}" if param else first["msg"], param=param) from exc
        response_id = responses.new_response_id()
        try:
            result = await self.create_chat_completion(chat)
        except APIError as exc:
            exc.param = responses.field_name(exc.param)
            raise
        if isinstance(result, PrimedStream):
            return await PrimedStream.start(responses.stream_events(req, response_id, result, keep))
        response = responses.from_chat(req, response_id, result)
        response.store = await keep(response)
        return response

    async def _with_history(self, req: ResponsesRequest) -> ResponsesRequest:
        """``req`` as the conversation its ``previous_response_id`` closes, then its own input."""
        if req.previous_response_id is None:
            return req
        stored = await self.response_store.get(req.previous_response_id)
        if stored is None:
            raise APIError(f"Previous response with id '{req.previous_response_id}' not found.", status=404,
                           param="previous_response_id", type="not_found_error")
        return req.model_copy(update={"input": [*stored.conversation, *req.input_items()]})

    async def stored_response(self, response_id: str) -> ResponseObject:
        """``GET /v1/responses/{id}``: a stored response."""
        stored = await self.response_store.get(response_id)
        if stored is None:
            raise APIError(f"Response with id '{response_id}' not found.", status=404, type="not_found_error")
        return stored.response

    async def delete_response(self, response_id: str) -> ResponseDeleted:
        """``DELETE /v1/responses/{id}``."""
        if not await self.response_store.delete(response_id):
            raise APIError(f"Response with id '{response_id}' not found.", status=404, type="not_found_error")
        return ResponseDeleted(id=response_id)

    async def create_embedding(self, req: EmbeddingRequest) -> EmbeddingResponse:
        """Each input's embedding, computed on the prefill workers (all inputs at once)."""
        arrival = time.perf_counter()
        self._check_model(req.model, base_only=True)
        inputs = self.prep.embedding_inputs(req.input, req, "input", req.add_special_tokens)
        results = await self._embed(worker_request_id(f"embd-{req.request_id or uuid.uuid4().hex}"), inputs, req, arrival)
        prompt_tokens = sum(r.prompt_tokens for r in results)
        return EmbeddingResponse(
            data=[EmbeddingData(index=i, embedding=_encode_embedding(r.embedding, req.encoding_format))
                  for i, r in enumerate(results)],
            model=req.model,
            usage=EmbeddingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
        )

    async def create_score(self, req: ScoreRequest) -> ScoreResponse:
        """vLLM's /score: each pair's cosine similarity (``scoring``), from one batch of embeddings."""
        request_id, scores, prompt_tokens = await self._similarities("score", req, (req.text_1, "text_1"),
                                                                     (req.text_2, "text_2"))
        return scoring.score_response(request_id, self.config.served_model_name, scores, prompt_tokens)

    async def create_rerank(self, req: RerankRequest) -> RerankResponse:
        """vLLM's /rerank: the documents by their cosine similarity to the query."""
        request_id, scores, prompt_tokens = await self._similarities("rerank", req, ([req.query], "query"),
                                                                     (req.documents, "documents"))
        return scoring.rerank_response(req, request_id, self.config.served_model_name, scores, prompt_tokens)

    async def _similarities(
        self, kind: str, req: ScoreRequest | RerankRequest, first: tuple[list[str], str], second: tuple[list[str], str]
    ) -> tuple[str, list[float], int]:
        """The request id, each pair's score of the ``first`` texts against the ``second`` (each
        given with its parameter's name) and the prompt tokens embedded: every text once."""
        arrival = time.perf_counter()
        self._check_model(req.model, base_only=True)
        inputs = [self.prep.embedding_inputs(texts, req, param) for texts, param in (first, second)]
        request_id = f"{kind}-{uuid.uuid4().hex}"
        results = await self._embed(request_id, inputs[0] + inputs[1], req, arrival)
        scores = scoring.similarities([r.embedding for r in results], len(inputs[0]))
        return request_id, scores, sum(r.prompt_tokens for r in results)

    async def _embed(
        self, request_id: str, inputs: list[list[int]], req: EmbeddingRequest | ScoringRequest, arrival: float,
    ) -> list[EmbedResult]:
        """Each input's embedding, computed on the prefill workers (all inputs at once, ids
        ``f"{request_id}-{i}"``, with ``req``'s priority and cache salt); metered as one request."""
        tracker, status = metrics.RequestMetrics(arrival), "error"
        for i, ids in enumerate(inputs):
            self.prep.log_request(f"{request_id}-{i}", ids, None, None)
        try:
            try:
                async with asyncio.TaskGroup() as group:   # one failure cancels the rest
                    tasks = [group.create_task(self.backend.embed(
                                 EmbedRequest(f"{request_id}-{i}", ids, req.priority, req.cache_salt)))
                             for i, ids in enumerate(inputs)]
            except* (APIError, BackendError) as errors:
                raise as_api_error(errors.exceptions[0]) from None
            status = "success"
        except asyncio.CancelledError:     # the client went away (a bare one: it is not grouped)
            status = "aborted"
            raise
        finally:
            tracker.finish(status)
        results = [t.result() for t in tasks]
        for r in results:
            metrics.record_prompt(r.prompt_tokens, r.cached_tokens)
        return results

    # ---- request preparation ------------------------------------------------

    def _check_model(self, model: str, base_only: bool = False) -> str | None:
        """The LoRA adapter ``model`` names (None: the base model). 404 for a model not served here;
        400 for an adapter where only the base model serves (``base_only``: embeddings, scores)."""
        if model == self.config.served_model_name:
            return None
        if model not in self.loras:
            raise APIError(f"The model `{model}` does not exist.", status=404, param="model", code="model_not_found")
        if base_only:
            raise APIError(f"`{model}` is a LoRA adapter: this endpoint serves the base model "
                           f"`{self.config.served_model_name}` only", param="model")
        return model

    def _check_common(self, req: BaseGenerationRequest) -> str | None:
        """``_check_model``'s adapter, once the request's other common fields are checked."""
        lora = self._check_model(req.model)
        if req.n > self.config.max_n:
            raise APIError(f"n must be at most {self.config.max_n}, got {req.n}", param="n")
        if req.use_beam_search:   # before the model's defaults, which it does not follow
            beam_search.check_request(req, self.prep.logprob_limit)
        if isinstance(req, ChatCompletionRequest) and req.auto_tools and self._chat.tool_parser is None:
            raise APIError("tool_choice 'auto' (the default with tools) reads the model's own tool-call format: start the "
                           "gateway with --tool-call-parser, or use tool_choice 'required', a named function or 'none'",
                           param="tool_choice")
        return lora

    def _runner_for(self, req: BaseGenerationRequest, choices: list[Choice]) -> ChoiceRunner:
        """What runs the choices: the backend, or a beam search over it (``n`` beams a prompt)."""
        if not req.use_beam_search:
            return self._runner
        return self._runner.over(beam_search.BeamSearch(self.backend, choices, req.n, req.length_penalty,
                                                        self.config.block_size))

    # ---- formatting ---------------------------------------------------------

    def _completion_chunks(self, req: CompletionRequest, request_id: str, choice: Choice, delta: Delta) -> list[CompletionResponse]:
        text, logprobs = self._logprobs.completion_text(req, choice.prompt, [delta])
        ids = req.return_token_ids
        if not (text or delta.finish_reason or (logprobs and logprobs.tokens)
                or (ids and (delta.tokens or delta.first))):
            return []
        out = CompletionChoice(index=delta.index, text=text, logprobs=logprobs, finish_reason=delta.finish_reason,
                               stop_reason=delta.stop_reason,
                               prompt_token_ids=choice.prompt.token_ids if ids and delta.first else None,
                               token_ids=[t.token_id for t in delta.tokens] if ids else None)
        return [CompletionResponse(id=request_id, model=req.model, choices=[out])]

    def _completion_choice(
        self, req: CompletionRequest, choice: Choice, deltas: list[Delta], scored: PromptLogprobs | None
    ) -> CompletionChoice:
        text, logprobs = self._logprobs.completion_text(req, choice.prompt, deltas)
        ids = req.return_token_ids
        return CompletionChoice(index=choice.index, text=text, logprobs=logprobs, finish_reason=choice.finish_reason,
                                stop_reason=choice.stop_reason, prompt_logprobs=scored,
                                prompt_token_ids=choice.prompt.token_ids if ids else None,
                                token_ids=[t.token_id for d in deltas for t in d.tokens] if ids else None)


def worker_request_id(request_id: str) -> str:
    """The workers' name for a request: its response's id and a random suffix, as requests in
    flight at once may share an id the client chose (vLLM's rule since vllm-project/vllm#27987)."""
    return f"{request_id}-{uuid.uuid4().hex[:8]}"


def _encode_embedding(values: list[float], encoding_format: str) -> list[float] | str:
    """As OpenAI sends it: a list of floats, or base64 of their float32 bytes (little-endian)."""
    if encoding_format == "float":
        return values
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")
