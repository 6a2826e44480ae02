"""The OpenAI gateway over a fake backend: request validation and errors, streaming
vs non-streaming, stop strings, n > 1, logprobs, echo, chat templates, aborts,
admission, auth, draining, metrics, and the official ``openai`` client against a
real uvicorn."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from baton.engine.sampling_params import StructuredOutputParams
from baton.engine.sequence import TokenLogprob
from baton.services.gateway import app as app_module, tools
from baton.services.gateway.__main__ import build_parser, config_from_args
from baton.services.gateway.app import create_app
from baton.services.gateway.backend import (
    Backend, BackendError, EmbedRequest, EmbedResult, GenerationChunk, GenerationRequest,
)
from baton.services.gateway.config import GatewayConfig
from baton.services.gateway.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from baton.services.gateway.serving import OpenAIServing
from baton.services.gateway.tokenizer import GatewayTokenizer

from conftest import DEMO_MODEL, marked_tokenizer

pytestmark = pytest.mark.unit

MODEL = "shakespeare"
PERSON = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
SCRIPTS = [
    "O Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father 日本 and refuse thy name;",
    "But, soft! what light through yonder window breaks? It is the east.",
]


QUEUED_S, PREFILL_S = 0.125, 0.5   # each sequence's wait in a worker's queue and prefill, as FakeBackend says


class FakeBackend(Backend):
    """Deterministic output from the demo tokenizer's vocabulary; records every
    request and every sequence closed before it finished (an abort)."""

    def __init__(
        self, tok: GatewayTokenizer, per_chunk: int = 3, delay: float = 0.0, cached_tokens: int = 5,
        error: BackendError | None = None, fail_after: int | None = None,
    ) -> None:
        self.tok = tok
        self.per_chunk = per_chunk
        self.delay = delay
        self.cached_tokens = cached_tokens
        self.error = error
        self.fail_after = fail_after
        self.requests: list[GenerationRequest] = []
        self.embeds: list[EmbedRequest] = []
        self.events: list[tuple[str, str]] = []   # ("start" | "chunk", request id), in order
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.is_ready = True
        self.first_chunk_sent = asyncio.Event()

    def output_ids(self, request: GenerationRequest) -> list[int]:
        """The script of the request's choice: the last number of its id (a beam step's
        ``{choice id}-s{step}-b{beam}`` keeps its choice's)."""
        choice = int(next(part for part in reversed(request.request_id.split("-")) if part.isdigit()))
        return self.tok.encode(SCRIPTS[choice % len(SCRIPTS)])[1:]

    def logprob(self, request: GenerationRequest, position: int, token_id: int) -> TokenLogprob:
        k = request.params.logprobs or 0
        lp = -0.25 * (position % 7) - 0.01
        top = [((token_id + j) % self.tok.vocab_size, lp - j) for j in range(k)]
        return TokenLogprob(token_id, lp, top)

    def prompt_logprob(self, request: GenerationRequest, position: int, token_id: int) -> TokenLogprob:
        """Prompt token ``position + 1``: ranked ``position % 3 + 1``, and among its top-k
        alternatives (the request's ``prompt_logprobs``) where that rank is within them."""
        rank, vocab = position % 3 + 1, self.tok.vocab_size
        top = [(token_id if j == rank else (token_id + 100 + j) % vocab, -0.5 * j) for j in range(1, request.params.prompt_logprobs + 1)]
        return TokenLogprob(token_id, -0.5 * rank, top, rank)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self.requests.append(request)
        self.events.append(("start", request.request_id))
        if self.error is not None:
            raise self.error
        out = self.output_ids(request)[: request.params.max_tokens]
        finish = "length" if len(out) == request.params.max_tokens else "stop"
        try:
            for start in range(0, len(out), self.per_chunk):
                if self.fail_after is not None and start >= self.fail_after:
                    raise BackendError("decode worker 127.0.0.1:1 went away", 503)
                await asyncio.sleep(self.delay)
                ids = out[start : start + self.per_chunk]
                chunk = GenerationChunk(tokens=[self.logprob(request, start + i, t) for i, t in enumerate(ids)])
                if start == 0:
                    chunk.prompt_tokens = len(request.prompt_token_ids)
                    chunk.cached_tokens = self.cached_tokens
                    chunk.placement = ("prefill-of", request.request_id)
                    chunk.queued_seconds, chunk.prefill_seconds = QUEUED_S, PREFILL_S
                    if request.params.prompt_logprobs is not None:
                        chunk.prompt_logprobs = [
                            self.prompt_logprob(request, i, t) for i, t in enumerate(request.prompt_token_ids[1:])
                        ]
                if start + self.per_chunk >= len(out):
                    chunk.finish_reason = finish
                self.events.append(("chunk", request.request_id))
                yield chunk
                self.first_chunk_sent.set()
            self.finished.append(request.request_id)
        finally:
            if request.request_id not in self.finished:
                self.aborted.append(request.request_id)

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        self.embeds.append(request)
        if self.error is not None:
            raise self.error
        ids = request.prompt_token_ids
        return EmbedResult(self.vector(ids), len(ids), self.cached_tokens)

    @staticmethod
    def vector(ids: list[int]) -> list[float]:
        """A unit vector made from the prompt's tokens."""
        raw = [float(len(ids)), float(sum(ids) % 97), float(ids[0]), float(ids[-1])]
        norm = sum(v * v for v in raw) ** 0.5
        return [v / norm for v in raw]

    async def reachable(self) -> dict[str, int]:
        return {"prefill": 2, "decode": int(self.is_ready)}


@pytest.fixture(scope="module")
def tok() -> GatewayTokenizer:
    return GatewayTokenizer(DEMO_MODEL)


def make_config(**overrides: object) -> GatewayConfig:
    return GatewayConfig(model_dir=str(DEMO_MODEL), served_model_name=MODEL, **overrides)


def client_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")


async def post(backend: Backend, tok: GatewayTokenizer, path: str, body: object, config: GatewayConfig | None = None,
               **kwargs) -> httpx.Response:
    app = create_app(config or make_config(), backend, tok)
    async with client_for(app) as client:
        if isinstance(body, (bytes, str)) or hasattr(body, "__aiter__"):
            return await client.post(path, content=body, **kwargs)
        return await client.post(path, json=body, **kwargs)


def sse_events(response: httpx.Response) -> list[str]:
    assert response.headers["content-type"].startswith("text/event-stream")
    return [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


# ---- errors -----------------------------------------------------------------

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": 5, "prompt": "x"}, "model"),
        ({"model": MODEL}, "prompt"),
        ({"model": MODEL, "prompt": "x", "temperature": -0.1}, "temperature"),
        ({"model": MODEL, "prompt": "x", "temperature": 2.5}, "temperature"),
        ({"model": MODEL, "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": MODEL, "prompt": "x", "top_p": 1.5}, "top_p"),
        ({"model": MODEL, "prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "n": 9}, "n"),
        ({"model": MODEL, "prompt": "x", "logprobs": 21}, "logprobs"),
        ({"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": MODEL, "prompt": []}, "prompt"),
        ({"model": MODEL, "prompt": [5, 99999]}, "prompt"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 2048}, "max_tokens"),
        ({"model": MODEL, "prompt": "x " * 2100}, "prompt"),
        ({"model": MODEL, "prompt": "x", "logit_bias": {"five": 1}}, "logit_bias"),
        ({"model": MODEL, "prompt": "x", "logit_bias": {"5": 100.5}}, "logit_bias"),
        ({"model": MODEL, "prompt": "x", "logit_bias": {"99999": 1}}, "logit_bias"),
        ({"model": MODEL, "prompt": "x", "top_k": 2**40}, "top_k"),
        ({"model": MODEL, "prompt": "x", "seed": 2**64}, "seed"),
        ({"model": MODEL, "prompt": "x", "stop_token_ids": [2**40]}, "stop_token_ids"),
        ({"model": MODEL, "prompt": "x", "stop_token_ids": [5, 99999]}, "stop_token_ids"),
        ({"model": MODEL, "prompt": "x", "response_format": {"type": "json_schema"}}, "response_format"),
        ({"model": MODEL, "prompt": "x", "response_format": {"type": "xml"}}, "response_format"),
        ({"model": MODEL, "prompt": "x", "structured_outputs": {"regex": "a+", "choice": ["a"]}}, "structured_outputs"),
        ({"model": MODEL, "prompt": "x", "structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs"),
        ({"model": MODEL, "prompt": "x", "response_format": {"type": "structural_tag"}}, "response_format"),
        ({"model": MODEL, "prompt": "x", "response_format": {"type": "structural_tag", "triggers": ["<"],
          "structures": [{"begin": "<a>", "end": "</a>"}]}}, "response_format"),
        ({"model": MODEL, "prompt": "x", "structured_outputs": {"choice": []}}, "structured_outputs"),
        ({"model": MODEL, "prompt": "x", "guided_choice": []}, "guided_choice"),
        ({"model": MODEL, "prompt": "x", "logits_processors": ["my.module:Processor"]}, "logits_processors"),
        ({"model": MODEL, "prompt": "x", "guided_json": {}, "guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
        ({"model": MODEL, "prompt": "x", "guided_regex": "a+", "guided_choice": ["a"]}, None),
        ({"model": MODEL, "prompt": "x", "guided_regex": "a+", "structured_outputs": {"regex": "b+"}}, None),
        ({"model": MODEL, "prompt": "x", "guided_json": {}, "structural_tag": "{}"}, None),
        ({"model": MODEL, "prompt": "x", "guided_regex": "a+", "response_format": {"type": "json_object"}}, None),
        ({"model": MODEL, "prompt": "x", "structured_outputs": {"regex": "a+"}, "min_tokens": 2}, None),
        ({"model": MODEL, "prompt": "x", "structured_outputs": {"regex": "a+"}, "response_format": {"type": "json_object"}}, None),
        ({"model": MODEL, "prompt": "x", "allowed_token_ids": []}, "allowed_token_ids"),
        ({"model": MODEL, "prompt": "x", "allowed_token_ids": [5, 99999]}, "allowed_token_ids"),
        ({"model": MODEL, "prompt": "x", "allowed_token_ids": [-1]}, "allowed_token_ids"),
        ({"model": MODEL, "prompt": "x", "bad_words": ["fine", " \n"]}, "bad_words"),
        ({"model": MODEL, "prompt": "x", "bad_words": ["w"] * 129}, "bad_words"),
        ({"model": MODEL, "prompt": "x", "bad_words": [","], "allowed_token_ids": [14]}, None),   # "," is 14
        ({"model": MODEL, "prompt": "x", "priority": 2**31}, "priority"),
        ({"model": MODEL, "prompt": "x", "best_of": 3}, "best_of"),
        ({"model": MODEL, "prompt": "x", "suffix": "end"}, "suffix"),
        ({"model": MODEL, "prompt": "x", "prompt_logprobs": -2}, "prompt_logprobs"),
        ({"model": MODEL, "prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
        ({"model": MODEL, "prompt": "x", "prompt_logprobs": -1}, "prompt_logprobs"),   # the vocabulary: 1024 > 20
        ({"model": MODEL, "prompt": "x", "prompt_logprobs": "two"}, "prompt_logprobs"),
        ({"model": MODEL, "prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ({"model": MODEL, "prompt": "x", "prompt_logprobs": -1, "stream": True}, "prompt_logprobs"),
    ],
)
async def test_invalid_completion_requests_get_400(tok, body, param) -> None:
    backend = FakeBackend(tok)
    assert_error(await post(backend, tok, "/v1/completions", body), 400, param)
    assert backend.requests == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "top_logprobs"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 4000},
         "max_completion_tokens"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
          "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [TOOL]}, "tool_choice"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [TOOL], "tool_choice": "auto"}, "tool_choice"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "functions": [TOOL["function"]]}, "functions"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 21}, "prompt_logprobs"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
         "top_logprobs"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "prompt_logprobs": -1}, "prompt_logprobs"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": -2},
         "top_logprobs"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 2, "stream": True},
         "prompt_logprobs"),
        # Images are not served (an image-text checkpoint serves its text model).
        ({"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]}, "messages"),
    ],
)
async def test_invalid_chat_requests_get_400(tok, body, param) -> None:
    assert_error(await post(FakeBackend(tok), tok, "/v1/chat/completions", body), 400, param)


async def test_max_logprobs_sets_how_many_log_probs_a_request_may_ask_for(tok) -> None:
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "logprobs": True}
    backend, few = FakeBackend(tok), make_config(max_logprobs=5)
    error = assert_error(await post(backend, tok, "/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 6}, few),
                         400, "logprobs")
    assert error["message"] == "Requested sample logprobs of 6, which is greater than max allowed: 5"
    assert_error(await post(backend, tok, "/v1/chat/completions", {**chat, "top_logprobs": 6}, few), 400, "top_logprobs")
    whole = assert_error(await post(backend, tok, "/v1/chat/completions", {**chat, "top_logprobs": -1}, few), 400, "top_logprobs")
    assert whole["message"] == f"Requested sample logprobs of {tok.vocab_size}, which is greater than max allowed: 5"
    assert_error(await post(backend, tok, "/v1/completions", {"model": MODEL, "prompt": "x", "prompt_logprobs": 6}, few),
                 400, "prompt_logprobs")
    assert backend.requests == []
    many = make_config(max_logprobs=30)
    ok = await post(backend, tok, "/v1/completions",
                    {"model": MODEL, "prompt": "x", "max_tokens": 2, "logprobs": 25, "prompt_logprobs": 30}, many)
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["logprobs"]["top_logprobs"][0]) == 25
    assert (await post(backend, tok, "/v1/chat/completions", {**chat, "top_logprobs": 30}, many)).status_code == 200
    vocabulary = make_config(max_logprobs=-1)
    assert (await post(backend, tok, "/v1/completions",
                       {"model": MODEL, "prompt": "x", "max_tokens": 2, "prompt_logprobs": -1}, vocabulary)).status_code == 200
    everything = await post(backend, tok, "/v1/chat/completions", {**chat, "top_logprobs": -1}, vocabulary)
    assert len(everything.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == tok.vocab_size
    assert [(r.params.logprobs, r.params.prompt_logprobs) for r in backend.requests] == [
        (25, 30), (30, None), (None, tok.vocab_size), (tok.vocab_size, None)]


async def test_malformed_json_unknown_model_and_oversized_body(tok) -> None:
    backend = FakeBackend(tok)
    assert "JSON" in assert_error(await post(backend, tok, "/v1/completions", b"{not json"), 400)["message"]
    error = assert_error(await post(backend, tok, "/v1/completions", {"model": "gpt-9", "prompt": "x"}), 404, "model")
    assert error["code"] == "model_not_found"
    small = make_config(max_body_bytes=100)
    assert_error(await post(backend, tok, "/v1/completions", {"model": MODEL, "prompt": "x" * 200}, small), 413)

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds while reading
        for _ in range(10):
            yield b" " * 30

    assert_error(await post(backend, tok, "/v1/completions", chunked(), small), 413)
    assert backend.requests == []


async def test_a_request_without_a_model_is_for_the_served_one(tok) -> None:
    """As vLLM takes it: ``model`` left out (or null) names the served model, on every route."""
    backend = FakeBackend(tok)
    bodies = {"/v1/completions": {"prompt": "x", "max_tokens": 2}, "/v1/embeddings": {"input": "x"},
              "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "model": None},
              "/v1/responses": {"input": "hi", "max_output_tokens": 2}, "/tokenize": {"prompt": "x"},
              "/detokenize": {"tokens": [5]}, "/rerank": {"query": "a", "documents": ["b"]}}
    async with client_for(create_app(make_config(), backend, tok)) as client:
        for path, body in bodies.items():
            out = await client.post(path, json=body)
            assert out.status_code == 200, (path, out.text)
            assert out.json().get("model", MODEL) == MODEL, path
    assert len(backend.requests) == 3


async def test_the_served_model_answers_to_each_of_its_names_under_the_first(tok) -> None:
    """vLLM's ``--served-model-name A B``: /v1/models lists both; a request naming B is served and
    answered as A; a LoRA adapter may not take either name."""
    backend = FakeBackend(tok)
    app = create_app(make_config(served_model_aliases=["bard"], allow_runtime_lora_updating=True), backend, tok)
    async with client_for(app) as client:
        assert [m["id"] for m in (await client.get("/v1/models")).json()["data"]] == [MODEL, "bard"]
        out = await client.post("/v1/completions", json={"model": "bard", "prompt": "x", "max_tokens": 2})
        assert out.status_code == 200 and out.json()["model"] == MODEL and backend.requests[-1].lora is None
        refused = await client.post("/v1/load_lora_adapter", json={"lora_name": "bard", "lora_path": "/a"})
        assert_error(refused, 400, "lora_name")


async def test_cors_as_vllm_configures_it(tok) -> None:
    """Any origin by default (vLLM's defaults), a preflight answered; with ``allowed_origins`` set,
    only those origins are named back."""
    open_app = create_app(make_config(), FakeBackend(tok), tok)
    async with client_for(open_app) as client:
        out = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2},
                                headers={"Origin": "https://ui.example"})
        assert out.status_code == 200 and out.headers["access-control-allow-origin"] == "*"
        preflight = await client.options("/v1/chat/completions", headers={
            "Origin": "https://ui.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.status_code == 200 and "POST" in preflight.headers["access-control-allow-methods"]
    strict = create_app(make_config(allowed_origins=["https://ui.example"], allow_credentials=True), FakeBackend(tok), tok)
    async with client_for(strict) as client:
        ok = await client.get("/v1/models", headers={"Origin": "https://ui.example"})
        assert ok.headers["access-control-allow-origin"] == "https://ui.example"
        assert ok.headers["access-control-allow-credentials"] == "true"
        other = await client.get("/v1/models", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


LORAS = {"sonnets": "/adapters/sonnets", "tragedies": "/adapters/tragedies"}


async def test_models_list_the_lora_adapters_with_their_base_as_parent(tok) -> None:
    app = create_app(make_config(lora_modules=LORAS), FakeBackend(tok), tok)
    async with client_for(app) as client:
        data = (await client.get("/v1/models")).json()["data"]
    assert [(m["id"], m["root"], m["parent"]) for m in data] == [
        (MODEL, str(DEMO_MODEL), None), ("sonnets", "/adapters/sonnets", MODEL), ("tragedies", "/adapters/tragedies", MODEL)]


async def test_a_lora_adapter_named_as_model_reaches_the_backend(tok) -> None:
    backend, config = FakeBackend(tok), make_config(lora_modules=LORAS)
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "n": 2}
    for model in ("sonnets", MODEL, "tragedies"):
        assert (await post(backend, tok, "/v1/completions", {"model": model, "prompt": ["a", "b"], "max_tokens": 2},
                           config)).status_code == 200
        assert (await post(backend, tok, "/v1/chat/completions", {"model": model, **chat}, config)).status_code == 200
    adapters = [r.lora for r in backend.requests]
    assert adapters == ["sonnets"] * 4 + [None] * 4 + ["tragedies"] * 4
    assert (await post(backend, tok, "/tokenize", {"model": "sonnets", "prompt": "x"}, config)).status_code == 200
    error = assert_error(await post(backend, tok, "/v1/completions", {"model": "comedies", "prompt": "x"}, config),
                         404, "model")
    assert error["code"] == "model_not_found"
    # Embeddings come from the base model: an adapter's name there is refused, not ignored.
    assert_error(await post(backend, tok, "/v1/embeddings", {"model": "sonnets", "input": "x"}, config), 400, "model")
    assert backend.embeds == []


async def test_a_worker_without_the_adapter_is_a_404(tok) -> None:
    backend = FakeBackend(tok, error=BackendError("decode worker 127.0.0.1:1: LoRA adapter 'sonnets' is not loaded", 404))
    body = {"model": "sonnets", "prompt": "x", "max_tokens": 2}
    error = assert_error(await post(backend, tok, "/v1/completions", body, make_config(lora_modules=LORAS)), 404, "model")
    assert error["code"] == "model_not_found" and "'sonnets' is not loaded" in error["message"]


class LoRABackend(FakeBackend):
    """Records loads and unloads, and holds the adapters loaded; ``refusal`` fails the next one."""

    def __init__(self, tok: GatewayTokenizer) -> None:
        super().__init__(tok)
        self.updates: list[tuple[str, ...]] = []
        self.refusal: BackendError | None = None
        self.loaded: dict[str, str] = {}

    def runtime_loras(self) -> dict[str, str]:
        return dict(self.loaded)

    async def load_lora(self, name: str, path: str) -> None:
        await self._update("load", name, path)
        self.loaded[name] = path

    async def unload_lora(self, name: str) -> None:
        await self._update("unload", name)
        self.loaded.pop(name, None)

    async def _update(self, *what: str) -> None:
        refusal, self.refusal = self.refusal, None
        if refusal is not None:
            raise refusal
        self.updates.append(what)


async def test_the_lora_adapter_routes_exist_only_when_allowed(tok, monkeypatch) -> None:
    """As in vLLM: without the flag (or ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``) the routes are a 404."""
    backend = LoRABackend(tok)
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        assert (await post(backend, tok, path, {"lora_name": "sql", "lora_path": "/a"})).status_code == 404
    assert backend.updates == []
    argv = ["--model-dir", str(DEMO_MODEL)]
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    assert not config_from_args(build_parser().parse_args(argv)).allow_runtime_lora_updating
    assert config_from_args(build_parser().parse_args([*argv, "--allow-runtime-lora-updating"])).allow_runtime_lora_updating
    for value, allowed in (("True", True), ("1", True), ("false", False), ("0", False)):
        monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", value)
        assert config_from_args(build_parser().parse_args(argv)).allow_runtime_lora_updating is allowed


async def test_an_adapter_loaded_at_runtime_is_served_until_unloaded(tok) -> None:
    backend = LoRABackend(tok)
    app = create_app(make_config(allow_runtime_lora_updating=True, lora_modules={"sonnets": "/adapters/sonnets"}),
                     backend, tok)
    completion = {"model": "sql", "prompt": "x", "max_tokens": 2}
    async with client_for(app) as client:
        assert_error(await client.post("/v1/completions", json=completion), 404, "model")
        loaded = await client.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": "/a/sql",
                                                                   "lora_int_id": 7})
        assert (loaded.status_code, loaded.text) == (200, "Success: LoRA adapter 'sql' added successfully.")
        assert loaded.headers["content-type"].startswith("text/plain")
        data = (await client.get("/v1/models")).json()["data"]
        assert [(m["id"], m["root"], m["parent"]) for m in data] == [
            (MODEL, str(DEMO_MODEL), None), ("sonnets", "/adapters/sonnets", MODEL), ("sql", "/a/sql", MODEL)]
        assert (await client.post("/v1/completions", json=completion)).status_code == 200
        assert backend.requests[-1].lora == "sql"
        again = assert_error(await client.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": "/b"}),
                             400, "lora_name")
        assert again["message"] == "The lora adapter 'sql' has already been loaded."
        assert_error(await client.post("/v1/load_lora_adapter", json={"lora_name": MODEL, "lora_path": "/b"}), 400,
                     "lora_name")
        assert_error(await client.post("/v1/load_lora_adapter", json={"lora_name": "x"}), 400, "lora_path")
        removed = await client.post("/v1/unload_lora_adapter", json={"lora_name": "sql", "lora_int_id": 7})
        assert (removed.status_code, removed.text) == (200, "Success: LoRA adapter 'sql' removed successfully.")
        assert assert_error(await client.post("/v1/completions", json=completion), 404, "model")["code"] == "model_not_found"
        gone = assert_error(await client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}), 404, "lora_name")
        assert gone["message"] == "The lora adapter 'sql' cannot be found."
        assert (await client.post("/v1/unload_lora_adapter", json={"lora_name": "sonnets"})).status_code == 200
        assert [m["id"] for m in (await client.get("/v1/models")).json()["data"]] == [MODEL]
    assert backend.updates == [("load", "sql", "/a/sql"), ("unload", "sql"), ("unload", "sonnets")]


async def test_a_refused_load_or_unload_changes_nothing_and_says_why(tok) -> None:
    backend = LoRABackend(tok)
    app = create_app(make_config(allow_runtime_lora_updating=True, api_keys=["k"]), backend, tok)
    auth = {"authorization": "Bearer k"}
    async with client_for(app) as client:
        assert_error(await client.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": "/a"}), 401)
        assert_error(await client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}), 401)
        backend.refusal = BackendError("decode worker 127.0.0.1:2: INVALID_ARGUMENT: LoRA adapter 'sql' (/a): rank 32 "
                                       "is above max_lora_rank=16", 400)
        refused = assert_error(await client.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": "/a"},
                                                 headers=auth), 400)
        assert "rank 32 is above max_lora_rank=16" in refused["message"]
        assert [m["id"] for m in (await client.get("/v1/models", headers=auth)).json()["data"]] == [MODEL]
        assert (await client.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": "/a"},
                                  headers=auth)).status_code == 200
        backend.refusal = BackendError("decode worker 127.0.0.1:2: FAILED_PRECONDITION: LoRA adapter 'sql' is in use "
                                       "by 1 unfinished sequence(s); unload it once they finish", 400)
        in_use = assert_error(await client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}, headers=auth), 400)
        assert "is in use" in in_use["message"]
        body = {"model": "sql", "prompt": "x", "max_tokens": 2}
        assert (await client.post("/v1/completions", json=body, headers=auth)).status_code == 200
        backend.refusal = BackendError("prefill worker 127.0.0.1:1: UNAVAILABLE: connection refused", 503)
        assert_error(await client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}, headers=auth), 503)
        assert [m["id"] for m in (await client.get("/v1/models", headers=auth)).json()["data"]] == [MODEL, "sql"]
    assert backend.updates == [("load", "sql", "/a")]


class ResetBackend(FakeBackend):
    """Counts prefix-cache resets; ``failure`` fails each."""

    def __init__(self, tok: GatewayTokenizer) -> None:
        super().__init__(tok)
        self.resets = 0
        self.failure: BackendError | None = None

    async def reset_prefix_cache(self) -> None:
        if self.failure is not None:
            raise self.failure
        self.resets += 1


async def test_reset_prefix_cache_exists_only_in_dev_mode(tok, monkeypatch) -> None:
    """As in vLLM: without ``--dev-mode`` (or ``VLLM_SERVER_DEV_MODE``) the route is a 404."""
    backend = ResetBackend(tok)
    assert_error(await post(backend, tok, "/reset_prefix_cache", b""), 404)
    assert (await post(backend, tok, "/reset_prefix_cache", b"", make_config(dev_mode=True))).status_code == 200
    assert backend.resets == 1
    argv = ["--model-dir", str(DEMO_MODEL)]
    monkeypatch.delenv("VLLM_SERVER_DEV_MODE", raising=False)
    assert not config_from_args(build_parser().parse_args(argv)).dev_mode
    assert config_from_args(build_parser().parse_args([*argv, "--dev-mode"])).dev_mode
    for value, on in (("1", True), ("true", True), ("True", True), ("0", False), ("false", False), ("", False)):
        monkeypatch.setenv("VLLM_SERVER_DEV_MODE", value)
        assert config_from_args(build_parser().parse_args(argv)).dev_mode is on


async def test_reset_prefix_cache_answers_as_vllm_behind_the_api_key(tok) -> None:
    """An empty 200 once every worker has reset; vLLM's 409 naming the workers that did not."""
    backend = ResetBackend(tok)
    app = create_app(make_config(dev_mode=True, api_keys=["k"]), backend, tok)
    auth = {"authorization": "Bearer k"}
    async with client_for(app) as client:
        assert_error(await client.post("/reset_prefix_cache"), 401)
        assert_error(await client.post("/reset_prefix_cache", headers={"authorization": "Bearer nope"}), 401)
        assert backend.resets == 0
        done = await client.post("/reset_prefix_cache", headers=auth)
        assert (done.status_code, done.content, backend.resets) == (200, b"", 1)
        backend.failure = BackendError("decode worker 127.0.0.1:2: UNAVAILABLE: connection refused", 503)
        failed = assert_error(await client.post("/reset_prefix_cache", headers=auth), 409)
        assert failed["message"] == "Prefix cache reset failed. decode worker 127.0.0.1:2: UNAVAILABLE: connection refused"
        assert failed["type"] == "Conflict"


SALT = "kd4X0zLq9Vb2Yc7Hf1Tw8Rm3Ns6Pj5Ga0Ue4Io2Kl7"   # 43 characters: 256 bits in base64, as vLLM advises


async def test_the_cache_salt_reaches_the_backend_on_every_route(tok) -> None:
    backend = FakeBackend(tok)
    salted = {"max_tokens": 2, "cache_salt": SALT}
    routes = [
        ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"], "n": 2, **salted}),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], **salted}),
        ("/v1/responses", {"model": MODEL, "input": "x", "max_output_tokens": 2, "cache_salt": SALT}),
        ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 2, "cache_salt": None}),
        ("/v1/embeddings", {"model": MODEL, "input": ["a", "b"], "cache_salt": SALT}),
        ("/score", {"model": MODEL, "text_1": "a", "text_2": "b", "cache_salt": SALT}),
        ("/rerank", {"model": MODEL, "query": "a", "documents": ["b"], "cache_salt": SALT}),
        ("/v1/embeddings", {"model": MODEL, "input": "a"}),
    ]
    for path, body in routes:
        assert (await post(backend, tok, path, body)).status_code == 200, path
    assert [r.cache_salt for r in backend.requests] == [SALT] * 4 + [SALT] + [SALT] + [None]   # each of n samples too
    assert [r.cache_salt for r in backend.embeds] == [SALT] * 6 + [None]


@pytest.mark.parametrize("salt", ["", "s" * 129, "a/b", "a@b", "a\\b", "a\x00b", 7, ["s"]])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/embeddings"])
async def test_a_cache_salt_vllm_refuses_is_a_400_naming_it(tok, path, salt) -> None:
    backend = FakeBackend(tok)
    body = {"model": MODEL, "prompt": "x", "messages": [{"role": "user", "content": "x"}], "input": "x", "cache_salt": salt}
    error = assert_error(await post(backend, tok, path, body), 400, "cache_salt")
    assert "cache_salt" in error["message"]
    assert backend.requests == backend.embeds == []


async def test_the_longest_cache_salt_passes_and_a_lone_surrogate_is_refused(tok) -> None:
    backend = FakeBackend(tok)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2, "cache_salt": "é" * 128}
    assert (await post(backend, tok, "/v1/completions", body)).status_code == 200
    lone = b'{"model": "%s", "prompt": "x", "cache_salt": "a\\ud800"}' % MODEL.encode()
    assert_error(await post(backend, tok, "/v1/completions", lone, headers={"content-type": "application/json"}),
                 400, "cache_salt")
    assert [r.cache_salt for r in backend.requests] == ["é" * 128]


async def test_unknown_fields_are_ignored_and_null_means_default(tok) -> None:
    backend = FakeBackend(tok)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 4, "temperature": None, "service_tier": "auto", "suffix": None}
    response = await post(backend, tok, "/v1/completions", body)
    assert response.status_code == 200, response.text
    assert backend.requests[0].params.temperature == 1.0


async def test_what_changes_nothing_is_accepted(tok) -> None:
    """Text output, best_of equal to n, an empty suffix, and tools the model is told not to call."""
    backend = FakeBackend(tok)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2, "response_format": {"type": "text"}, "best_of": 2, "n": 2, "suffix": ""}
    assert (await post(backend, tok, "/v1/completions", body)).status_code == 200
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "tools": [TOOL], "tool_choice": "none"}
    assert (await post(backend, tok, "/v1/chat/completions", chat)).status_code == 200
    assert len(backend.requests) == 3


async def test_logit_bias_reaches_the_backend_by_token_id(tok) -> None:
    backend = FakeBackend(tok)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
            "logit_bias": {"5": 1, "17": -100}}
    response = await post(backend, tok, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    assert backend.requests[0].params.logit_bias == {5: 1.0, 17: -100.0}


# vLLM's structural tags: xgrammar's form, and vLLM's older one (as the worker gets them: JSON text).
TAG_FORMAT = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<w"], "tags": [
    {"begin": "<w>", "content": {"type": "json_schema", "json_schema": PERSON}, "end": "</w>"}]}}
TAG_OLDER = {"type": "structural_tag", "structures": [{"begin": "<w>", "schema": PERSON, "end": "</w>"}],
             "triggers": ["<w"]}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"response_format": {"type": "json_object"}}, StructuredOutputParams(json_object=True)),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}}},
         StructuredOutputParams(json=json.dumps(PERSON))),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
          "structured_outputs": {"disable_any_whitespace": True}},
         StructuredOutputParams(json=json.dumps(PERSON), disable_any_whitespace=True)),
        ({"structured_outputs": {"json": PERSON}}, StructuredOutputParams(json=json.dumps(PERSON))),
        ({"structured_outputs": {"json": '{"type": "array"}'}}, StructuredOutputParams(json='{"type": "array"}')),
        ({"structured_outputs": {"regex": "[0-9]+", "disable_any_whitespace": True}},
         StructuredOutputParams(regex="[0-9]+", disable_any_whitespace=True)),
        ({"structured_outputs": {"choice": ["yes", "no"]}, "response_format": {"type": "text"}},
         StructuredOutputParams(choice=("yes", "no"))),
        ({"structured_outputs": {"grammar": 'root ::= "a"'}}, StructuredOutputParams(grammar='root ::= "a"')),
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {**TAG_FORMAT, "name": "ignored"}},
         StructuredOutputParams(structural_tag=json.dumps(TAG_FORMAT))),
        ({"response_format": TAG_OLDER}, StructuredOutputParams(structural_tag=json.dumps(TAG_OLDER))),
        ({"structured_outputs": {"structural_tag": "{}"}}, StructuredOutputParams(structural_tag="{}")),
        ({"guided_json": PERSON, "guided_decoding_backend": "outlines"}, StructuredOutputParams(json=json.dumps(PERSON))),
        ({"guided_json": '{"type": "array"}', "structured_outputs": {"disable_any_whitespace": True}},
         StructuredOutputParams(json='{"type": "array"}', disable_any_whitespace=True)),
        ({"guided_regex": "[0-9]+", "guided_json": None}, StructuredOutputParams(regex="[0-9]+")),
        ({"guided_choice": ["yes", "no"], "response_format": {"type": "text"}}, StructuredOutputParams(choice=("yes", "no"))),
        ({"guided_grammar": 'root ::= "a"'}, StructuredOutputParams(grammar='root ::= "a"')),
        ({"structural_tag": json.dumps(TAG_OLDER)}, StructuredOutputParams(structural_tag=json.dumps(TAG_OLDER))),
    ],
)
async def test_structured_output_reaches_the_backend(tok, fields, expected) -> None:
    """OpenAI's response_format, vLLM's structured_outputs and its older guided_ fields (which vLLM
    ignores since v0.12) become one grammar (the worker compiles it, and answers a bad one with
    INVALID_ARGUMENT: a 400)."""
    backend = FakeBackend(tok)
    for path, body in [("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})]:
        response = await post(backend, tok, path, {"model": MODEL, "max_tokens": 4, **body, **fields})
        assert response.status_code == 200, response.text
    assert [r.params.structured_output for r in backend.requests] == [expected, expected]


async def test_a_grammar_the_worker_refuses_is_a_400(tok) -> None:
    backend = FakeBackend(tok, error=BackendError("invalid structured output: Regex parsing error at position 2", 400))
    body = {"model": MODEL, "prompt": "x", "max_tokens": 4, "structured_outputs": {"regex": "(a"}}
    for stream in (False, True):
        error = assert_error(await post(backend, tok, "/v1/completions", {**body, "stream": stream}), 400)
        assert error["type"] == "invalid_request_error" and "Regex parsing error" in error["message"]


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                         "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}


class ScriptedBackend(FakeBackend):
    """Outputs ``text`` (as the grammar would have it), cut at max_tokens."""

    def __init__(self, tok: GatewayTokenizer, text: str, per_chunk: int = 3) -> None:
        super().__init__(tok, per_chunk=per_chunk)
        self.text = text

    def output_ids(self, request: GenerationRequest) -> list[int]:
        return self.tok.encode(self.text, add_special_tokens=False)


def tool_body(tool_choice: object, **fields: object) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Weather in Verona?"}], "max_tokens": 200,
            "tools": [WEATHER, CLOCK], "tool_choice": tool_choice, **fields}


def streamed_message(response: httpx.Response) -> tuple[str, str, list[dict], list[str]]:
    """A streamed chat answer's reasoning, content, tool-call pieces and finish reasons."""
    pieces = [json.loads(e)["choices"][0] for e in sse_events(response)[:-1]]
    return ("".join(p["delta"].get("reasoning") or "" for p in pieces), "".join(p["delta"].get("content") or "" for p in pieces),
            [c for p in pieces for c in p["delta"].get("tool_calls") or []], [p["finish_reason"] for p in pieces if p["finish_reason"]])


def streamed_calls(pieces: list[dict]) -> list[dict]:
    """Streamed tool-call pieces put together into calls, checking each is in vLLM's shape: a
    call's first piece gives the next index, an id, the type and the name; later ones only add
    to its arguments."""
    calls: list[dict] = []
    for p in pieces:
        if p["index"] == len(calls):
            assert p["id"].startswith("call_") and p["type"] == "function" and set(p["function"]) == {"name", "arguments"}
            calls.append({"id": p["id"], "type": "function", "function": dict(p["function"])})
        else:
            assert p["index"] == len(calls) - 1 and set(p) == {"index", "function"} and set(p["function"]) == {"arguments"}
            calls[-1]["function"]["arguments"] += p["function"]["arguments"]
    return calls


async def test_a_forced_tool_choice_constrains_the_output() -> None:
    """A named function: its parameters' schema (any object without one); 'required': an array
    of calls of the given tools, one unless parallel_tool_calls."""
    named = ChatCompletionRequest(**tool_body({"type": "function", "function": {"name": "get_weather"}}))
    compact = {"disable_any_whitespace": True}
    assert tools.grammar(named) == StructuredOutputParams(json=json.dumps(WEATHER["function"]["parameters"]), **compact)
    clock = ChatCompletionRequest(**tool_body({"type": "function", "function": {"name": "get_time"}}))
    assert tools.grammar(clock) == StructuredOutputParams(json='{"type": "object"}', **compact)
    for parallel in (True, False):
        schema = json.loads(tools.grammar(ChatCompletionRequest(**tool_body("required", parallel_tool_calls=parallel))).json)
        assert schema["type"] == "array" and schema["minItems"] == 1 and schema.get("maxItems") == (None if parallel else 1)
        assert [c["properties"]["name"] for c in schema["items"]["anyOf"]] == [{"const": "get_weather"}, {"const": "get_time"}]
        assert schema["items"]["anyOf"][0]["properties"]["parameters"] == WEATHER["function"]["parameters"]
    assert tools.grammar(ChatCompletionRequest(**tool_body("none"))) is None


async def test_a_named_function_call_streams_its_arguments(tok) -> None:
    arguments = '{"city": "Verona, fair Verona"}'
    body = tool_body({"type": "function", "function": {"name": "get_weather"}})
    backend = ScriptedBackend(tok, arguments)
    response = await post(backend, tok, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": arguments}
    assert backend.requests[0].params.structured_output == tools.grammar(ChatCompletionRequest(**body))
    events = sse_events(await post(backend, tok, "/v1/chat/completions", {**body, "stream": True}))
    pieces = [json.loads(e)["choices"][0] for e in events[:-1]]
    calls = [c for p in pieces for c in p["delta"].get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert all(c["index"] == 0 and set(c) == {"index", "function"} for c in calls[1:])
    assert "".join(c["function"]["arguments"] for c in calls) == arguments
    assert not any(p["delta"].get("content") for p in pieces)
    assert [p["finish_reason"] for p in pieces if p["finish_reason"]] == ["stop"] and events[-1] == "[DONE]"


async def test_required_tool_calls_come_whole(tok) -> None:
    text = '[{"name": "get_weather", "parameters": {"city": "Mantua"}}, {"name": "get_time", "parameters": {}}]'
    backend = ScriptedBackend(tok, text)
    response = await post(backend, tok, "/v1/chat/completions", tool_body("required"))
    (choice,) = response.json()["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in choice["message"]["tool_calls"]] == [
        ("get_weather", {"city": "Mantua"}), ("get_time", {})]
    events = sse_events(await post(backend, tok, "/v1/chat/completions", tool_body("required", stream=True)))
    pieces = [json.loads(e)["choices"][0] for e in events[:-1]]
    with_calls = [p for p in pieces if p["delta"].get("tool_calls")]
    assert len(with_calls) == 1 and with_calls[0]["finish_reason"] == "tool_calls"
    assert [c["function"]["name"] for c in with_calls[0]["delta"]["tool_calls"]] == ["get_weather", "get_time"]
    assert [c["index"] for c in with_calls[0]["delta"]["tool_calls"]] == [0, 1]
    assert not any(p["delta"].get("content") for p in pieces)


async def test_a_tool_call_cut_short_is_text(tok) -> None:
    """At max_tokens the array is not whole: the text comes back as content, finish_reason length."""
    text = '[{"name": "get_weather", "parameters": {"city": "Mantua and Verona and Padua"}}]'
    cut = tool_body("required", max_tokens=8)
    (choice,) = (await post(ScriptedBackend(tok, text), tok, "/v1/chat/completions", cut)).json()["choices"]
    assert choice["finish_reason"] == "length" and choice["message"]["tool_calls"] == []
    assert text.startswith(choice["message"]["content"])
    events = sse_events(await post(ScriptedBackend(tok, text), tok, "/v1/chat/completions", {**cut, "stream": True}))
    pieces = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(p["delta"].get("content") or "" for p in pieces) == choice["message"]["content"]
    assert [p["finish_reason"] for p in pieces if p["finish_reason"]] == ["length"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_forced_tool_calls_take_the_parsers_ids(tok, stream) -> None:
    """With --tool-call-parser mistral, the calls a forced tool_choice makes have Mistral's ids (9
    letters and digits, the only ones its chat templates take back); with another parser, or none,
    call_ ids."""
    named = tool_body({"type": "function", "function": {"name": "get_weather"}}, stream=stream)
    required = tool_body("required", stream=stream)
    outputs = [(named, '{"city":"Verona"}', 1),
               (required, '[{"name":"get_weather","parameters":{"city":"Verona"}},{"name":"get_time","parameters":{}}]', 2)]
    call_form = re.compile(r"call_[0-9a-f]{24}")
    for parser, form in [("mistral", re.compile(r"[A-Za-z0-9]{9}")), ("hermes", call_form), (None, call_form)]:
        for body, text, count in outputs:
            response = await post(ScriptedBackend(tok, text), tok, "/v1/chat/completions", body,
                                  config=make_config(tool_call_parser=parser))
            assert response.status_code == 200, response.text
            if stream:
                ids = [p["id"] for p in streamed_message(response)[2] if "id" in p]
            else:
                ids = [c["id"] for c in response.json()["choices"][0]["message"]["tool_calls"]]
            assert len(set(ids)) == count and all(form.fullmatch(i) for i in ids), (parser, ids)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "get_mood"}}}, "tools"),
        ({"tool_choice": "required", "tools": []}, None),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, None),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}], "tool_choice": "required"}, "tools"),
    ],
)
async def test_bad_tool_requests_get_400(tok, fields, param) -> None:
    backend = FakeBackend(tok)
    assert_error(await post(backend, tok, "/v1/chat/completions", {**tool_body("required"), **fields}), 400, param)
    assert backend.requests == []


HERMES = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Verona"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')


async def auto_tools_answer(tok, parser: str, text: str, stream: bool) -> tuple[str | None, list[dict], list[str], list[dict]]:
    """The answer ``text`` to a tool_choice 'auto' request as ``parser`` reads it, whole or streamed
    token by token: its content, calls, finish reasons and (streamed) call pieces."""
    body = {**tool_body("auto"), "stream": stream}
    config = make_config(tool_call_parser=parser)
    response = await post(ScriptedBackend(tok, text, per_chunk=1), tok, "/v1/chat/completions", body, config=config)
    assert response.status_code == 200, response.text
    if stream:
        _, content, pieces, finish = streamed_message(response)
        return content, streamed_calls(pieces), finish, pieces
    (choice,) = response.json()["choices"]
    return choice["message"]["content"], choice["message"]["tool_calls"], [choice["finish_reason"]], []


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_tool_choice_auto_reads_the_models_own_calls(tok, stream) -> None:
    """With --tool-call-parser hermes, the model's <tool_call> blocks become tool_calls (their
    arguments as the model wrote them) and the rest its content; streamed token by token, the
    content comes as it is written and each call in pieces: its name, then its arguments."""
    config = make_config(tool_call_parser="hermes")
    body = {**tool_body("auto"), "stream": stream}
    content, calls, finish, pieces = await auto_tools_answer(tok, "hermes", HERMES, stream)
    assert not stream or len([p for p in pieces if p["index"] == 0]) > 3
    assert content == "Let me look." and finish == ["tool_calls"]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("get_weather", '{"city": "Verona"}'), ("get_time", "{}")]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    plain = await post(ScriptedBackend(tok, "No tools, good friar."), tok, "/v1/chat/completions", body, config=config)
    if stream:
        assert streamed_message(plain) == ("", "No tools, good friar.", [], ["stop"])
    else:
        assert plain.json()["choices"][0]["message"] == {"role": "assistant", "content": "No tools, good friar.", "reasoning": None, "tool_calls": []}


QWEN3_CODER = ("Let me look.\n<tool_call>\n<function=get_weather>\n<parameter=city>\n1600\n</parameter>\n</function>\n"
               "</tool_call>\n<tool_call>\n<function=get_time>\n</function>\n</tool_call>")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_qwen3_coder_calls_are_typed_by_the_requests_tools(tok, stream) -> None:
    """With --tool-call-parser qwen3_coder, the model's XML-like calls become tool_calls whose
    values the request's tools type (get_weather's city is a string, digits or not); streamed
    token by token, each call is named, then its arguments come a parameter at a time."""
    content, calls, finish, pieces = await auto_tools_answer(tok, "qwen3_coder", QWEN3_CODER, stream)
    assert not stream or [p["function"]["arguments"] for p in pieces if p["index"] == 0] == ["", '{"city": "1600"', "}"]
    assert content == "Let me look.\n" and finish == ["tool_calls"]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("get_weather", '{"city": "1600"}'), ("get_time", "{}")]


async def test_bad_words_allowed_tokens_and_priority_reach_the_workers(tok) -> None:
    """vLLM's bad_words, each as it would start the text and after a space, allowed_token_ids
    and priority."""
    backend = FakeBackend(tok)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2, "bad_words": [" Romeo", "thou", "Romeo"], "allowed_token_ids": [7, 3]}
    assert (await post(backend, tok, "/v1/completions", body)).status_code == 200
    params = backend.requests[0].params
    words = [tok.encode(w, add_special_tokens=False) for w in ("Romeo", " Romeo", "thou", " thou")]
    assert params.bad_words_token_ids == words and len(set(map(tuple, words))) == 4
    assert params.allowed_token_ids == [7, 3] and backend.requests[0].priority == 0
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "bad_words": ["thou"], "priority": -3}
    assert (await post(backend, tok, "/v1/chat/completions", chat)).status_code == 200
    assert backend.requests[1].params.bad_words_token_ids == words[2:] and backend.requests[1].params.allowed_token_ids is None
    assert backend.requests[1].priority == -3


async def test_vllm_output_options(tok) -> None:
    """include_stop_str_in_output, skip_special_tokens and truncate_prompt_tokens, as vLLM takes them."""
    body = {"model": MODEL, "prompt": "x", "max_tokens": 200, "stop": ["wherefore"]}
    text = (await post(FakeBackend(tok), tok, "/v1/completions", body)).json()["choices"][0]["text"]
    assert text == "O Romeo, Romeo! "
    for stream in (False, True):
        response = await post(FakeBackend(tok), tok, "/v1/completions", {**body, "stream": stream, "include_stop_str_in_output": True})
        got = "".join(json.loads(e)["choices"][0]["text"] for e in sse_events(response)[:-1]) if stream else response.json()["choices"][0]["text"]
        assert got == text + "wherefore"
    special = ScriptedBackend(tok, "Exeunt.</s>")
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 200}
    assert (await post(special, tok, "/v1/chat/completions", chat)).json()["choices"][0]["message"]["content"] == "Exeunt."
    kept = await post(special, tok, "/v1/chat/completions", {**chat, "skip_special_tokens": False})
    assert kept.json()["choices"][0]["message"]["content"] == "Exeunt.</s>"
    backend = FakeBackend(tok)
    prompt = tok.encode("But, soft! what light through yonder window breaks?")
    response = await post(backend, tok, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 4, "truncate_prompt_tokens": 5})
    assert backend.requests[0].prompt_token_ids == prompt[-5:] and response.json()["usage"]["prompt_tokens"] == 5
    await post(backend, tok, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 4, "truncate_prompt_tokens": 0})
    assert backend.requests[1].prompt_token_ids == prompt   # 0: all of it, as vLLM reads it


async def test_truncate_prompt_tokens_minus_one_keeps_what_the_context_has_room_for(tok) -> None:
    """vLLM's truncate_prompt_tokens -1: the prompt's last tokens, as many as the context leaves room
    for beside the output (one token where no limit is given; an embedded input, one position past
    it); a count past the context is refused, as is anything below -1."""
    backend, config = FakeBackend(tok), make_config(max_model_len=8)
    prompt = tok.encode("But, soft! what light through yonder window breaks?")
    assert len(prompt) > 8
    for body, kept in (({"max_tokens": 3}, 5), ({}, 7)):
        await post(backend, tok, "/v1/completions", {"model": MODEL, "prompt": prompt, "truncate_prompt_tokens": -1, **body}, config)
        assert backend.requests[-1].prompt_token_ids == prompt[-kept:]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "But, soft! what light"}], "truncate_prompt_tokens": -1}
    await post(backend, tok, "/v1/chat/completions", {**chat, "max_completion_tokens": 2}, config)
    assert len(backend.requests[-1].prompt_token_ids) == 6
    embedded = await post(FakeBackend(tok), tok, "/v1/embeddings", {"model": MODEL, "input": prompt, "truncate_prompt_tokens": -1}, config)
    assert embedded.json()["usage"]["prompt_tokens"] == 7
    too_long = await post(backend, tok, "/v1/completions", {"model": MODEL, "prompt": prompt, "truncate_prompt_tokens": 9}, config)
    assert "maximum context length (8)" in assert_error(too_long, 400, "truncate_prompt_tokens")["message"]
    assert_error(await post(backend, tok, "/v1/completions", {"model": MODEL, "prompt": prompt, "truncate_prompt_tokens": -2}),
                 400, "truncate_prompt_tokens")


async def test_prompt_embeds_are_refused_by_name(tok) -> None:
    """vLLM's prompt_embeds (base64 tensors, behind its --enable-prompt-embeds) is a 400 naming the
    field, beside a prompt or without one: never ignored."""
    for body in ({"prompt": "x", "prompt_embeds": "AAAA"}, {"prompt_embeds": ["AAAA"]}):
        refused = await post(FakeBackend(tok), tok, "/v1/completions", {"model": MODEL, "max_tokens": 2, **body})
        assert "not supported" in assert_error(refused, 400, "prompt_embeds")["message"]


async def test_stream_options_need_a_stream(tok) -> None:
    """stream_options without stream is a 400, as OpenAI and vLLM answer it; an empty or null one is not."""
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    for path, request in (("/v1/completions", body), ("/v1/chat/completions", chat)):
        refused = await post(FakeBackend(tok), tok, path, {**request, "stream_options": {"include_usage": True}})
        assert "stream is true" in assert_error(refused, 400, "stream_options")["message"]
        for options in ({}, None):
            assert (await post(FakeBackend(tok), tok, path, {**request, "stream_options": options})).status_code == 200


async def test_add_special_tokens_as_vllm_takes_it(tok) -> None:
    """vLLM's add_special_tokens: a completion's text prompts get the tokenizer's BOS unless it is
    false (token-id prompts are taken as they are); a chat's template text gets none unless true."""
    text, backend = "JULIET:\nO Romeo", FakeBackend(tok)
    with_bos, without = tok.encode(text), tok.encode(text, add_special_tokens=False)
    assert with_bos == [1, *without]
    for fields, want in (({"prompt": text}, [with_bos]), ({"prompt": text, "add_special_tokens": False}, [without]),
                         ({"prompt": [text, "x"], "add_special_tokens": False}, [without, tok.encode("x", False)]),
                         ({"prompt": without, "add_special_tokens": True}, [without])):
        backend.requests.clear()
        response = await post(backend, tok, "/v1/completions", {"model": MODEL, "max_tokens": 4, **fields})
        assert response.status_code == 200, response.text
        assert [r.prompt_token_ids for r in backend.requests] == want, fields
    chat = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 4}
    backend.requests.clear()
    for fields in ({}, {"add_special_tokens": False}, {"add_special_tokens": True}):
        assert (await post(backend, tok, "/v1/chat/completions", {**chat, **fields})).status_code == 200
    templated, same, added = (r.prompt_token_ids for r in backend.requests)
    assert same == templated and added == [1, *templated]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_reasoning_parser_splits_thinking_from_the_answer(tok, tmp_path, stream) -> None:
    """With --reasoning-parser, <think> text is the message's reasoning: opened by the model, or
    left open by the chat template; before tool calls it is split off first (and left out with
    include_reasoning false). A grammar (structured output, a forced tool call) binds the answer:
    the workers apply it after the output's </think>, unless the template closed the thinking."""
    config = make_config(reasoning_parser="qwen3", tool_call_parser="hermes")
    shutil.copy(DEMO_MODEL / "tokenizer.json", tmp_path / "tokenizer.json")

    def with_template(name: str, template: str) -> GatewayTokenizer:
        (tmp_path / name).mkdir()
        shutil.copy(DEMO_MODEL / "tokenizer.json", tmp_path / name / "tokenizer.json")
        (tmp_path / name / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "</s>"}))
        return GatewayTokenizer(tmp_path / name)

    opened = with_template("opened", "{% for m in messages %}{{ m.content }}\n{% endfor %}<think>\n")
    closed = with_template("closed", "{% for m in messages %}{{ m.content }}\n{% endfor %}<think>\n\n</think>\n\n")
    think_end = tuple(tok.encode("</think>", add_special_tokens=False))
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Which is more, 2 or 1?"}], "max_tokens": 400, "stream": stream}
    named = {**tool_body({"type": "function", "function": {"name": "get_weather"}}), "stream": stream}
    required = {**tool_body("required"), "stream": stream}
    cases = [
        (tok, "<think>Two is more.</think>\n\nIt is 2.", chat, ("Two is more.", "It is 2.", [], "stop"), None),
        (opened, "Two is more.\n</think>\n\nIt is 2.", chat, ("Two is more.\n", "It is 2.", [], "stop"), None),
        (tok, "No thinking: 2.", chat, (None, "No thinking: 2.", [], "stop"), None),
        (tok, f"<think>Ask the sky.</think>\n{HERMES.split(chr(10), 1)[1]}", {**tool_body("auto"), "stream": stream},
         ("Ask the sky.", None, [("get_weather", '{"city": "Verona"}'), ("get_time", "{}")], "tool_calls"), None),
        (tok, "<think>x</think>y", {**chat, "structured_outputs": {"regex": ".*"}}, ("x", "y", [], "stop"), think_end),
        (opened, "x</think>y", {**chat, "structured_outputs": {"regex": ".*"}}, ("x", "y", [], "stop"), think_end),
        (closed, '{"a": 1}', {**chat, "response_format": {"type": "json_object"}}, (None, '{"a": 1}', [], "stop"), ()),
        (tok, '<think>Verona, then.</think>{"city":"Verona"}', named,
         ("Verona, then.", None, [("get_weather", '{"city":"Verona"}')], "stop"), think_end),
        (tok, '<think>The hour.</think>[{"name":"get_time","parameters":{}}]', required,
         ("The hour.", None, [("get_time", "{}")], "tool_calls"), think_end),
        (tok, "<think>Still thinking", named, ("Still thinking", None, [], "length"), think_end),
        # vLLM's include_reasoning: false leaves the thinking out of the answer
        (tok, "<think>Two is more.</think>\n\nIt is 2.", {**chat, "include_reasoning": False}, (None, "It is 2.", [], "stop"), None),
        (tok, '<think>The hour.</think>[{"name":"get_time","parameters":{}}]', {**required, "include_reasoning": False},
         (None, None, [("get_time", "{}")], "tool_calls"), think_end),
    ]
    for tokenizer, text, body, (reasoning, content, calls, finish), reasoning_end in cases:
        backend = ScriptedBackend(tokenizer, text)
        if finish == "length":
            body = {**body, "max_tokens": len(tokenizer.encode(text, add_special_tokens=False))}
        response = await post(backend, tokenizer, "/v1/chat/completions", body, config=config)
        assert response.status_code == 200, response.text
        if stream:
            got_reasoning, got_content, pieces, finishes = streamed_message(response)
            got_calls = [(c["function"]["name"], c["function"]["arguments"]) for c in streamed_calls(pieces)]
            got = (got_reasoning or None, got_content or None, got_calls, finishes[-1])
        else:
            choice = response.json()["choices"][0]
            message = choice["message"]
            got_calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
            got = (message["reasoning"], message["content"], got_calls, choice["finish_reason"])
        assert got == (reasoning, content, calls, finish), text
        grammar = backend.requests[0].params.structured_output
        assert (grammar and grammar.reasoning_end) == reasoning_end, text


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_granite_reasoning_parser_reads_its_thought_process(tok, stream) -> None:
    """--reasoning-parser granite: the text between "Here is my thought process:" and "Here is my
    response:" is the reasoning, the text after the answer as written. Its markers are plain text,
    so a grammar binds the whole output (no reasoning_end), which is then all answer."""
    args = build_parser().parse_args(["--model-dir", str(DEMO_MODEL), "--reasoning-parser", "granite"])
    config = make_config(reasoning_parser=config_from_args(args).reasoning_parser)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Which is more, 2 or 1?"}], "max_tokens": 400, "stream": stream}
    named = {**tool_body({"type": "function", "function": {"name": "get_weather"}}), "stream": stream}
    cases = [
        ("Here is my thought process:\nTwo is more.\n\nHere is my response:\nIt is 2.", chat,
         ("\nTwo is more.\n\n", "\nIt is 2.", []), None),
        ("Here's my thought process: sums. Here's my response: 2", chat, (" sums. ", " 2", []), None),
        ("It is 2, here is my response: 2", chat, (None, "It is 2, here is my response: 2", []), None),
        ('{"city":"Verona"}', named, (None, None, [("get_weather", '{"city":"Verona"}')]), ()),
    ]
    await assert_reasoning_cases(tok, config, cases, stream)


async def assert_reasoning_cases(tok, config, cases, stream: bool) -> None:
    """Each ``(output text, request body, (reasoning, content, calls), the grammar's reasoning_end)``
    case, answered whole or streamed."""
    for text, body, expected, reasoning_end in cases:
        backend = ScriptedBackend(tok, text, per_chunk=1)
        response = await post(backend, tok, "/v1/chat/completions", body, config=config)
        assert response.status_code == 200, response.text
        if stream:
            reasoning, content, pieces, _ = streamed_message(response)
            reasoning, content, calls = reasoning or None, content or None, streamed_calls(pieces)
        else:
            message = response.json()["choices"][0]["message"]
            reasoning, content, calls = message["reasoning"], message["content"], message["tool_calls"]
        assert (reasoning, content, [(c["function"]["name"], c["function"]["arguments"]) for c in calls]) == expected, text
        grammar = backend.requests[0].params.structured_output
        assert (grammar and grammar.reasoning_end) == reasoning_end, text


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_mistral_reasoning_parser_reads_its_think_markers(tok, stream) -> None:
    """--reasoning-parser mistral (Magistral): the text between [THINK] and [/THINK], where the
    output opens with the first, is the reasoning, the text after the answer as written. A grammar
    binds the answer: the workers apply it after the output's [/THINK] (not </think>)."""
    args = build_parser().parse_args(["--model-dir", str(DEMO_MODEL), "--reasoning-parser", "mistral"])
    config = make_config(reasoning_parser=config_from_args(args).reasoning_parser)
    think_end = tuple(tok.encode("[/THINK]", add_special_tokens=False))
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Which is more, 2 or 1?"}], "max_tokens": 400, "stream": stream}
    named = {**tool_body({"type": "function", "function": {"name": "get_weather"}}), "stream": stream}
    cases = [
        ("[THINK]Two is more.[/THINK]\nIt is 2.", chat, ("Two is more.", "\nIt is 2.", []), None),
        ("It is 2. [THINK]no[/THINK]", chat, (None, "It is 2. [THINK]no[/THINK]", []), None),
        ("[THINK]x[/THINK]y", {**chat, "structured_outputs": {"regex": ".*"}}, ("x", "y", []), think_end),
        ('[THINK]Verona, then.[/THINK]{"city":"Verona"}', named,
         ("Verona, then.", None, [("get_weather", '{"city":"Verona"}')]), think_end),
    ]
    await assert_reasoning_cases(tok, config, cases, stream)


@pytest.fixture(scope="module")
def marked(tmp_path_factory: pytest.TempPathFactory) -> GatewayTokenizer:
    """The demo tokenizer with Mistral's markers as special tokens, as Mistral's tokenizers have them."""
    return GatewayTokenizer(marked_tokenizer(tmp_path_factory.mktemp("marked")))


MISTRAL_CALLS = '[TOOL_CALLS]get_weather[ARGS]{"city": "Verona"}[TOOL_CALLS]get_time[CALL_ID]a1B2c3D4e[ARGS]{}</s>'
MISTRAL_READ = [("get_weather", '{"city": "Verona"}'), ("get_time", "{}")]


async def chat_answer(tok: GatewayTokenizer, config: GatewayConfig, body: dict, text: str) -> tuple:
    """The answer ``text`` to ``body``, whole or streamed token by token: its reasoning, content,
    calls (names and arguments), their ids and its finish reason."""
    response = await post(ScriptedBackend(tok, text, per_chunk=1), tok, "/v1/chat/completions", body, config=config)
    assert response.status_code == 200, response.text
    if body.get("stream"):
        reasoning, content, pieces, finishes = streamed_message(response)
        calls: dict[int, list[str]] = {}
        for p in pieces:
            call = calls.setdefault(p["index"], [p.get("id"), p["function"].get("name"), ""])
            call[2] += p["function"]["arguments"]
        return (reasoning or None, content or None, [(n, a) for _, n, a in calls.values()],
                [i for i, _, _ in calls.values()], finishes[-1])
    (choice,) = response.json()["choices"]
    message = choice["message"]
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
    return message["reasoning"], message["content"], calls, [c["id"] for c in message["tool_calls"]], choice["finish_reason"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_mistral_markers_that_are_special_tokens_reach_the_parsers(marked, stream) -> None:
    """Where Mistral's markers are special tokens, --tool-call-parser mistral (v11 and v13 calls)
    and --reasoning-parser mistral read them with skip_special_tokens on, its default: the text
    keeps them for the parsers, which take them out, and still skips the EOS."""
    config = make_config(tool_call_parser="mistral", reasoning_parser="mistral")
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Which is more, 2 or 1?"}], "max_tokens": 400,
            "stream": stream}
    auto = {**tool_body("auto"), "stream": stream}
    cases = [
        ("[THINK]Two is more.[/THINK]It is 2.</s>", chat, ("Two is more.", "It is 2.", [], "stop")),
        (f"Let me look.{MISTRAL_CALLS}", auto, (None, "Let me look.", MISTRAL_READ, "tool_calls")),
        (f"[THINK]Ask the sky.[/THINK]{MISTRAL_CALLS}", auto, ("Ask the sky.", None, MISTRAL_READ, "tool_calls")),
    ]
    for text, body, expected in cases:
        reasoning, content, calls, ids, finish = await chat_answer(marked, config, body, text)
        assert (reasoning, content, calls, finish) == expected, text
        assert ids[1:] == (["a1B2c3D4e"] if calls else []) and all(re.fullmatch("[A-Za-z0-9]{9}", i) for i in ids)


async def test_special_tokens_no_parser_reads_are_skipped_as_before(marked) -> None:
    """Without the parsers, where the tool-call parser does not read the answer (no tools,
    tool_choice 'none') and in completions, every special token is skipped, markers too; with
    skip_special_tokens false, every one is kept, the EOS too."""
    parsers = make_config(tool_call_parser="mistral", reasoning_parser="mistral")
    thinking, calls = "[THINK]Two is more.[/THINK]It is 2.</s>", f"Let me look.{MISTRAL_CALLS}"
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Weather in Verona?"}], "max_tokens": 400}
    skipped = 'Let me look.get_weather{"city": "Verona"}get_timea1B2c3D4e{}'
    cases = [
        (make_config(), chat, thinking, (None, "Two is more.It is 2.", [], "stop")),
        (make_config(), {**chat, "skip_special_tokens": False}, thinking, (None, thinking, [], "stop")),
        (parsers, chat, calls, (None, skipped, [], "stop")),
        (parsers, tool_body("none"), calls, (None, skipped, [], "stop")),
    ]
    for config, body, text, expected in cases:
        reasoning, content, got_calls, _, finish = await chat_answer(marked, config, body, text)
        assert (reasoning, content, got_calls, finish) == expected, (body, text)
    completion = await post(ScriptedBackend(marked, calls), marked, "/v1/completions",
                            {"model": MODEL, "prompt": "x", "max_tokens": 400}, config=parsers)
    assert completion.json()["choices"][0]["text"] == skipped


def tool_template_tokenizer(directory) -> GatewayTokenizer:
    """The demo tokenizer with a chat template that writes the tools, each call and each result."""
    template = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}{{ m.role }}:"
                "{% for c in m.tool_calls or [] %}{{ c.function.name }}({{ c.function.arguments.city }}){% endfor %}"
                "{{ m.tool_call_id or '' }}{{ m.content }};{% endfor %}")
    shutil.copy(DEMO_MODEL / "tokenizer.json", directory / "tokenizer.json")
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "</s>"}))
    return GatewayTokenizer(directory)


async def test_earlier_tool_calls_and_results_reach_the_template(tok, tmp_path) -> None:
    """An assistant's tool_calls (arguments as objects) and a tool's result, with the tools; /tokenize
    renders them alike."""
    tool_tok = tool_template_tokenizer(tmp_path)
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Verona"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
    ]
    backend = ScriptedBackend(tool_tok, "{}")
    body = {**tool_body({"type": "function", "function": {"name": "get_time"}}), "messages": messages}
    assert (await post(backend, tool_tok, "/v1/chat/completions", body)).status_code == 200
    rendered = tool_tok.decode(backend.requests[0].prompt_token_ids)
    assert rendered == "[get_weather][get_time]user:Weather?;assistant:get_weather(Verona);tool:call_1rain;"
    tokenized = await post(backend, tool_tok, "/tokenize", {"model": MODEL, "messages": messages, "tools": [WEATHER, CLOCK]})
    assert tokenized.json()["tokens"] == backend.requests[0].prompt_token_ids


async def test_backend_error_and_unexpected_error(tok) -> None:
    backend = FakeBackend(tok, error=BackendError("no decode worker is reachable", 503))
    body = {"model": MODEL, "prompt": "x", "max_tokens": 4}
    assert "no decode worker" in assert_error(await post(backend, tok, "/v1/completions", body), 503)["message"]
    assert "no decode worker" in assert_error(
        await post(backend, tok, "/v1/completions", {**body, "stream": True}), 503
    )["message"]

    class Broken(FakeBackend):
        async def generate(self, request):  # type: ignore[override]
            raise KeyError("bug")
            yield  # pragma: no cover

    error = assert_error(await post(Broken(tok), tok, "/v1/completions", body), 500)
    assert "bug" not in error["message"]


async def test_backend_failure_mid_stream_sends_error_event_and_is_logged(tok, caplog: pytest.LogCaptureFixture) -> None:
    """A failure after tokens were streamed reaches the client as an error event, and the log as
    one before the first event does (a request's last worker failure, which leaves that worker
    penalized, is no retry's: it was in no log)."""
    backend = FakeBackend(tok, per_chunk=2, fail_after=4)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 20, "stream": True}
    with caplog.at_level(logging.ERROR, logger="baton.services.gateway.streaming"):
        events = sse_events(await post(backend, tok, "/v1/completions", body))
    assert events[-1] == "[DONE]"
    assert "went away" in json.loads(events[-2])["error"]["message"]
    assert [r.getMessage() for r in caplog.records] == ["request failed: decode worker 127.0.0.1:1 went away"]


# ---- completions --------------------------------------------------------------


async def test_completion_streaming_matches_non_streaming(tok) -> None:
    body = {"model": MODEL, "prompt": "JULIET:\nO Romeo", "max_tokens": 64, "seed": 3}
    full = (await post(FakeBackend(tok), tok, "/v1/completions", body)).json()
    assert full["object"] == "text_completion" and full["model"] == MODEL and full["id"].startswith("cmpl-")
    [choice] = full["choices"]
    assert choice["text"] == tok.decode(tok.encode(SCRIPTS[0])[1:])
    assert choice["finish_reason"] == "stop" and choice["logprobs"] is None

    events = sse_events(await post(FakeBackend(tok), tok, "/v1/completions", {**body, "stream": True}))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert all(set(c["choices"][0]) == {"index", "text", "logprobs", "finish_reason", "stop_reason"} for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all("\ufffd" not in c["choices"][0]["text"] for c in chunks)


def test_a_choice_names_its_stop_string_or_stop_token_as_vllm_does(tok) -> None:
    """vLLM's ``stop_reason``: the stop string that matched, or the ``stop_token_ids`` token the
    workers stopped on; none for an EOS token (unless ``ignore_eos``), a length finish or a stop
    token that did not end the output."""
    from baton.engine.sampling_params import SamplingParams
    from baton.services.gateway.choice import Choice, Prompt
    from baton.services.gateway.tokenizer import IncrementalDetokenizer, StopStringMatcher

    eos = tok.eos_token_id

    def run(tokens: list[int], finish: str, stop: list[str] = (), **params) -> tuple[str | None, int | str | None]:
        request = GenerationRequest("r-0", [1, 5], SamplingParams(**params))
        choice = Choice(0, 0, Prompt([1, 5]), request, IncrementalDetokenizer(tok, [1, 5]), StopStringMatcher(list(stop)),
                        eos_token_ids=frozenset({eos}))
        first = choice.consume(GenerationChunk(tokens=[TokenLogprob(tokens[0], 0.0)]))
        last = choice.consume(GenerationChunk(tokens=[TokenLogprob(t, 0.0) for t in tokens[1:]], finish_reason=finish))
        assert first.stop_reason is None and last.stop_reason == choice.stop_reason
        return choice.finish_reason, choice.stop_reason

    romeo = tok.encode(" Romeo, Romeo!", add_special_tokens=False)
    comma = tok.encode(",", add_special_tokens=False)[0]
    assert run(romeo, "length", stop=["eo,"]) == ("stop", "eo,")
    assert run(romeo, "stop", stop=["Romeo!"]) == ("stop", "Romeo!")   # completed by the final flush
    assert run([*romeo[:2], comma], "stop", stop_token_ids=[comma]) == ("stop", comma)
    assert run([romeo[0], comma], "stop", stop_token_ids=[comma]) == ("stop", comma)   # the stop token in the last chunk alone
    assert run([romeo[0], eos], "stop", stop_token_ids=[eos]) == ("stop", None)
    assert run([romeo[0], eos], "stop", stop_token_ids=[eos], ignore_eos=True) == ("stop", eos)
    assert run([romeo[0], eos], "stop") == ("stop", None)
    assert run([comma, romeo[0]], "length", stop_token_ids=[comma], min_tokens=2) == ("length", None)


async def test_stop_reason_in_completions_and_chat_streamed_or_not(tok) -> None:
    """Each choice says its ``stop_reason`` (null where none stopped it), a stream on its final chunk."""
    text = tok.decode(tok.encode(SCRIPTS[0])[1:])
    stop = text.split()[3]
    body = {"model": MODEL, "prompt": "x", "max_tokens": 64, "stop": [stop]}
    full = (await post(FakeBackend(tok), tok, "/v1/completions", body)).json()["choices"][0]
    assert (full["finish_reason"], full["stop_reason"]) == ("stop", stop)
    chunks = [json.loads(e) for e in sse_events(await post(FakeBackend(tok), tok, "/v1/completions",
                                                          {**body, "stream": True}))[:-1]]
    assert [c["choices"][0]["stop_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [stop]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 64, "stop": [stop]}
    assert (await post(FakeBackend(tok), tok, "/v1/chat/completions", chat)).json()["choices"][0]["stop_reason"] == stop
    events = sse_events(await post(FakeBackend(tok), tok, "/v1/chat/completions", {**chat, "stream": True}))
    finals = [c["choices"][0] for c in map(json.loads, events[:-1]) if c["choices"][0]["finish_reason"]]
    assert [(f["finish_reason"], f["stop_reason"]) for f in finals] == [("stop", stop)]
    plain = (await post(FakeBackend(tok), tok, "/v1/completions", {**body, "stop": []})).json()["choices"][0]
    assert plain["stop_reason"] is None


async def test_x_request_id_names_the_request_and_comes_back_on_request(tok) -> None:
    """vLLM's ``request_id``: the ``X-Request-Id`` header's (over the body's field) names the
    response and the workers' sequences; with ``--enable-request-id-headers`` every generation
    response (streamed, refused) carries it back, a fresh one where the client sent none."""
    backend, echo = FakeBackend(tok), make_config(enable_request_id_headers=True)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2, "request_id": "from-the-body"}
    plain = await post(backend, tok, "/v1/completions", body, headers={"X-Request-Id": "trace-7"})
    assert plain.json()["id"] == "cmpl-trace-7" and "x-request-id" not in plain.headers
    assert (await post(backend, tok, "/v1/completions", body, echo)).json()["id"] == "cmpl-from-the-body"
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "stream": True}
    streamed = await post(backend, tok, "/v1/chat/completions", chat, echo, headers={"X-Request-Id": "trace-8"})
    assert streamed.headers["x-request-id"] == "trace-8"
    assert {json.loads(e)["id"] for e in sse_events(streamed)[:-1]} == {"chatcmpl-trace-8"}
    fresh = await post(backend, tok, "/v1/completions", {**body, "request_id": None}, echo)
    assert fresh.json()["id"] == f"cmpl-{fresh.headers['x-request-id']}" and len(fresh.headers["x-request-id"]) == 32
    named = ["cmpl-trace-7", "cmpl-from-the-body", "chatcmpl-trace-8", fresh.json()["id"]]
    assert [r.request_id for r in backend.requests] == [f"{worker_name(backend, i)}-0" for i in named]
    again = await post(backend, tok, "/v1/completions", body, headers={"X-Request-Id": "trace-7"})
    assert again.json()["id"] == "cmpl-trace-7" and backend.requests[-1].request_id != backend.requests[0].request_id
    await post(backend, tok, "/v1/embeddings", {"model": MODEL, "input": "x"}, headers={"X-Request-Id": "trace-9"})
    assert backend.embeds[-1].request_id.startswith("embd-trace-9")
    refused = await post(backend, tok, "/v1/completions", {**body, "temperature": -1}, echo, headers={"X-Request-Id": "t"})
    assert refused.status_code == 400 and refused.headers["x-request-id"] == "t"
    for bad in ("has space", "x" * 129, "é"):
        assert_error(await post(backend, tok, "/v1/completions", {**body, "request_id": bad}), 400, "request_id")
    assert_error(await post(backend, tok, "/v1/completions", body, headers={"X-Request-Id": "a b"}), 400, "request_id")


async def test_enable_log_requests_logs_each_prompt_cut_to_max_log_len(tok, caplog: pytest.LogCaptureFixture) -> None:
    backend, body = FakeBackend(tok), {"model": MODEL, "prompt": ["JULIET:\nO Romeo", "x"], "max_tokens": 2, "n": 2}
    with caplog.at_level(logging.INFO, logger="baton.services.gateway.preparation"):
        await post(backend, tok, "/v1/completions", body)
        assert caplog.records == []                       # off by default, as in vLLM
        config = make_config(enable_log_requests=True, max_log_len=5)
        out = (await post(backend, tok, "/v1/completions", body, config)).json()
        await post(backend, tok, "/v1/embeddings", {"model": MODEL, "input": "JULIET"}, config)
    named = worker_name(backend, out["id"])
    ids = tok.encode("JULIET:\nO Romeo")
    first, second, embedding = (r.getMessage() for r in caplog.records)
    assert first.startswith(f"request {named}-0: prompt 'JULIE', prompt_token_ids {ids[:5]}, params SamplingParams(")
    assert first.endswith(", lora None") and "max_tokens=2" in first
    assert second.startswith(f"request {named}-2: prompt 'x', prompt_token_ids {tok.encode('x')}")
    assert re.match(r"request embd-[0-9a-f]{32}-[0-9a-f]{8}-0: prompt 'JULIE', .* params None, lora None", embedding)


async def test_usage_cached_tokens_and_include_usage(tok) -> None:
    prompt = "JULIET:\nO Romeo"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 7}
    full = (await post(FakeBackend(tok, cached_tokens=4), tok, "/v1/completions", body)).json()
    n_prompt = len(tok.encode(prompt))
    assert full["usage"] == {
        "prompt_tokens": n_prompt, "completion_tokens": 7, "total_tokens": n_prompt + 7,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    assert full["choices"][0]["finish_reason"] == "length"
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    events = sse_events(await post(FakeBackend(tok, cached_tokens=4), tok, "/v1/completions", body))
    usage_chunk = json.loads(events[-2])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == full["usage"]
    assert all(json.loads(e)["usage"] is None for e in events[:-2])

    # vLLM's continuous_usage_stats: each chunk carries the usage so far (FakeBackend: 3 tokens a chunk).
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 7, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    for path, request in (("/v1/completions", {**body, "stream_options": chat["stream_options"]}), ("/v1/chat/completions", chat)):
        chunks = [json.loads(e) for e in sse_events(await post(FakeBackend(tok), tok, path, request))[:-1]]
        counts = [c["usage"]["completion_tokens"] for c in chunks]
        assert counts == sorted(counts) and counts[-1] == 7 and all(c["usage"] for c in chunks)
        assert chunks[-1]["choices"] == [] and counts[-2] == 7

    # vLLM's --enable-force-include-usage: a stream that did not ask ends with the usage all the same.
    plain = {**body, "stream_options": None}
    assert all(json.loads(e)["usage"] is None for e in sse_events(await post(FakeBackend(tok), tok, "/v1/completions", plain))[:-1])
    forced = make_config(enable_force_include_usage=True)
    for path, request in (("/v1/completions", plain), ("/v1/chat/completions", {**chat, "stream_options": None})):
        chunks = [json.loads(e) for e in sse_events(await post(FakeBackend(tok), tok, path, request, forced))[:-1]]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 7
        assert all(c["usage"] is None for c in chunks[:-1])


async def test_stop_string_truncates_without_leaking_and_aborts(tok) -> None:
    # "wherefore" is split over several tokens and chunks of one token each.
    for per_chunk in (1, 2, 5):
        for stream in (False, True):
            backend = FakeBackend(tok, per_chunk=per_chunk)
            body = {"model": MODEL, "prompt": "x", "max_tokens": 40, "stop": ["zzz", "wherefore"], "stream": stream}
            response = await post(backend, tok, "/v1/completions", body)
            if stream:
                chunks = [json.loads(e) for e in sse_events(response)[:-1]]
                text = "".join(c["choices"][0]["text"] for c in chunks)
                finish = chunks[-1]["choices"][0]["finish_reason"]
            else:
                text, finish = response.json()["choices"][0]["text"], response.json()["choices"][0]["finish_reason"]
            assert text == "O Romeo, Romeo! "
            assert finish == "stop"
            assert backend.aborted == [backend.requests[0].request_id]  # the backend iterator was closed early


def worker_name(backend: FakeBackend, response_id: str) -> str:
    """The workers' name for the request answered as ``response_id`` (its samples' ids less their
    index): the response's id and a random suffix."""
    (named,) = {r.request_id.rsplit("-", 1)[0] for r in backend.requests if r.request_id.startswith(f"{response_id}-")}
    assert re.fullmatch(rf"{re.escape(response_id)}-[0-9a-f]{{8}}", named), named
    return named


async def test_n_fans_out_with_seeds_and_distinct_indexes(tok) -> None:
    backend = FakeBackend(tok)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 6, "n": 2, "seed": 10}
    full = (await post(backend, tok, "/v1/completions", body)).json()
    assert sorted(c["index"] for c in full["choices"]) == [0, 1]
    assert full["choices"][0]["text"] != full["choices"][1]["text"]
    named = worker_name(backend, full["id"])
    assert sorted(r.request_id for r in backend.requests) == [f"{named}-0", f"{named}-1"]
    assert sorted(r.params.seed for r in backend.requests) == [10, 11]
    assert all(r.params.n == 1 for r in backend.requests)
    last = FakeBackend(tok)   # the largest seed: the next sample's wraps, as the engine's seed + i does modulo 2**64
    assert (await post(last, tok, "/v1/completions", {**body, "seed": 2**64 - 1})).status_code == 200
    assert sorted(r.params.seed for r in last.requests) == [0, 2**64 - 1]
    assert full["usage"]["completion_tokens"] == 12
    assert full["usage"]["prompt_tokens"] == len(tok.encode("x"))

    events = sse_events(await post(FakeBackend(tok), tok, "/v1/completions", {**body, "stream": True}))
    by_index: dict[int, str] = {0: "", 1: ""}
    for e in events[:-1]:
        for c in json.loads(e)["choices"]:
            by_index[c["index"]] += c["text"]
    assert by_index == {c["index"]: c["text"] for c in full["choices"]}


async def test_later_samples_start_beside_the_first_once_it_decodes(tok) -> None:
    """n=3 over two prompts of two blocks and more: each prompt's samples 1 and 2 start only
    after its sample 0 has its second token, asking to run where sample 0 runs. A prompt of
    one block or less has no block to share: its samples start at once, anywhere."""
    backend = FakeBackend(tok, per_chunk=1, delay=0.001)
    long_prompts = [list(range(100, 140)), list(range(200, 233))]   # 40 and 33 tokens, blocks of 16
    body = {"model": MODEL, "prompt": long_prompts, "max_tokens": 6, "n": 3, "seed": 10}
    full = (await post(backend, tok, "/v1/completions", body)).json()
    assert sorted(c["index"] for c in full["choices"]) == list(range(6))
    by_id, named = {r.request_id: r for r in backend.requests}, worker_name(backend, full["id"])
    for p in (0, 1):
        leader = f"{named}-{3 * p}"
        second_token = [i for i, e in enumerate(backend.events) if e == ("chunk", leader)][1]
        assert by_id[leader].colocate == ()
        for sample in (1, 2):
            rid = f"{named}-{3 * p + sample}"
            assert backend.events.index(("start", rid)) > second_token
            assert by_id[rid].colocate == ("prefill-of", leader) and by_id[rid].params.seed == 10 + sample

    backend = FakeBackend(tok, per_chunk=1, delay=0.001)
    short = (await post(backend, tok, "/v1/completions", {**body, "prompt": list(range(100, 116))})).json()
    assert backend.events[:3] == [("start", f"{worker_name(backend, short['id'])}-{i}") for i in range(3)]
    assert all(r.colocate == () for r in backend.requests)


async def test_batched_prompts_and_token_prompts(tok) -> None:
    backend = FakeBackend(tok)
    ids = tok.encode("ROMEO:")
    body = {"model": MODEL, "prompt": [ids, ids[:2]], "max_tokens": 3}
    full = (await post(backend, tok, "/v1/completions", body)).json()
    assert [c["index"] for c in full["choices"]] == [0, 1]
    assert [r.prompt_token_ids for r in backend.requests] == [ids, ids[:2]]
    assert full["usage"]["prompt_tokens"] == len(ids) + 2


async def test_default_max_tokens_is_the_remaining_context(tok) -> None:
    backend = FakeBackend(tok)
    await post(backend, tok, "/v1/completions", {"model": MODEL, "prompt": "x"}, make_config(max_model_len=50))
    assert backend.requests[0].params.max_tokens == 50 - len(tok.encode("x"))


async def test_completion_logprobs_and_echo(tok) -> None:
    prompt = "JULIET:\nO"
    prompt_ids = tok.encode(prompt)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 5, "logprobs": 2}
    choice = (await post(FakeBackend(tok), tok, "/v1/completions", body)).json()["choices"][0]
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    out_ids = tok.encode(SCRIPTS[0])[1:6]
    assert lp["tokens"] == [tok.token_text(t) for t in out_ids]
    assert lp["token_logprobs"] == pytest.approx([-0.25 * i - 0.01 for i in range(5)])
    assert all(len(top) == 2 and top[tok.token_text(t)] == l for top, t, l in zip(lp["top_logprobs"], out_ids, lp["token_logprobs"]))
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert all(choice["text"][o:].startswith(t) for o, t in zip(lp["text_offset"], lp["tokens"]))

    echoed = (await post(FakeBackend(tok), tok, "/v1/completions", {**body, "echo": True})).json()["choices"][0]
    assert echoed["text"] == prompt + choice["text"]
    elp = echoed["logprobs"]
    assert elp["tokens"][: len(prompt_ids)] == [tok.token_text(t) for t in prompt_ids]
    assert elp["token_logprobs"][0] is None and elp["top_logprobs"][0] is None
    assert all(v is not None for v in elp["token_logprobs"][1:])
    assert elp["text_offset"][len(prompt_ids):] == [len(prompt) + o for o in lp["text_offset"]]

    plain_echo = (await post(FakeBackend(tok), tok, "/v1/completions", {**body, "echo": True, "logprobs": None})).json()
    assert plain_echo["choices"][0]["text"] == echoed["text"]
    assert "prompt_logprobs" not in echoed and "prompt_logprobs" not in choice   # only for those who ask


async def test_echo_with_max_tokens_0_scores_the_prompt_alone(tok) -> None:
    """OpenAI's older API and vLLM's: echo with max_tokens 0 answers the prompt's text and, with
    logprobs, its tokens' (the first none), with nothing generated: the workers generate one token,
    which the answer leaves out (its text, log-probs and ids, the usage's count), finished by length."""
    prompt = "JULIET:\nO Romeo"
    prompt_ids = tok.encode(prompt)
    body = {"model": MODEL, "prompt": [prompt, "ROMEO:"], "max_tokens": 0, "echo": True, "logprobs": 1, "return_token_ids": True}
    backend = FakeBackend(tok)
    out = (await post(backend, tok, "/v1/completions", body)).json()
    assert [r.params.max_tokens for r in backend.requests] == [1, 1]
    first = out["choices"][0]
    assert [c["text"] for c in out["choices"]] == [prompt, "ROMEO:"]
    assert first["finish_reason"] == "length" and first["stop_reason"] is None and first["token_ids"] == []
    lp = first["logprobs"]
    assert lp["tokens"] == [tok.token_text(t) for t in prompt_ids] and lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == [-0.5 * (i % 3 + 1) for i in range(len(prompt_ids) - 1)]
    assert out["usage"]["completion_tokens"] == 0 and out["usage"]["prompt_tokens"] == len(prompt_ids) + len(tok.encode("ROMEO:"))
    response = await post(FakeBackend(tok), tok, "/v1/completions",
                          {**body, "prompt": prompt, "stream": True, "stream_options": {"include_usage": True}})
    events = [json.loads(e) for e in sse_events(response)[:-1]]
    texts = [c["text"] for e in events for c in e["choices"]]
    assert "".join(texts) == prompt and events[-1]["usage"]["completion_tokens"] == 0
    assert [c["finish_reason"] for e in events for c in e["choices"]][-1] == "length"
    for bad in ({"echo": False}, {"use_beam_search": True}):
        assert_error(await post(FakeBackend(tok), tok, "/v1/completions", {**body, **bad}), 400)


def assert_prompt_logprobs(tok: GatewayTokenizer, entries: list, prompt_ids: list[int], k: int) -> None:
    """vLLM's shape, over the fake backend's prompt log-probs (token ``i`` ranked ``(i - 1) % 3 + 1``):
    one entry per prompt token, the first null; each keyed by token ids, holding the prompt's
    token with its rank and the top-``k`` alternatives ranked 1 to ``k``."""
    assert len(entries) == len(prompt_ids) and entries[0] is None
    for i, (entry, token_id) in enumerate(zip(entries[1:], prompt_ids[1:])):
        rank = i % 3 + 1
        assert entry[str(token_id)] == {"logprob": -0.5 * rank, "rank": rank, "decoded_token": tok.token_text(token_id)}
        others = {key: v for key, v in entry.items() if key != str(token_id)}
        assert len(entry) == (k if rank <= k else k + 1)
        assert sorted(v["rank"] for v in others.values()) == [r for r in range(1, k + 1) if r != rank]
        assert all(v["decoded_token"] == tok.token_text(int(key)) and v["logprob"] == -0.5 * v["rank"]
                   for key, v in others.items())


async def test_completion_prompt_logprobs_come_once_per_prompt(tok) -> None:
    """vLLM's ``prompt_logprobs`` on each choice: every sample of a prompt carries its prompt's,
    which only the first sample computes (the others start beside it, once it decodes)."""
    prompts = ["JULIET:\nO Romeo, Romeo!", "ROMEO:"]
    backend = FakeBackend(tok)
    body = {"model": MODEL, "prompt": prompts, "max_tokens": 4, "n": 2, "prompt_logprobs": 2}
    out = (await post(backend, tok, "/v1/completions", body)).json()
    for choice in out["choices"]:
        assert_prompt_logprobs(tok, choice["prompt_logprobs"], tok.encode(prompts[choice["index"] // 2]), 2)
    asked, named = {r.request_id: r.params.prompt_logprobs for r in backend.requests}, worker_name(backend, out["id"])
    assert asked == {f"{named}-{i}": k for i, k in enumerate([2, None, 2, None])}
    for leader, follower in ((0, 1), (2, 3)):   # the second sample starts after the first's prompt log-probs
        first_chunk = backend.events.index(("chunk", f"{named}-{leader}"))
        assert backend.events.index(("start", f"{named}-{follower}")) > first_chunk
    zero = (await post(FakeBackend(tok), tok, "/v1/completions", {**body, "prompt_logprobs": 0, "n": 1})).json()
    assert_prompt_logprobs(tok, zero["choices"][0]["prompt_logprobs"], tok.encode(prompts[0]), 0)


async def test_prompt_logprobs_with_echo_keep_each_its_own_top_k(tok) -> None:
    prompt = "JULIET:\nO Romeo"
    prompt_ids = tok.encode(prompt)
    backend = FakeBackend(tok)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 3, "echo": True, "logprobs": 1, "prompt_logprobs": 3}
    choice = (await post(backend, tok, "/v1/completions", body)).json()["choices"][0]
    assert backend.requests[0].params.prompt_logprobs == 3          # one computation serves both
    assert_prompt_logprobs(tok, choice["prompt_logprobs"], prompt_ids, 3)
    echoed = choice["logprobs"]
    assert echoed["token_logprobs"][: len(prompt_ids)] == [None] + [-0.5 * (i % 3 + 1) for i in range(len(prompt_ids) - 1)]
    assert all(len(top) == 1 for top in echoed["top_logprobs"][1:])


async def test_chat_prompt_logprobs_are_the_responses(tok) -> None:
    """On a chat completion, vLLM's ``prompt_logprobs`` is the response's (the rendered prompt's),
    not a choice's; a stream may ask for 0 of them, and gets none."""
    backend = FakeBackend(tok)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Speak, Juliet!"}], "max_tokens": 3, "n": 2,
            "prompt_logprobs": 1}
    out = (await post(backend, tok, "/v1/chat/completions", body)).json()
    assert_prompt_logprobs(tok, out["prompt_logprobs"], backend.requests[0].prompt_token_ids, 1)
    assert all("prompt_logprobs" not in c for c in out["choices"])
    assert [r.params.prompt_logprobs for r in backend.requests] == [1, None]
    plain = (await post(FakeBackend(tok), tok, "/v1/chat/completions", {**body, "prompt_logprobs": None})).json()
    assert "prompt_logprobs" not in plain
    streamed = FakeBackend(tok)
    response = await post(streamed, tok, "/v1/chat/completions", {**body, "prompt_logprobs": 0, "stream": True})
    assert response.status_code == 200 and sse_events(response)[-1] == "[DONE]"
    assert all(r.params.prompt_logprobs is None for r in streamed.requests)
    assert "prompt_logprobs" not in response.text


async def test_prompt_logprobs_a_worker_left_short_are_an_error(tok) -> None:
    class Short(FakeBackend):
        async def generate(self, request):
            async for chunk in super().generate(request):
                if chunk.prompt_logprobs:
                    chunk.prompt_logprobs = chunk.prompt_logprobs[1:]
                yield chunk

    body = {"model": MODEL, "prompt": "JULIET:\nO Romeo", "max_tokens": 3, "prompt_logprobs": 1}
    assert "scored" in assert_error(await post(Short(tok), tok, "/v1/completions", body), 502)["message"]


# ---- chat ---------------------------------------------------------------------


async def test_chat_joins_text_parts_by_newlines_as_vllm_does(tok) -> None:
    parts = [{"type": "text", "text": "Speak,"}, {"type": "text", "text": "Romeo."}]
    backend = FakeBackend(tok)
    for content in (parts, "Speak,\nRomeo."):
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_completion_tokens": 2}
        assert (await post(backend, tok, "/v1/chat/completions", body)).status_code == 200
    assert backend.requests[0].prompt_token_ids == backend.requests[1].prompt_token_ids


async def test_chat_applies_template_and_streams_in_openai_format(tok) -> None:
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "Be Juliet."}, {"role": "user", "content": [{"type": "text", "text": "Speak!"}]}]
    plain = [{"role": "system", "content": "Be Juliet."}, {"role": "user", "content": "Speak!"}]
    expected = AutoTokenizer.from_pretrained(str(DEMO_MODEL)).apply_chat_template(plain, tokenize=True, add_generation_prompt=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)

    backend = FakeBackend(tok)
    body = {"model": MODEL, "messages": messages, "max_completion_tokens": 12}
    full = (await post(backend, tok, "/v1/chat/completions", body)).json()
    assert backend.requests[0].prompt_token_ids == expected
    assert full["object"] == "chat.completion" and full["id"].startswith("chatcmpl-")
    [choice] = full["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert full["usage"]["prompt_tokens"] == len(expected) and full["usage"]["completion_tokens"] == 12

    events = sse_events(await post(FakeBackend(tok), tok, "/v1/chat/completions", {**body, "stream": True}))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == choice["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_chat_echo_starts_the_answer_with_the_last_message_in_its_role(tok) -> None:
    """vLLM's chat ``echo``: a continued assistant message comes back whole (streamed: its text on
    the role's chunk); a last message in another role than the answer's is not echoed."""
    messages = [{"role": "user", "content": "Speak!"}, {"role": "assistant", "content": "O Romeo, Romeo"}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 4, "add_generation_prompt": False,
            "continue_final_message": True}
    plain = (await post(FakeBackend(tok), tok, "/v1/chat/completions", body)).json()["choices"][0]["message"]["content"]
    echoed = (await post(FakeBackend(tok), tok, "/v1/chat/completions", {**body, "echo": True})).json()
    assert echoed["choices"][0]["message"]["content"] == "O Romeo, Romeo" + plain and plain
    chunks = [json.loads(e) for e in sse_events(await post(FakeBackend(tok), tok, "/v1/chat/completions",
                                                           {**body, "echo": True, "stream": True}))[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "O Romeo, Romeo"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "O Romeo, Romeo" + plain
    asked = {"model": MODEL, "messages": messages[:1], "max_tokens": 4, "echo": True}    # answered as the assistant
    content = (await post(FakeBackend(tok), tok, "/v1/chat/completions", asked)).json()["choices"][0]["message"]["content"]
    assert content == plain


async def test_response_role_names_a_new_answer_and_a_continued_message_keeps_its_own(tok) -> None:
    """vLLM's ``--response-role``: the role of an answer the prompt asks for, whole and streamed;
    without ``add_generation_prompt`` the answer continues the last message, in that message's
    role (which ``echo`` then repeats)."""
    config = make_config(response_role="narrator")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Speak!"}], "max_tokens": 4}
    answer = (await post(FakeBackend(tok), tok, "/v1/chat/completions", body, config)).json()["choices"][0]["message"]
    assert answer["role"] == "narrator" and answer["content"]
    streamed = sse_events(await post(FakeBackend(tok), tok, "/v1/chat/completions", {**body, "stream": True}, config))
    assert json.loads(streamed[0])["choices"][0]["delta"] == {"role": "narrator", "content": ""}
    continued = {**body, "add_generation_prompt": False, "echo": True}
    answer = (await post(FakeBackend(tok), tok, "/v1/chat/completions", continued, config)).json()["choices"][0]["message"]
    assert answer["role"] == "user" and answer["content"].startswith("Speak!") and len(answer["content"]) > len("Speak!")
    plain = (await post(FakeBackend(tok), tok, "/v1/chat/completions", body)).json()["choices"][0]["message"]
    assert plain["role"] == "assistant"


async def test_chat_template_options_match_transformers(tok) -> None:
    """add_generation_prompt, continue_final_message and chat_template_kwargs render what
    transformers renders (the demo template ignores unknown variables); bad combinations are 400s."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    messages = [{"role": "user", "content": "Speak!"}, {"role": "assistant", "content": "O Romeo, Romeo"}]
    cases = [
        ({"add_generation_prompt": False}, {"add_generation_prompt": False}),
        ({"add_generation_prompt": False, "continue_final_message": True},
         {"add_generation_prompt": False, "continue_final_message": True}),
        ({"chat_template_kwargs": {"enable_thinking": False}}, {"add_generation_prompt": True, "enable_thinking": False}),
    ]
    for options, hf_options in cases:
        backend = FakeBackend(tok)
        body = {"model": MODEL, "messages": messages, "max_tokens": 4, **options}
        assert (await post(backend, tok, "/v1/chat/completions", body)).status_code == 200
        expected = hf.apply_chat_template(messages, tokenize=True, **hf_options)
        assert backend.requests[0].prompt_token_ids == list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    continued = tok.encode_chat(messages, add_generation_prompt=False, continue_final_message=True)
    assert tok.decode(continued, skip_special_tokens=False).endswith("O Romeo, Romeo")

    for options in ({"continue_final_message": True}, {"add_generation_prompt": False, "continue_final_message": True,
                                                       "messages": messages[:1]}):
        body = {"model": MODEL, "messages": messages, "max_tokens": 4, **options}
        assert_error(await post(FakeBackend(tok), tok, "/v1/chat/completions", body), 400, "continue_final_message")


async def test_a_chat_template_flag_renders_chat_requests(tok) -> None:
    """With ``--chat-template``, chat requests (and /tokenize's messages) go through it, not the model's."""
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    custom = GatewayTokenizer(DEMO_MODEL, template)
    backend = FakeBackend(custom)
    config = make_config(chat_template=template)
    messages = [{"role": "user", "content": "Speak!"}]
    chat = (await post(backend, custom, "/tokenize", {"model": MODEL, "messages": messages}, config)).json()
    assert chat["tokens"] == tok.encode("<user>Speak!<assistant>", add_special_tokens=False)
    await post(backend, custom, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 2}, config)
    assert backend.requests[-1].prompt_token_ids == chat["tokens"]


async def test_documents_reach_a_rag_template_as_transformers_hands_them(tok) -> None:
    """vLLM's ``documents`` (chat, and /tokenize's messages): the template sees them as the
    ``documents`` variable, rendering what transformers renders with them."""
    from transformers import AutoTokenizer

    template = ("{% for d in documents or [] %}[doc {{ loop.index }}: {{ d['title'] }}] {{ d['text'] }}\n{% endfor %}"
                "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>")
    custom, config = GatewayTokenizer(DEMO_MODEL, template), make_config(chat_template=template)
    backend = FakeBackend(custom)
    messages = [{"role": "user", "content": "Who loves whom?"}]
    documents = [{"title": "Act II", "text": "O Romeo, Romeo!"}, {"title": "Act III", "text": "Tybalt, the prince of cats."}]
    chat = {"model": MODEL, "messages": messages, "max_tokens": 2, "documents": documents}
    assert (await post(backend, custom, "/v1/chat/completions", chat, config)).status_code == 200
    tokens = (await post(backend, custom, "/tokenize", {"model": MODEL, "messages": messages, "documents": documents},
                         config)).json()["tokens"]
    expected = AutoTokenizer.from_pretrained(str(DEMO_MODEL)).apply_chat_template(
        messages, chat_template=template, documents=documents, tokenize=True, add_generation_prompt=True)
    assert backend.requests[0].prompt_token_ids == tokens == list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    assert "[doc 2: Act III]" in custom.decode(tokens)
    assert_error(await post(backend, custom, "/v1/chat/completions", {**chat, "documents": [{"title": 1}]}, config),
                 400, "documents")


async def test_a_request_brings_its_own_chat_template_only_where_trusted(tok) -> None:
    """vLLM's ``chat_template`` request field: refused (400, nothing sent) unless the gateway runs
    with ``--trust-request-chat-template``; then chat requests and /tokenize's messages render
    through it, a request without one through the model's, and one that does not parse or
    render is a 400 naming ``chat_template``."""
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    messages = [{"role": "user", "content": "Speak!"}]
    chat = {"model": MODEL, "messages": messages, "max_tokens": 2}
    backend = FakeBackend(tok)
    error = assert_error(await post(backend, tok, "/v1/chat/completions", {**chat, "chat_template": template}),
                         400, "chat_template")
    assert "--trust-request-chat-template" in error["message"]
    assert_error(await post(backend, tok, "/tokenize", {"model": MODEL, "messages": messages, "chat_template": template}),
                 400, "chat_template")
    assert backend.requests == []
    trusted = make_config(trust_request_chat_template=True)
    own = (await post(backend, tok, "/tokenize", {"model": MODEL, "messages": messages, "chat_template": template},
                      trusted)).json()
    assert own["tokens"] == tok.encode("[user]Speak!", add_special_tokens=False)
    await post(backend, tok, "/v1/chat/completions", {**chat, "chat_template": template}, trusted)
    await post(backend, tok, "/v1/chat/completions", chat, trusted)
    assert backend.requests[0].prompt_token_ids == own["tokens"]
    assert backend.requests[1].prompt_token_ids == tok.encode_chat(messages)
    for broken in ("{% for m in messages %}", "{{ raise_exception('no') }}", "{{ ''.__class__.__mro__ }}"):
        assert_error(await post(backend, tok, "/v1/chat/completions", {**chat, "chat_template": broken}, trusted),
                     400, "chat_template")
    assert len(backend.requests) == 2


async def test_version_names_the_installed_release(tok) -> None:
    import importlib.metadata

    async with client_for(create_app(make_config(), FakeBackend(tok), tok)) as client:
        out = await client.get("/version")
    assert out.status_code == 200 and out.json() == {"version": importlib.metadata.version("baton")}


async def test_sagemaker_routes_ping_and_invocations_and_vllms_load(tok) -> None:
    """/ping answers as /health (GET and POST); /invocations gives a body to the API its fields name,
    with that API's answers and errors; /load counts the generation requests in flight."""
    backend = FakeBackend(tok, delay=0.05)
    app = create_app(make_config(), backend, tok)
    async with client_for(app) as client:
        for method in (client.get, client.post):
            assert (await method("/ping")).json() == {"status": "ok"}
        assert (await client.get("/load")).json() == {"server_load": 0}
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        direct, invoked = [(await client.post(path, json=chat)).json() for path in ("/v1/chat/completions", "/invocations")]
        assert invoked["object"] == "chat.completion" and invoked["choices"] == direct["choices"]
        completion = (await client.post("/invocations", json={"model": MODEL, "prompt": "x", "max_tokens": 2})).json()
        assert completion["object"] == "text_completion"
        embedding = (await client.post("/invocations", json={"model": MODEL, "input": "x"})).json()
        assert embedding["object"] == "list" and embedding["data"][0]["object"] == "embedding"
        rerank = (await client.post("/invocations", json={"model": MODEL, "query": "a", "documents": ["b", "c"]})).json()
        assert len(rerank["results"]) == 2
        score = (await client.post("/invocations", json={"model": MODEL, "text_1": "a", "text_2": ["b", "c"]})).json()
        assert len(score["data"]) == 2
        assert_error(await client.post("/invocations", json={"model": MODEL, "prompt": "x", "temperature": -1}), 400, "temperature")
        assert "'messages', 'prompt'" in assert_error(await client.post("/invocations", json={"model": MODEL}), 400)["message"]
        assert "not valid JSON" in assert_error(await client.post("/invocations", content=b"[1"), 400)["message"]
        streams = [asyncio.ensure_future(client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 40}))
                   for _ in range(2)]
        while app.state.gateway.in_flight < 2:
            await asyncio.sleep(0.01)
        assert (await client.get("/load")).json() == {"server_load": 2}
        await asyncio.gather(*streams)


async def test_tokenize_and_detokenize(tok) -> None:
    """/tokenize gives the ids a completion or a chat completion would send (transformers'
    for the demo checkpoint); /detokenize inverts it; neither reaches the backend."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    backend = FakeBackend(tok)
    prompt = "JULIET:\nO Romeo, Romeo!"
    out = (await post(backend, tok, "/tokenize", {"model": MODEL, "prompt": prompt})).json()
    assert out["tokens"] == hf(prompt).input_ids and out["count"] == len(out["tokens"]) and out["max_model_len"] == 2048
    bare = (await post(backend, tok, "/tokenize", {"model": MODEL, "prompt": prompt, "add_special_tokens": False})).json()
    assert bare["tokens"] == hf(prompt, add_special_tokens=False).input_ids and bare["token_strs"] is None
    spelled = (await post(backend, tok, "/tokenize", {"model": MODEL, "prompt": prompt, "return_token_strs": True})).json()
    assert spelled["token_strs"] == hf.convert_ids_to_tokens(out["tokens"])    # vLLM's return_token_strs
    messages = [{"role": "user", "content": "Speak!"}]
    chat = (await post(backend, tok, "/tokenize", {"model": MODEL, "messages": messages})).json()
    expected = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert chat["tokens"] == list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    added = (await post(backend, tok, "/tokenize", {"model": MODEL, "messages": messages, "add_special_tokens": True})).json()
    assert added["tokens"] == [1, *chat["tokens"]]   # vLLM's: the tokenizer's BOS on top of the template's text
    back = (await post(backend, tok, "/detokenize", {"model": MODEL, "tokens": bare["tokens"]})).json()
    assert back == {"prompt": prompt}
    assert backend.requests == []

    assert_error(await post(backend, tok, "/tokenize", {"model": MODEL}), 400)
    assert_error(await post(backend, tok, "/tokenize", {"model": "gpt-9", "prompt": "x"}), 404, "model")
    assert_error(await post(backend, tok, "/detokenize", {"model": MODEL, "tokens": [5, 99999]}), 400, "tokens")
    keyed = make_config(api_keys=["sk-1"])
    assert (await post(backend, tok, "/tokenize", {"model": MODEL, "prompt": "x"}, keyed)).status_code == 401


async def test_chat_logprobs_format(tok) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "logprobs": True, "top_logprobs": 3}
    content = (await post(FakeBackend(tok), tok, "/v1/chat/completions", body)).json()["choices"][0]["logprobs"]["content"]
    out_ids = tok.encode(SCRIPTS[0])[1:5]
    assert [c["token"] for c in content] == [tok.token_text(t) for t in out_ids]
    for entry, t in zip(content, out_ids):
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == tok.token_bytes(t)
        assert len(entry["top_logprobs"]) == 3 and entry["top_logprobs"][0]["logprob"] == entry["logprob"]
        assert set(entry["top_logprobs"][0]) == {"token", "logprob", "bytes"}
    no_lp = (await post(FakeBackend(tok), tok, "/v1/chat/completions", {**body, "logprobs": False, "top_logprobs": None})).json()
    assert no_lp["choices"][0]["logprobs"] is None



async def test_return_tokens_as_token_ids_names_logprob_tokens_by_id(tok) -> None:
    """vLLM's ``return_tokens_as_token_ids``: log-probs name their tokens ``token_id:{id}``, asked by
    the request or, unless the request says otherwise, by the gateway's flag; the rest is as before."""
    out_ids = tok.encode(SCRIPTS[0])[1:5]
    named = [f"token_id:{t}" for t in out_ids]
    body = {"model": MODEL, "prompt": "JULIET:\nO", "max_tokens": 4, "logprobs": 2, "return_tokens_as_token_ids": True}
    lp = (await post(FakeBackend(tok), tok, "/v1/completions", body)).json()["choices"][0]["logprobs"]
    assert lp["tokens"] == named
    assert [list(top)[0] for top in lp["top_logprobs"]] == named and all(len(top) == 2 for top in lp["top_logprobs"])
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "logprobs": True,
            "top_logprobs": 1}
    by_flag = make_config(return_tokens_as_token_ids=True)
    content = (await post(FakeBackend(tok), tok, "/v1/chat/completions", chat, by_flag)).json()["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == named and [c["top_logprobs"][0]["token"] for c in content] == named
    assert [c["bytes"] for c in content] == [tok.token_bytes(t) for t in out_ids]
    asked_not = {**chat, "return_tokens_as_token_ids": False}
    content = (await post(FakeBackend(tok), tok, "/v1/chat/completions", asked_not, by_flag)).json()["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == [tok.token_text(t) for t in out_ids]


# ---- cancellation, admission, auth, readiness, metrics ------------------------------


async def test_client_disconnect_mid_stream_aborts(tok) -> None:
    backend = FakeBackend(tok, per_chunk=1, delay=0.01)
    serving = OpenAIServing(make_config(), backend, tok)
    stream = await serving.create_completion(CompletionRequest(model=MODEL, prompt="x", max_tokens=30, n=2, stream=True))
    received = [await anext(stream) for _ in range(3)]
    assert all(json.loads(r)["choices"] for r in received)
    await stream.aclose()  # what the response does when the client goes away
    assert sorted(backend.aborted) == sorted(r.request_id for r in backend.requests) and len(backend.aborted) == 2

    backend = FakeBackend(tok, per_chunk=1, delay=0.01)
    serving = OpenAIServing(make_config(), backend, tok)

    async def consume() -> None:
        stream = await serving.create_chat_completion(
            ChatCompletionRequest(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=30, stream=True)
        )
        async for _ in stream:
            pass

    task = asyncio.create_task(consume())
    await asyncio.wait_for(backend.first_chunk_sent.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert backend.aborted == [backend.requests[0].request_id]


async def test_non_streaming_client_disconnect_aborts(tok) -> None:
    backend = FakeBackend(tok, per_chunk=1, delay=0.02)
    app = create_app(make_config(), backend, tok)
    messages = [{"type": "http.request", "body": json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 30}).encode()}]

    async def receive() -> dict:
        if messages:
            return messages.pop()
        await backend.first_chunk_sent.wait()
        return {"type": "http.disconnect"}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")], "client": ("t", 1), "server": ("s", 80)}
    await asyncio.wait_for(app(scope, receive, send), 5)
    assert backend.aborted == [backend.requests[0].request_id]
    assert app.state.gateway.in_flight == 0


async def test_admission_limit_gives_429(tok) -> None:
    backend = FakeBackend(tok, per_chunk=1, delay=0.05)
    app = create_app(make_config(max_queue=2), backend, tok)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 5}
    async with client_for(app) as client:
        slow = [asyncio.create_task(client.post("/v1/completions", json=body)) for _ in range(2)]
        while app.state.gateway.in_flight < 2:
            await asyncio.sleep(0.005)
        error = assert_error(await client.post("/v1/completions", json=body), 429)
        assert error["code"] == "rate_limit_exceeded"
        assert [r.status_code for r in await asyncio.gather(*slow)] == [200, 200]
        assert app.state.gateway.in_flight == 0
        assert (await client.post("/v1/completions", json={**body, "stream": True})).status_code == 200
        assert app.state.gateway.in_flight == 0


async def test_api_keys(tok) -> None:
    app = create_app(make_config(api_keys=["sk-one", "sk-two"]), FakeBackend(tok), tok)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    async with client_for(app) as client:
        assert_error(await client.post("/v1/completions", json=body), 401)
        error = assert_error(await client.post("/v1/completions", json=body, headers={"Authorization": "Bearer sk-nope"}), 401)
        assert error["code"] == "invalid_api_key"
        assert_error(await client.get("/v1/models"), 401)
        ok = await client.post("/v1/completions", json=body, headers={"Authorization": "Bearer sk-two"})
        assert ok.status_code == 200
        models = await client.get("/v1/models", headers={"Authorization": "Bearer sk-one"})
        assert models.json()["data"][0]["id"] == MODEL and models.json()["object"] == "list"
        for open_path in ("/health", "/ready", "/metrics"):
            assert (await client.get(open_path)).status_code == 200


async def test_ready_health_and_draining(tok) -> None:
    backend = FakeBackend(tok)
    app = create_app(make_config(), backend, tok)
    async with client_for(app) as client:
        ready = await client.get("/ready")
        assert ready.status_code == 200 and ready.json()["workers"] == {"prefill": 2, "decode": 1}
        backend.is_ready = False
        assert (await client.get("/ready")).status_code == 503
        assert (await client.get("/health")).status_code == 200
        backend.is_ready = True
        app.state.gateway.draining = True
        assert (await client.get("/ready")).status_code == 503
        assert_error(await client.post("/v1/completions", json={"model": MODEL, "prompt": "x"}), 503)
        assert_error(await client.get("/v1/nope"), 404)


def _sample(text: str, name: str, labels: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(f"{name}{labels} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.split()[-1])
    return 0.0


async def test_metrics_exposed_and_updated(tok) -> None:
    app = create_app(make_config(), FakeBackend(tok, cached_tokens=3), tok)
    async with client_for(app) as client:
        before = (await client.get("/metrics")).text
        await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4})
        await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "temperature": -1})
        between = (await client.get("/metrics")).text
        await client.post("/v1/embeddings", json={"model": MODEL, "input": ["x", "y z"]})
        after = await client.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    for name in ("baton_time_to_first_token_seconds", "baton_inter_token_latency_seconds", "baton_e2e_request_latency_seconds",
                 "baton_requests_running", "baton_requests_waiting", "baton_requests_total", "baton_prompt_tokens_total",
                 "baton_cached_prompt_tokens_total", "baton_prefix_cache_hit_ratio", "baton_generation_tokens_total",
                 "baton_kv_transfer_bytes_total", "baton_kv_transfer_seconds", "baton_redis_errors_total",
                 "baton_worker_errors_total"):
        assert f"# TYPE {name}" in after.text
    text, embedded = between, after.text
    delta = lambda name, labels="": _sample(text, name, labels) - _sample(before, name, labels)  # noqa: E731
    assert delta("baton_generation_tokens_total") == 4
    assert delta("baton_prompt_tokens_total") == len(tok.encode("x"))
    assert delta("baton_cached_prompt_tokens_total") == 3
    assert delta("baton_requests_total", '{status="success"}') == 1
    assert delta("baton_requests_total", '{status="rejected"}') == 1
    assert delta("baton_time_to_first_token_seconds_count") == 1
    assert delta("baton_inter_token_latency_seconds_count") == 3
    assert _sample(text, "baton_requests_running") == 0 and _sample(text, "baton_requests_waiting") == 0
    # An embeddings request: one more success, its inputs' prompt and cached tokens, and no tokens generated.
    more = lambda name, labels="": _sample(embedded, name, labels) - _sample(text, name, labels)  # noqa: E731
    assert more("baton_requests_total", '{status="success"}') == 1 and more("baton_e2e_request_latency_seconds_count") == 1
    assert more("baton_prompt_tokens_total") == len(tok.encode("x")) + len(tok.encode("y z"))
    assert more("baton_cached_prompt_tokens_total") == 6 and more("baton_generation_tokens_total") == 0
    assert _sample(embedded, "baton_requests_waiting") == 0


async def test_metrics_vllm_has_are_also_served_under_vllms_names(tok) -> None:
    """Each family vLLM's server has too comes again under vLLM's name, labelled with the served
    model's name: the same samples, the same values."""
    from prometheus_client.parser import text_string_to_metric_families

    app = create_app(make_config(), FakeBackend(tok, cached_tokens=3), tok)
    async with client_for(app) as client:
        await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4})
        text = (await client.get("/metrics")).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    pairs = [("baton_time_to_first_token_seconds_count", "vllm:time_to_first_token_seconds_count"),
             ("baton_inter_token_latency_seconds_bucket", "vllm:inter_token_latency_seconds_bucket"),
             ("baton_e2e_request_latency_seconds_sum", "vllm:e2e_request_latency_seconds_sum"),
             ("baton_requests_running", "vllm:num_requests_running"), ("baton_requests_waiting", "vllm:num_requests_waiting"),
             ("baton_prompt_tokens_total", "vllm:prompt_tokens_total"),
             ("baton_prompt_tokens_total", "vllm:prefix_cache_queries_total"),
             ("baton_generation_tokens_total", "vllm:generation_tokens_total"),
             ("baton_cached_prompt_tokens_total", "vllm:prefix_cache_hits_total"),
             ("baton_request_success_total", "vllm:request_success_total"),
             ("baton_request_prompt_tokens_bucket", "vllm:request_prompt_tokens_bucket"),
             ("baton_request_generation_tokens_sum", "vllm:request_generation_tokens_sum"),
             ("baton_request_max_num_generation_tokens_count", "vllm:request_max_num_generation_tokens_count"),
             ("baton_request_params_n_bucket", "vllm:request_params_n_bucket"),
             ("baton_request_params_max_tokens_sum", "vllm:request_params_max_tokens_sum"),
             ("baton_request_queue_time_seconds_sum", "vllm:request_queue_time_seconds_sum"),
             ("baton_request_prefill_time_seconds_count", "vllm:request_prefill_time_seconds_count"),
             ("baton_request_decode_time_seconds_bucket", "vllm:request_decode_time_seconds_bucket"),
             ("baton_request_inference_time_seconds_sum", "vllm:request_inference_time_seconds_sum"),
             ("baton_request_time_per_output_token_seconds_count", "vllm:request_time_per_output_token_seconds_count")]
    for ours, theirs in pairs:
        mine = {labels: v for (name, labels), v in samples.items() if name == ours}
        vllm = {tuple(l for l in labels if l != ("model_name", MODEL)): v for (name, labels), v in samples.items()
                if name == theirs and ("model_name", MODEL) in labels}
        assert mine and vllm == mine, theirs
    assert samples[("vllm:generation_tokens_total", (("model_name", MODEL),))] >= 4
    assert not any(name.startswith("vllm:") and "kv_transfer" in name for name, _ in samples)


async def test_each_finished_sequence_counts_with_its_finish_reason_and_lengths(tok) -> None:
    """vLLM's per-request metrics: every choice a finished sequence (stop, length, or abort and error
    before either), with its prompt and generated tokens; each request's n, max_tokens and longest
    output; and the phases of each that ended by stop or length: its queue and prefill times as the
    backend says, its decode from its first token to its last."""
    body = {"model": MODEL, "prompt": "JULIET:\nO Romeo", "max_tokens": 5, "n": 2}
    prompt_len = len(tok.encode(body["prompt"]))
    failing = FakeBackend(tok, fail_after=3)
    app = create_app(make_config(), FakeBackend(tok, delay=0.02), tok)
    async with client_for(app) as client:
        before = (await client.get("/metrics")).text
        await client.post("/v1/completions", json=body)
        await client.post("/v1/completions", json={**body, "max_tokens": 50, "n": 1, "stop": ["thou"]})
        after = (await client.get("/metrics")).text
    await post(failing, tok, "/v1/completions", {**body, "stream": True})
    async with client_for(app) as client:
        failed = (await client.get("/metrics")).text
    delta = lambda text, name, labels="": _sample(text, name, labels) - _sample(before, name, labels)  # noqa: E731
    assert delta(after, "baton_request_success_total", '{finished_reason="length"}') == 2
    assert delta(after, "baton_request_success_total", '{finished_reason="stop"}') == 1
    stopped = len(tok.encode("O Romeo, Romeo! wherefore art thou", add_special_tokens=False))   # SCRIPTS[0] to "thou"
    assert delta(after, "baton_request_generation_tokens_sum") == 5 + 5 + stopped
    assert delta(after, "baton_request_prompt_tokens_sum") == 3 * prompt_len
    assert delta(after, "baton_request_max_num_generation_tokens_sum") == 5 + stopped
    assert (delta(after, "baton_request_params_n_sum"), delta(after, "baton_request_params_n_count")) == (3, 2)
    assert delta(after, "baton_request_params_max_tokens_sum") == 55
    assert delta(failed, "baton_request_success_total", '{finished_reason="error"}') == 2
    for text in (after, failed):   # three sequences ended by stop or length; the two cut short have no phases
        assert delta(text, "baton_request_queue_time_seconds_sum") == pytest.approx(3 * QUEUED_S)
        assert delta(text, "baton_request_prefill_time_seconds_sum") == pytest.approx(3 * PREFILL_S)
        assert delta(text, "baton_request_decode_time_seconds_count") == 3
        assert delta(text, "baton_request_time_per_output_token_seconds_count") == 3
    decode = delta(after, "baton_request_decode_time_seconds_sum")
    assert decode >= 3 * 0.02   # each had two chunks at least, 20 ms apart
    assert delta(after, "baton_request_inference_time_seconds_sum") == pytest.approx(3 * PREFILL_S + decode)


class UsageBackend(FakeBackend):
    def __init__(self, tok: GatewayTokenizer, usage: dict[str, float]) -> None:
        super().__init__(tok)
        self.usage = usage

    def kv_cache_usage(self) -> dict[str, float]:
        return self.usage


async def test_kv_cache_usage_is_read_from_the_backend_when_scraped(tok) -> None:
    """Each role's share of held KV blocks, and vLLM's kv_cache_usage_perc: the decode workers'."""
    backend = UsageBackend(tok, {"prefill": 0.5, "decode": 0.25})
    app = create_app(make_config(), backend, tok)
    async with client_for(app) as client:
        text = (await client.get("/metrics")).text
        backend.usage = {"prefill": 0.5}                        # no decode worker answers
        later = (await client.get("/metrics")).text
    assert _sample(text, "baton_kv_cache_usage_ratio", '{role="decode"}') == 0.25
    assert _sample(text, "baton_kv_cache_usage_ratio", '{role="prefill"}') == 0.5
    assert _sample(text, "vllm:kv_cache_usage_perc", f'{{model_name="{MODEL}"}}') == 0.25
    assert 'baton_kv_cache_usage_ratio{role="decode"}' not in later and "vllm:kv_cache_usage_perc{" not in later


def test_gateway_app_does_not_import_torch() -> None:
    code = "import sys, baton.services.gateway.app, baton.services.gateway.__main__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


# ---- real uvicorn: the official client, and draining ----------------------------------


@contextmanager
def serve(app, server_cls=uvicorn.Server, **kwargs) -> Iterator[tuple[str, uvicorn.Server, threading.Thread]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = server_cls(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5), **kwargs)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread
    finally:
        server.should_exit = True
        thread.join(10)


def test_official_openai_client(tok) -> None:
    openai = pytest.importorskip("openai")
    app = create_app(make_config(api_keys=["sk-test"]), FakeBackend(tok), tok)
    with serve(app) as (url, _, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0, timeout=30)
        [model] = client.models.list().data
        assert model.id == MODEL
        completion = client.completions.create(model=MODEL, prompt="JULIET:\nO Romeo", max_tokens=8, stop=["!"])
        assert completion.choices[0].text == "O Romeo, Romeo" and completion.choices[0].finish_reason == "stop"
        assert completion.usage.prompt_tokens_details.cached_tokens == 5
        chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Speak"}], max_tokens=6)
        assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason == "length"
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Speak"}], max_tokens=6, stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == 6
        streamed = list(client.completions.create(model=MODEL, prompt="x", max_tokens=8, stream=True, stop=["!"]))
        assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="x")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


def test_sigterm_drains_then_exits(tok) -> None:
    from baton.services.gateway.__main__ import DrainingServer

    backend = FakeBackend(tok, per_chunk=1, delay=0.03)
    app = create_app(make_config(), backend, tok)
    with serve(app, DrainingServer, state=app.state.gateway, drain_timeout_s=10) as (url, server, thread):
        body = {"model": MODEL, "prompt": "x", "max_tokens": 40, "stream": True}
        with httpx.Client(base_url=url, timeout=10) as client, client.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            server.handle_exit(15, None)
            assert httpx.get(f"{url}/ready", timeout=5).status_code == 503
            rest = [line[6:] for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]" and json.loads(rest[-2])["choices"][0]["finish_reason"] == "stop"
        thread.join(10)
        assert not thread.is_alive()
    assert backend.aborted == []


def test_http_client_disconnect_mid_stream_aborts(tok) -> None:
    backend = FakeBackend(tok, per_chunk=1, delay=0.05)
    app = create_app(make_config(), backend, tok)
    with serve(app) as (url, _, _):
        body = {"model": MODEL, "prompt": "x", "max_tokens": 40, "stream": True}
        with httpx.Client(base_url=url, timeout=10) as client, client.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
        deadline = time.monotonic() + 5
        while (not backend.aborted or app.state.gateway.in_flight) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert backend.aborted == [backend.requests[0].request_id]
        assert backend.finished == []
        assert app.state.gateway.in_flight == 0


def test_launcher_flags_build_the_config(monkeypatch) -> None:
    from baton.services.gateway.__main__ import build_parser, config_from_args

    monkeypatch.setenv("BATON_API_KEYS", "sk-env1, sk-env2")
    monkeypatch.setenv("VLLM_API_KEY", "sk-vllm")
    args = build_parser().parse_args([
        "--model-dir", str(DEMO_MODEL), "--port", "9123", "--prefill-addr", "h:1", "--prefill-addr", "h:2",
        "--decode-addr", "h:3", "--api-key", "sk-flag", "--max-queue", "7", "--block-size", "32", "--max-retries", "0",
        "--tool-call-parser", "pythonic",
    ])
    config = config_from_args(args)
    assert config.served_model_name == DEMO_MODEL.name
    assert (config.port, config.max_queue, config.block_size, config.max_retries) == (9123, 7, 32, 0)
    assert config.tool_call_parser == "pythonic"
    assert config.prefill_addrs == ["h:1", "h:2"] and config.decode_addrs == ["h:3"]
    assert config.api_keys == ["sk-flag", "sk-env1", "sk-env2", "sk-vllm"]


@pytest.mark.integration
def test_gateway_process_drains_on_sigterm_and_exits_zero() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cmd = [sys.executable, "-m", "baton.services.gateway", "--model-dir", str(DEMO_MODEL), "--port", str(port),
           "--prefill-addr", "127.0.0.1:9", "--decode-addr", "127.0.0.1:9", "--log-level", "warning"]
    proc = subprocess.Popen(cmd)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert httpx.get(f"{url}/ready", timeout=5).status_code == 503  # no worker answers
        assert httpx.get(f"{url}/v1/models", timeout=5).json()["data"][0]["id"] == DEMO_MODEL.name
        proc.send_signal(15)
        time.sleep(0.2)
        ready = httpx.get(f"{url}/ready", timeout=5)
        assert ready.status_code == 503 and ready.json()["draining"] is True
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_shutdown_does_not_wait_forever_for_the_backend(tok, monkeypatch, caplog) -> None:
    """A backend whose close never returns (a stuck channel, say) holds the gateway's exit
    only for ``BACKEND_CLOSE_TIMEOUT_S``."""
    class StuckBackend(FakeBackend):
        async def close(self) -> None:
            await asyncio.Event().wait()

    monkeypatch.setattr(app_module, "BACKEND_CLOSE_TIMEOUT_S", 0.2)
    app = create_app(make_config(), StuckBackend(tok), tok)
    async with asyncio.timeout(10):
        async with app.router.lifespan_context(app):
            pass
    assert "did not close within 0.2 s" in caplog.text


# ---- embeddings ---------------------------------------------------------------

async def test_embeddings_answer_each_input_in_order_as_floats_or_base64(tok) -> None:
    backend = FakeBackend(tok, cached_tokens=2)
    texts = ["O Romeo", "But, soft!", "HAMLET:"]
    response = await post(backend, tok, "/v1/embeddings", {"model": MODEL, "input": texts, "priority": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    ids = [tok.encode(t) for t in texts]
    assert [r.prompt_token_ids for r in sorted(backend.embeds, key=lambda r: r.request_id)] == ids
    assert {r.priority for r in backend.embeds} == {2}
    want = [(await FakeBackend(tok).embed(EmbedRequest("x", i))).embedding for i in ids]
    assert body["object"] == "list" and body["model"] == MODEL
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", i) for i in range(3)]
    assert [d["embedding"] for d in body["data"]] == want
    assert body["usage"] == {"prompt_tokens": sum(map(len, ids)), "total_tokens": sum(map(len, ids))}
    packed = await post(FakeBackend(tok), tok, "/v1/embeddings", {"model": MODEL, "input": texts, "encoding_format": "base64"})
    decoded = [list(struct.unpack(f"<{len(w)}f", base64.b64decode(d["embedding"]))) for w, d in zip(want, packed.json()["data"])]
    assert [v for row in decoded for v in row] == pytest.approx([v for row in want for v in row], abs=1e-7)
    longest = await post(FakeBackend(tok), tok, "/v1/embeddings", {"model": MODEL, "input": [5] * 2047})
    assert longest.status_code == 200 and longest.json()["usage"]["prompt_tokens"] == 2047
    single = await post(FakeBackend(tok), tok, "/v1/embeddings", {"model": MODEL, "input": ids[0][1:], "truncate_prompt_tokens": 2})
    assert single.json()["usage"]["prompt_tokens"] == 2 and len(single.json()["data"]) == 1
    plain = FakeBackend(tok)   # vLLM's add_special_tokens: false leaves the BOS off each text
    assert (await post(plain, tok, "/v1/embeddings", {"model": MODEL, "input": texts, "add_special_tokens": False})).status_code == 200
    assert sorted(r.prompt_token_ids for r in plain.embeds) == sorted(i[1:] for i in ids) and ids[0][0] == 1


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": MODEL, "input": ""}, 400, "input"),
    ({"model": MODEL, "input": []}, 400, "input"),
    ({"model": MODEL, "input": ["a", ""]}, 400, "input"),
    ({"model": MODEL, "input": ["a"] * 2049}, 400, "input"),
    ({"model": MODEL, "input": [5, 99999]}, 400, "input"),
    ({"model": MODEL, "input": "x " * 2100}, 400, "input"),
    ({"model": MODEL, "input": [5] * 2048}, 400, "input"),          # the engine keeps a position past a prompt
    ({"model": MODEL, "input": "x", "dimensions": 64}, 400, "dimensions"),
    ({"model": MODEL, "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"model": "gpt-4", "input": "x"}, 404, "model"),
])
async def test_invalid_embedding_requests_get_clear_errors(tok, body, status, param) -> None:
    backend = FakeBackend(tok)
    assert_error(await post(backend, tok, "/v1/embeddings", body), status, param)
    assert backend.embeds == []


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/embeddings", {"model": MODEL, "input": ["a", "b"]}),
    ("/score", {"model": MODEL, "text_1": "a", "text_2": ["b", "c"]}),
    ("/rerank", {"model": MODEL, "query": "a", "documents": ["b", "c"]}),
])
async def test_an_embedding_the_workers_cannot_compute_is_a_503(tok, path, body) -> None:
    backend = FakeBackend(tok, error=BackendError("no healthy prefill worker", 503))
    error = assert_error(await post(backend, tok, path, body), 503)
    assert "prefill worker" in error["message"]


# ---- score and rerank (vLLM's, over embeddings) ---------------------------------

class RawBackend(FakeBackend):
    """The fake embeddings, not normalized (as a pooler with normalize false leaves them)."""

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        result = await super().embed(request)
        result.embedding = [v * (3 + len(request.prompt_token_ids)) for v in result.embedding]
        return result


def fake_cosine(tok: GatewayTokenizer, text_1: str, text_2: str) -> float:
    """The cosine similarity of the fake backend's embeddings of two texts, computed here."""
    a, b = (FakeBackend.vector(tok.encode(t)) for t in (text_1, text_2))
    return sum(x * y for x, y in zip(a, b)) / (sum(x * x for x in a) * sum(y * y for y in b)) ** 0.5


QUERY = "O Romeo"
DOCUMENTS = ["But, soft!", "HAMLET: To be", "O Romeo, Romeo!", "x", "Wherefore art thou"]


@pytest.mark.parametrize("backend_cls", [FakeBackend, RawBackend], ids=["normalized", "raw"])
@pytest.mark.parametrize(("text_1", "text_2"), [
    ("O Romeo", "But, soft!"),                                       # 1:1
    ("O Romeo", DOCUMENTS),                                          # 1:N
    (["O Romeo"], DOCUMENTS[:2]),                                    # 1:N, text_1 a list of one
    (DOCUMENTS[:3], ["x", "O Romeo", "Wherefore art thou"]),         # N:N
], ids=["1:1", "1:N", "[1]:N", "N:N"])
async def test_a_score_is_the_cosine_of_its_pairs_embeddings(tok, backend_cls, text_1, text_2) -> None:
    from baton.services.gateway import metrics

    backend = backend_cls(tok)
    firsts, seconds = ([t] if isinstance(t, str) else t for t in (text_1, text_2))
    succeeded = metrics.REQUESTS_TOTAL.labels(status="success")._value.get()
    for path in ("/score", "/v1/score"):
        response = await post(backend, tok, path, {"model": MODEL, "text_1": text_1, "text_2": text_2, "priority": 3})
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"id", "object", "created", "model", "data", "usage"}
        assert body["id"].startswith("score-") and body["object"] == "list" and body["model"] == MODEL
        assert isinstance(body["created"], int)
        assert [(d["index"], d["object"]) for d in body["data"]] == [(i, "score") for i in range(len(seconds))]
        want = [fake_cosine(tok, firsts[0] if len(firsts) == 1 else firsts[i], t) for i, t in enumerate(seconds)]
        assert [d["score"] for d in body["data"]] == pytest.approx(want, abs=1e-12)
        tokens = sum(len(tok.encode(t)) for t in firsts + seconds)   # each text embedded once
        assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert len(backend.embeds) == 2 * (len(firsts) + len(seconds)) and {r.priority for r in backend.embeds} == {3}
    assert metrics.REQUESTS_TOTAL.labels(status="success")._value.get() == succeeded + 2


async def test_score_truncates_each_text_and_defaults_to_the_served_model(tok) -> None:
    backend = FakeBackend(tok)
    response = await post(backend, tok, "/score", {"text_1": "O Romeo, Romeo!", "text_2": ["But, soft!", "x"],
                                                   "truncate_prompt_tokens": 2})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == MODEL and response.json()["usage"]["prompt_tokens"] == 2 + 2 + 2
    assert sorted(r.prompt_token_ids for r in backend.embeds) == sorted(
        tok.encode(t)[-2:] for t in ("O Romeo, Romeo!", "But, soft!", "x"))


async def test_rerank_orders_the_documents_by_cosine_and_cuts_to_top_n(tok) -> None:
    scores = [fake_cosine(tok, QUERY, d) for d in DOCUMENTS]
    order = sorted(range(len(DOCUMENTS)), key=lambda i: -scores[i])
    assert len(set(scores)) == len(scores) and order != list(range(len(DOCUMENTS)))
    tokens = sum(len(tok.encode(t)) for t in [QUERY] + DOCUMENTS)
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        response = await post(RawBackend(tok), tok, path, {"model": MODEL, "query": QUERY, "documents": DOCUMENTS})
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"id", "model", "usage", "results"} and body["id"].startswith("rerank-")
        assert body["model"] == MODEL and body["usage"] == {"total_tokens": tokens}
        assert [r["index"] for r in body["results"]] == order
        assert [r["relevance_score"] for r in body["results"]] == pytest.approx([scores[i] for i in order], abs=1e-12)
        assert [r["document"] for r in body["results"]] == [{"text": DOCUMENTS[i]} for i in order]
    for top_n, count in ((2, 2), (1, 1), (0, len(DOCUMENTS)), (None, len(DOCUMENTS)), (99, len(DOCUMENTS))):
        response = await post(FakeBackend(tok), tok, "/rerank", {"query": QUERY, "documents": DOCUMENTS, "top_n": top_n})
        assert [r["index"] for r in response.json()["results"]] == order[:count]
        assert response.json()["usage"] == {"total_tokens": tokens}    # every document is scored
    bare = await post(FakeBackend(tok), tok, "/rerank", {"query": QUERY, "documents": DOCUMENTS, "top_n": 3,
                                                        "return_documents": False})
    assert bare.json()["results"] == [{"index": i, "relevance_score": pytest.approx(scores[i], abs=1e-12)} for i in order[:3]]


async def test_equal_relevance_keeps_the_documents_order(tok) -> None:
    response = await post(FakeBackend(tok), tok, "/rerank", {"query": "x", "documents": ["But", "x", "y", "x"]})
    assert [r["index"] for r in response.json()["results"]][:2] == [1, 3]


def test_cosine_of_a_zero_vector_is_zero() -> None:
    from baton.services.gateway import scoring

    assert scoring.cosine([0.0, 0.0], [1.0, 2.0]) == 0.0
    assert scoring.cosine([1.0, 0.0], [-2.0, 0.0]) == -1.0


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/score", {"model": MODEL, "text_1": ["a", "b", "c"], "text_2": ["x", "y"]}, 400, "text_2"),
    ("/score", {"model": MODEL, "text_1": ["a", "b"], "text_2": "x"}, 400, "text_2"),
    ("/score", {"model": MODEL, "text_1": [], "text_2": ["x"]}, 400, "text_1"),
    ("/score", {"model": MODEL, "text_1": "a", "text_2": []}, 400, "text_2"),
    ("/score", {"model": MODEL, "text_1": "", "text_2": "x"}, 400, "text_1"),
    ("/score", {"model": MODEL, "text_1": "a", "text_2": ["x", ""]}, 400, "text_2"),
    ("/score", {"model": MODEL, "text_2": "x"}, 400, "text_1"),
    ("/score", {"model": MODEL, "text_1": "a", "text_2": [5, 6]}, 400, "text_2"),
    ("/score", {"model": MODEL, "text_1": "a", "text_2": ["x"] * 2048}, 400, "text_2"),
    ("/score", {"model": MODEL, "text_1": ["a"] * 1025, "text_2": ["x"] * 1025}, 400, "text_2"),
    ("/score", {"model": MODEL, "text_1": "a", "text_2": "x " * 2100}, 400, "text_2"),
    ("/score", {"model": MODEL, "text_1": "x " * 2100, "text_2": "a"}, 400, "text_1"),
    ("/score", {"model": MODEL, "text_1": "a", "text_2": "x", "truncate_prompt_tokens": -2}, 400, "truncate_prompt_tokens"),
    ("/score", {"model": MODEL, "text_1": "a", "text_2": "x", "priority": 2**31}, 400, "priority"),
    ("/v1/score", {"model": "gpt-4", "text_1": "a", "text_2": "x"}, 404, "model"),
    ("/rerank", {"model": MODEL, "query": "a", "documents": []}, 400, "documents"),
    ("/rerank", {"model": MODEL, "query": "a", "documents": "x"}, 400, "documents"),
    ("/rerank", {"model": MODEL, "query": "a", "documents": ["x", ""]}, 400, "documents"),
    ("/rerank", {"model": MODEL, "query": "", "documents": ["x"]}, 400, "query"),
    ("/rerank", {"model": MODEL, "documents": ["x"]}, 400, "query"),
    ("/rerank", {"model": MODEL, "query": "a", "documents": ["x"] * 2048}, 400, "documents"),
    ("/rerank", {"model": MODEL, "query": "a", "documents": ["x", "x " * 2100]}, 400, "documents"),
    ("/rerank", {"model": MODEL, "query": "a", "documents": ["x"], "top_n": -1}, 400, "top_n"),
    ("/v1/rerank", {"model": "gpt-4", "query": "a", "documents": ["x"]}, 404, "model"),
    ("/v2/rerank", {"model": MODEL, "query": "a", "documents": ["x"], "return_documents": "maybe"}, 400, "return_documents"),
])
async def test_invalid_score_and_rerank_requests_get_clear_errors(tok, path, body, status, param) -> None:
    backend = FakeBackend(tok)
    error = assert_error(await post(backend, tok, path, body), status, param)
    assert error["type"] == "invalid_request_error"
    assert backend.embeds == []


async def test_score_and_rerank_take_as_many_texts_as_an_embeddings_request(tok) -> None:
    backend = FakeBackend(tok)
    score = await post(backend, tok, "/score", {"model": MODEL, "text_1": ["a"] * 1024, "text_2": ["x"] * 1024})
    rerank = await post(backend, tok, "/rerank", {"model": MODEL, "query": "a", "documents": ["x"] * 2047})
    assert len(score.json()["data"]) == 1024 and len(rerank.json()["results"]) == 2047
    assert len(backend.embeds) == 2 * 2048


async def test_vllms_docs_access_log_and_root_path_flags(tok) -> None:
    from baton.services.gateway.__main__ import uvicorn_config

    docs = create_app(make_config(), FakeBackend(tok), tok)
    async with client_for(docs) as client:
        assert [(await client.get(path)).status_code for path in ("/docs", "/redoc", "/openapi.json")] == [200] * 3
    no_docs = create_app(make_config(disable_fastapi_docs=True), FakeBackend(tok), tok)
    async with client_for(no_docs) as client:
        assert [(await client.get(path)).status_code for path in ("/docs", "/redoc", "/openapi.json")] == [404] * 3
    default = uvicorn_config(docs, make_config(), "info")
    assert default.access_log and default.root_path == ""
    flagged = uvicorn_config(docs, make_config(disable_uvicorn_access_log=True, root_path="/baton"), "info")
    assert not flagged.access_log and flagged.root_path == "/baton"


async def test_score_and_rerank_are_in_the_openapi_document(tok) -> None:
    app = create_app(make_config(), FakeBackend(tok), tok)
    async with client_for(app) as client:
        document = (await client.get("/openapi.json")).json()
    routes = {"ScoreRequest": (("/score", "/v1/score"), {"text_1", "text_2"}),
              "RerankRequest": (("/rerank", "/v1/rerank", "/v2/rerank"), {"query", "documents", "top_n", "return_documents"})}
    for model, (paths, fields) in routes.items():
        assert fields <= set(document["components"]["schemas"][model]["properties"])
        for path in paths:
            content = document["paths"][path]["post"]["requestBody"]["content"]
            assert content["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}


# ---- Responses API --------------------------------------------------------------

def responses_client(backend: Backend, tok: GatewayTokenizer, config: GatewayConfig | None = None):
    """The OpenAI client, talking to the gateway app in process."""
    import openai

    app = create_app(config or make_config(), backend, tok)
    return openai.AsyncOpenAI(base_url="http://gateway/v1", api_key="unused", http_client=client_for(app), max_retries=0)


async def test_responses_answer_as_the_chat_completion_they_make(tok) -> None:
    backend = FakeBackend(tok, cached_tokens=3)
    client = responses_client(backend, tok)
    out = await client.responses.create(model=MODEL, input="Speak.", instructions="Be brief.", max_output_tokens=200,
                                        temperature=0.5, metadata={"k": "v"})
    chat = tok.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Speak."}],
                           add_generation_prompt=True)
    (request,) = backend.requests
    assert request.prompt_token_ids == chat and request.params.temperature == 0.5 and request.params.max_tokens == 200
    text = tok.decode(backend.output_ids(request))
    assert out.status == "completed" and out.output_text == text and out.metadata == {"k": "v"}
    assert [item.type for item in out.output] == ["message"] and out.output[0].content[0].type == "output_text"
    assert (out.usage.input_tokens, out.usage.output_tokens, out.usage.input_tokens_details.cached_tokens) == \
        (len(chat), len(backend.output_ids(request)), 3)
    cut = await client.responses.create(model=MODEL, input=[{"role": "user", "content": [{"type": "input_text", "text": "Speak."}]}],
                                        max_output_tokens=3)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens" and cut.usage.output_tokens == 3


async def test_streamed_responses_send_the_events_openai_sends(tok) -> None:
    backend = FakeBackend(tok, per_chunk=2)
    client = responses_client(backend, tok)
    events = [e async for e in await client.responses.create(model=MODEL, input="Speak.", stream=True)]
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
                     *["response.output_text.delta"] * deltas, "response.output_text.done", "response.content_part.done",
                     "response.output_item.done", "response.completed"]
    assert deltas > 3 and [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == tok.decode(backend.output_ids(backend.requests[0]))
    final = events[-1].response
    assert final.output_text == text and final.usage.output_tokens == len(backend.output_ids(backend.requests[0]))
    assert events[2].item.id == events[-2].item.id == final.output[0].id


async def test_responses_truncation_auto_keeps_the_prompts_last_tokens(tok) -> None:
    """truncation "auto" (vLLM's reading of it): a prompt past the context keeps its last tokens, as
    many as leave room for max_output_tokens; "disabled", the default, is a 400."""
    backend, config = FakeBackend(tok), make_config(max_model_len=24)
    body = {"model": MODEL, "input": "But, soft! what light through yonder window breaks? " * 3, "max_output_tokens": 4}
    assert_error(await post(backend, tok, "/v1/responses", body, config), 400, "input")
    response = await post(backend, tok, "/v1/responses", {**body, "truncation": "auto"}, config)
    assert response.status_code == 200, response.text
    chat = tok.encode_chat([{"role": "user", "content": body["input"]}], add_generation_prompt=True)
    (request,) = backend.requests
    assert len(chat) > 24 and request.prompt_token_ids == chat[-20:]
    assert response.json()["truncation"] == "auto" and response.json()["usage"]["input_tokens"] == 20


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_responses_include_the_output_texts_logprobs_as_chat_gives_them(tok, stream) -> None:
    """include "message.output_text.logprobs" with top_logprobs: the output text's tokens' log-probs
    and alternatives, whole or streamed (each delta its tokens'), as the chat completion it makes gives
    them; without include, none."""
    client = responses_client(FakeBackend(tok), tok)
    body = {"model": MODEL, "input": "Speak.", "max_output_tokens": 6, "temperature": 0}
    chat = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Speak."}], max_tokens=6,
                                                temperature=0, logprobs=True, top_logprobs=2)
    want = [t.model_dump() for t in chat.choices[0].logprobs.content]
    assert len(want) == 6 and all(len(t["top_logprobs"]) == 2 for t in want)
    out = await client.responses.create(**body, include=["message.output_text.logprobs"], top_logprobs=2, stream=stream)
    if stream:
        events = [e async for e in out]
        deltas = [t.model_dump() for e in events if e.type == "response.output_text.delta" for t in e.logprobs]
        done = next(e for e in events if e.type == "response.output_text.done")
        assert deltas == [t.model_dump() for t in done.logprobs] == want
        out = events[-1].response
    assert [t.model_dump() for t in out.output[0].content[0].logprobs] == want and out.top_logprobs == 2
    plain = await client.responses.create(**body)
    assert plain.output[0].content[0].logprobs == []


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_responses_give_a_reasoning_item_before_the_message(tok, stream) -> None:
    config = make_config(reasoning_parser="qwen3")
    backend = ScriptedBackend(tok, "<think>Two is more.</think>\n\nIt is 2.")
    client = responses_client(backend, tok, config)
    out = await client.responses.create(model=MODEL, input="Which is more?", stream=stream)
    if stream:
        events = [e async for e in out]
        kinds = [e.type for e in events]
        assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
        out = events[-1].response
    assert [item.type for item in out.output] == ["reasoning", "message"]
    assert out.output[0].content[0].text == "Two is more." and out.output_text == "It is 2."


async def test_responses_take_a_json_schema_and_refuse_what_they_cannot_do(tok) -> None:
    """text.format json_schema is the grammar; what the server cannot do is a 400."""
    backend = FakeBackend(tok)
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    response = await post(backend, tok, "/v1/responses", {"model": MODEL, "input": "Who?",
                          "text": {"format": {"type": "json_schema", "name": "person", "schema": schema}}})
    assert response.status_code == 200, response.text
    assert json.loads(backend.requests[0].params.structured_output.json) == schema
    assert response.json()["text"] == {"format": {"type": "json_schema", "name": "person", "schema": schema}}
    for body, param in [
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
        ({"input": "x", "tools": [{"type": "function", "name": "f"}]}, "tool_choice"),   # auto, and no parser
        ({"input": "x", "background": True}, "background"),
        ({"input": []}, "input"),
        ({"input": [{"type": "web_search_call", "id": "c"}]}, "input"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "schema": schema}}}, "text"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "tools": RESPONSE_TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tools"),
        ({"input": "x", "max_output_tokens": 5000}, "max_output_tokens"),
    ]:
        assert_error(await post(backend, tok, "/v1/responses", {"model": MODEL, **body}), 400, param)
    assert len(backend.requests) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_stored_responses_are_read_deleted_and_gone_on_from(tok, stream) -> None:
    """``store`` (the default) keeps an answer: ``GET /v1/responses/{id}`` reads it, a request with
    its ``previous_response_id`` is its conversation (input and answer, not its instructions) then
    the new input, chained as far as the client goes on, and ``DELETE`` forgets it."""
    import openai

    backend = FakeBackend(tok)
    app = create_app(make_config(), backend, tok)
    client = openai.AsyncOpenAI(base_url="http://gateway/v1", api_key="unused", http_client=client_for(app), max_retries=0)

    async def create(**kwargs):
        out = await client.responses.create(model=MODEL, max_output_tokens=6, stream=stream, **kwargs)
        return [e async for e in out][-1].response if stream else out

    first = await create(input="Speak.", instructions="Be brief.")
    assert first.store and (await client.responses.retrieve(first.id)).model_dump() == first.model_dump()
    second = await create(input="Again.", instructions="Be kind.", previous_response_id=first.id)
    third = await create(input=[{"role": "user", "content": "More."}], previous_response_id=second.id)
    conversation = [{"role": "user", "content": "Speak."}, {"role": "assistant", "content": first.output_text},
                    {"role": "user", "content": "Again."}]
    assert backend.requests[1].prompt_token_ids == tok.encode_chat(
        [{"role": "system", "content": "Be kind."}, *conversation], add_generation_prompt=True)
    assert backend.requests[2].prompt_token_ids == tok.encode_chat(
        [*conversation, {"role": "assistant", "content": second.output_text}, {"role": "user", "content": "More."}],
        add_generation_prompt=True)
    assert (second.previous_response_id, third.previous_response_id) == (first.id, second.id)
    async with client_for(app) as raw:
        deleted = await raw.delete(f"/v1/responses/{first.id}")
        assert deleted.status_code == 200 and deleted.json() == {"id": first.id, "object": "response.deleted", "deleted": True}
        assert_error(await raw.delete(f"/v1/responses/{first.id}"), 404)
        assert_error(await raw.get(f"/v1/responses/{first.id}"), 404)
        assert_error(await raw.post("/v1/responses", json={"input": "x", "previous_response_id": first.id}), 404,
                     "previous_response_id")
    unstored = await create(input="Speak.", store=False)
    assert not unstored.store
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(unstored.id)
    none_kept = responses_client(FakeBackend(tok), tok, make_config(responses_store_mb=0))
    out = await none_kept.responses.create(model=MODEL, input="Speak.", max_output_tokens=2)
    assert not out.store
    with pytest.raises(openai.NotFoundError):
        await none_kept.responses.retrieve(out.id)
    assert len(backend.requests) == 4


async def test_the_memory_response_store_keeps_the_conversation_and_drops_the_least_recent_past_its_bound() -> None:
    from baton.services.gateway.protocol import (
        OutputFunctionCall, OutputMessage, OutputReasoning, OutputText, ReasoningText, ResponseObject,
        ResponseFunctionCallItem, ResponseInputMessage, ResponseText,
    )
    from baton.services.gateway.response_store import MemoryResponseStore, StoredResponse

    def response(rid: str, text: str) -> ResponseObject:
        return ResponseObject(id=rid, status="completed", model=MODEL, temperature=1.0, top_p=1.0, text=ResponseText(), output=[
            OutputReasoning(id="rs", status="completed", content=[ReasoningText(text="hm")]),
            OutputMessage(id="msg", status="completed", content=[OutputText(text=text)]),
            OutputFunctionCall(id="fc", call_id="call_1", name="f", arguments="{}", status="completed")])

    asked = [ResponseInputMessage(role="user", content="Q")]
    probe = MemoryResponseStore(1 << 20)
    assert await probe.put(response("r0", "A"), asked)
    size, kept = probe.bytes, await probe.get("r0")
    assert kept.conversation == [*asked, ResponseInputMessage(role="assistant", content="A"),
                                 ResponseFunctionCallItem(type="function_call", call_id="call_1", name="f", arguments="{}")]
    assert StoredResponse.from_json(kept.to_json()) == kept and size == len(kept.to_json())
    store = MemoryResponseStore(3 * size)
    for rid in ("r1", "r2", "r3"):
        assert await store.put(response(rid, "A"), asked)
    assert await store.get("r1") is not None            # now the most recently used
    assert await store.put(response("r4", "A"), asked)
    assert await store.get("r2") is None and [await store.get(r) is not None for r in ("r1", "r3", "r4")] == [True] * 3
    assert (len(store), store.bytes) == (3, 3 * size)
    assert not await store.put(response("big", "A" * 4 * size), asked) and await store.get("big") is None
    assert await store.delete("r3") and not await store.delete("r3") and (len(store), store.bytes) == (2, 2 * size)


async def test_a_response_stream_that_fails_ends_with_an_error_event(tok) -> None:
    backend = FakeBackend(tok, per_chunk=2, fail_after=4)
    response = await post(backend, tok, "/v1/responses", {"model": MODEL, "input": "Speak.", "stream": True})
    lines = response.text.splitlines()
    events = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]
    names = [line[len("event: "):] for line in lines if line.startswith("event: ")]
    assert names == [e["type"] for e in events] and events[-1]["type"] == "error"
    assert "went away" in events[-1]["message"] and "response.completed" not in names


RESPONSE_TOOLS = [{"type": "function", "name": w["function"]["name"], **{k: v for k, v in w["function"].items() if k != "name"}}
                  for w in (WEATHER, CLOCK)]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_responses_make_function_calls_as_chat_does(tok, stream) -> None:
    """A named tool_choice, "required", and "auto" read by the tool-call parser: the calls are
    function_call items (after any message), streamed as argument deltas."""
    config = make_config(tool_call_parser="hermes")
    cases = [
        ({"type": "function", "name": "get_weather"}, '{"city":"Verona"}', [], [("get_weather", '{"city":"Verona"}')]),
        ("required", '[{"name":"get_time","parameters":{}}]', [], [("get_time", "{}")]),
        ("auto", HERMES, ["Let me look."], [("get_weather", '{"city": "Verona"}'), ("get_time", "{}")]),
    ]
    for tool_choice, text, said, calls in cases:
        backend = ScriptedBackend(tok, text)
        client = responses_client(backend, tok, config)
        out = await client.responses.create(model=MODEL, input="Weather in Verona?", tools=RESPONSE_TOOLS,
                                            tool_choice=tool_choice, stream=stream)
        if stream:
            events = [e async for e in out]
            deltas: dict[str, str] = {}
            for e in events:
                if e.type == "response.function_call_arguments.delta":
                    deltas[e.item_id] = deltas.get(e.item_id, "") + e.delta
            out = events[-1].response
            assert [deltas[item.id] for item in out.output if item.type == "function_call"] == [a for _, a in calls]
        assert [item.content[0].text for item in out.output if item.type == "message"] == said, tool_choice
        got = [(item.name, item.arguments) for item in out.output if item.type == "function_call"]
        assert got == calls, tool_choice
        assert all(item.call_id.startswith("call_") for item in out.output if item.type == "function_call")
        assert backend.requests[0].params.structured_output is not None or tool_choice == "auto"


async def test_responses_read_mistral_markers_that_are_special_tokens(marked) -> None:
    """The Responses API reads Mistral's special-token markers as chat does: a reasoning item,
    then a function_call item per call."""
    config = make_config(tool_call_parser="mistral", reasoning_parser="mistral")
    backend = ScriptedBackend(marked, f"[THINK]Ask the sky.[/THINK]{MISTRAL_CALLS}")
    out = await responses_client(backend, marked, config).responses.create(model=MODEL, input="Weather in Verona?",
                                                                           tools=RESPONSE_TOOLS)
    assert [item.type for item in out.output] == ["reasoning", "function_call", "function_call"]
    assert out.output[0].content[0].text == "Ask the sky." and out.output[2].call_id == "a1B2c3D4e"
    assert [(item.name, item.arguments) for item in out.output[1:]] == MISTRAL_READ


async def test_earlier_function_calls_and_their_outputs_reach_the_template(tok, tmp_path) -> None:
    """Consecutive function_call items are one assistant message's calls; each output a tool message."""
    tool_tok = tool_template_tokenizer(tmp_path)
    backend = ScriptedBackend(tool_tok, "Rain in both.")
    inputs = [
        {"role": "user", "content": "Weather?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Verona"}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city": "Mantua"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "rain"},
        {"type": "function_call_output", "call_id": "call_2", "output": "rain"},
    ]
    body = {"model": MODEL, "input": inputs, "tools": RESPONSE_TOOLS, "tool_choice": "none"}
    response = await post(backend, tool_tok, "/v1/responses", body)
    assert response.status_code == 200, response.text
    assert tool_tok.decode(backend.requests[0].prompt_token_ids) == \
        "user:Weather?;assistant:get_weather(Verona)get_weather(Mantua);tool:call_1rain;tool:call_2rain;"   # "none": no tools
    assert response.json()["output"][0]["content"][0]["text"] == "Rain in both."


async def test_a_cancelled_embedding_request_cancels_its_inputs(tok) -> None:
    """The client gone: every input's call is cancelled, and the request counts as aborted."""
    from baton.services.gateway import metrics

    started, cancelled = asyncio.Event(), []

    class Slow(FakeBackend):
        async def embed(self, request: EmbedRequest) -> EmbedResult:
            started.set()
            try:
                await asyncio.sleep(60)
            finally:
                cancelled.append(request.request_id)

    aborted = metrics.REQUESTS_TOTAL.labels(status="aborted")._value.get()
    serving = OpenAIServing(make_config(), Slow(tok), tok)
    task = asyncio.create_task(serving.create_embedding(EmbeddingRequest(model=MODEL, input=["a", "b"])))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(cancelled) == 2 and metrics.REQUESTS_TOTAL.labels(status="aborted")._value.get() == aborted + 1


# ---- vLLM's return_token_ids --------------------------------------------------------------


def streamed_ids(response: httpx.Response) -> tuple[dict[int, list[int]], dict[int, list[list[int]]]]:
    """Each choice's streamed token ids, and the prompt ids its chunks carried (one list per chunk that did)."""
    ids: dict[int, list[int]] = {}
    prompts: dict[int, list[list[int]]] = {}
    for event in sse_events(response)[:-1]:
        chunk = json.loads(event)
        for c in chunk["choices"]:
            ids.setdefault(c["index"], []).extend(c.get("token_ids", []))
            prompt = c.get("prompt_token_ids", chunk.get("prompt_token_ids"))
            prompts.setdefault(c["index"], []).extend([prompt] if prompt is not None else [])
    return ids, prompts


async def test_return_token_ids_gives_the_prompts_and_each_choices_token_ids(tok) -> None:
    """Beside the text: the prompt's ids and each choice's; streamed, the prompt's on a choice's
    first chunk and each chunk's own ids; absent unless asked for (vLLM's return_token_ids)."""
    prompt, messages = "JULIET:\nO Romeo", [{"role": "user", "content": "Speak, Romeo."}]
    want = [tok.encode(script)[1:8] for script in SCRIPTS]      # FakeBackend's choices 0 and 1, 7 tokens
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 7, "n": 2, "return_token_ids": True}
    choices = (await post(FakeBackend(tok), tok, "/v1/completions", body)).json()["choices"]
    assert [c["token_ids"] for c in choices] == want
    assert [c["prompt_token_ids"] for c in choices] == [tok.encode(prompt)] * 2
    assert [c["text"] for c in choices] == [tok.decode(ids) for ids in want]
    stream = await post(FakeBackend(tok, per_chunk=2), tok, "/v1/completions", {**body, "stream": True})
    assert streamed_ids(stream) == ({0: want[0], 1: want[1]}, {0: [tok.encode(prompt)], 1: [tok.encode(prompt)]})

    chat = {"model": MODEL, "messages": messages, "max_tokens": 7, "return_token_ids": True}
    answer = (await post(FakeBackend(tok), tok, "/v1/chat/completions", chat)).json()
    assert answer["prompt_token_ids"] == tok.encode_chat(messages, add_generation_prompt=True)
    assert answer["choices"][0]["token_ids"] == want[0]
    stream = await post(FakeBackend(tok, per_chunk=2), tok, "/v1/chat/completions", {**chat, "stream": True})
    assert streamed_ids(stream) == ({0: want[0]}, {0: [answer["prompt_token_ids"]]})

    for path, plain in (("/v1/completions", body), ("/v1/chat/completions", chat)):
        out = (await post(FakeBackend(tok), tok, path, {**plain, "return_token_ids": False})).json()
        assert "prompt_token_ids" not in out
        assert all({"token_ids", "prompt_token_ids"}.isdisjoint(c) for c in out["choices"])
