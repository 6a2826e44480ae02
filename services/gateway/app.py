"""The gateway's HTTP surface: a thin FastAPI router over ``OpenAIServing``.

A generation request passes: API key (401) -> not draining (503) -> admission,
at most ``max_queue`` in flight (429) -> body size (413) -> JSON (400) ->
validation (400) -> serving (404 unknown model, 400 too long, 503 no worker)
-> a JSON response or an SSE stream. It stays admitted until its response
(streamed or not) has been sent or the client has gone.

``/health`` (liveness), ``/ready`` (backend reachable and not draining), ``/metrics`` and the
other probes (``probes``) need no API key. With ``allow_runtime_lora_updating`` (vLLM's
``VLLM_ALLOW_RUNTIME_LORA_UPDATING``), ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``
exist, answered as vLLM answers them: plain text on success, error JSON otherwise. In dev mode
(``dev_mode``, vLLM's ``VLLM_SERVER_DEV_MODE``), ``/reset_prefix_cache`` exists: an empty 200, or
error JSON.
"""

from __future__ import annotations

import asyncio
import hmac
import uuid
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from baton.services.gateway import metrics
from baton.services.gateway.backend import Backend
from baton.services.gateway.config import GatewayConfig
from baton.services.gateway.probes import add_probes
from baton.services.gateway.protocol import (
    APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest, LoadLoRAAdapterRequest,
    RerankRequest, ResponsesRequest, ScoreRequest, TokenizeRequest, UnloadLoRAAdapterRequest,
)
from baton.services.gateway.serving import OpenAIServing
from baton.services.gateway.streaming import PrimedStream, logged_api_error
from baton.services.gateway.tokenizer import GatewayTokenizer

logger = logging.getLogger(__name__)
BACKEND_CLOSE_TIMEOUT_S = 10.0   # at shutdown: what the backend gets to close its channels and Redis
SCHEMA_REFS = "#/components/schemas/"
REQUEST_ID_HEADER = "X-Request-Id"   # vLLM's: names a request, in place of its body's request_id

RequestT = TypeVar("RequestT", bound=BaseModel)
T = TypeVar("T")


@dataclass
class GatewayState:
    """Admission and shutdown state: ``draining`` flips on SIGTERM (see ``__main__``)."""

    max_queue: int
    draining: bool = False
    in_flight: int = 0

    def admit(self) -> None:
        if self.draining:
            raise APIError("The server is shutting down.", status=503, type="service_unavailable_error")
        if self.in_flight >= self.max_queue:
            raise APIError(
                "Too many requests in flight; retry later.", status=429, type="rate_limit_error",
                code="rate_limit_exceeded",
            )
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1


class _StreamResponse(EventSourceResponse):
    """SSE that always ends its generation and releases its admission slot,
    however the response ends (finished, client gone, server shutting down)."""

    def __init__(self, stream: PrimedStream, on_close: Callable[[], None]) -> None:
        super().__init__(stream, sep="\n")
        self._stream = stream
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._stream.aclose()
            finally:
                self._on_close()


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body().model_dump(), status_code=error.status)


def _validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = loc[0] if loc else None
    message = first.get("msg", "invalid request")
    return APIError(f"{param}: {message}" if param else message, param=param)


async def _read_json(request: Request, limit: int) -> Any:
    """The request's body as JSON, read once (``/invocations`` looks before its route reads)."""
    if "baton.json" in request.scope:
        return request.scope["baton.json"]
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise APIError(f"request body is larger than {limit} bytes", status=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(f"request body is larger than {limit} bytes", status=413)
    try:
        request.scope["baton.json"] = json.loads(body)
    except ValueError as exc:
        raise APIError(f"request body is not valid JSON: {exc}") from exc
    return request.scope["baton.json"]


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Run ``work``; cancel it (aborting its generation) and return None if the
    client goes away first."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            return None
        raise
    finally:
        watcher.cancel()


def _check_api_key(request: Request, keys: list[str]) -> None:
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.encode(), k.encode()) for k in keys):
        raise APIError("Invalid or missing API key.", status=401, code="invalid_api_key")


async def _generate(
    request: Request,
    config: GatewayConfig,
    state: GatewayState,
    model: type[RequestT],
    handler: Callable[[RequestT], Awaitable[BaseModel | PrimedStream]],
) -> Response:
    """One generation request, from its API key to its response; never raises. Its id (vLLM's
    ``request_id``: the ``X-Request-Id`` header's, else the body's, else a fresh one) names its
    response, and with ``enable_request_id_headers`` comes back as that header."""
    admitted = release_now = False
    request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
    try:
        _check_api_key(request, config.api_keys)
        state.admit()
        admitted = release_now = True
        body = await _read_body(request, config, model)
        if "request_id" in model.model_fields:
            request_id = body.request_id or request_id
            body = body.model_copy(update={"request_id": request_id})
        result = await _unless_disconnected(request, handler(body))
        if result is None:
            response: Response = Response(status_code=499)  # nobody is listening any more
        elif isinstance(result, PrimedStream):
            release_now = False
            response = _StreamResponse(result, state.release)
        else:
            response = JSONResponse(result.model_dump(mode="json"))
    except Exception as exc:
        error = logged_api_error(exc)
        if error.status < 500:
            metrics.REQUESTS_TOTAL.labels(status="rejected").inc()
        response = error_response(error)
    finally:
        if admitted and release_now:
            state.release()
    if config.enable_request_id_headers:
        response.headers[REQUEST_ID_HEADER] = request_id
    return response


async def _answer(
    request: Request, config: GatewayConfig, model: type[RequestT],
    handler: Callable[[RequestT], Awaitable[BaseModel | str]],
) -> Response:
    """A request the gateway answers without an admission slot (itself, or a LoRA adapter's load
    or unload), as JSON or plain text; never raises."""
    try:
        _check_api_key(request, config.api_keys)
        body = await _read_body(request, config, model)
        result = await handler(body)
        if isinstance(result, str):
            return PlainTextResponse(result)
        return JSONResponse(result.model_dump(mode="json"))
    except Exception as exc:
        return error_response(logged_api_error(exc))


async def _read_body(request: Request, config: GatewayConfig, model: type[RequestT]) -> RequestT:
    """The request's JSON body as ``model``; an ``APIError`` (400, 413) where it is not one. A
    ``model`` with vLLM's ``request_id`` takes the ``X-Request-Id`` header's in place of the body's;
    one that leaves out the model, or names it by another of its names, names it by the first."""
    data = await _read_json(request, config.max_body_bytes)
    header = request.headers.get(REQUEST_ID_HEADER)
    if header is not None and isinstance(data, dict) and "request_id" in model.model_fields:
        data = {**data, "request_id": header}
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from exc
    if "model" in model.model_fields and (body.model is None or body.model in config.served_model_aliases):
        body = body.model_copy(update={"model": config.served_model_name})   # vLLM's: the first name answers
    return body


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(str(exc.detail), status=exc.status_code, type=kind))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        return error_response(_validation_error(exc))


def create_app(config: GatewayConfig, backend: Backend, tokenizer: GatewayTokenizer) -> FastAPI:
    serving = OpenAIServing(config, backend, tokenizer)
    state = GatewayState(max_queue=config.max_queue)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        try:
            yield
        finally:
            try:
                await asyncio.wait_for(backend.close(), BACKEND_CLOSE_TIMEOUT_S)
            except TimeoutError:
                logger.warning("the backend did not close within %g s; shutting down without it", BACKEND_CLOSE_TIMEOUT_S)
            await serving.response_store.close()

    docs = {} if not config.disable_fastapi_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="Baton gateway", lifespan=lifespan, **docs)
    app.add_middleware(CORSMiddleware, allow_origins=config.allowed_origins, allow_methods=config.allowed_methods,
                       allow_headers=config.allowed_headers, allow_credentials=config.allow_credentials)
    app.state.gateway = state
    bodies: list[type[BaseModel]] = []   # the request models the routes read, for the OpenAPI document
    _add_generation_routes(app, config, state, serving, bodies)
    _add_answered_routes(app, config, serving, bodies)
    add_probes(app, backend, state, config.served_model_name)
    _add_error_handlers(app)
    _document_bodies(app, bodies)
    return app


def _add_generation_routes(app: FastAPI, config: GatewayConfig, state: GatewayState, serving: OpenAIServing,
                           bodies: list[type[BaseModel]]) -> None:
    """The routes that take an admission slot (``_generate``), and SageMaker's ``/invocations``."""
    @app.post("/v1/completions", openapi_extra=_openapi_body(bodies, CompletionRequest))
    async def completions(request: Request) -> Response:
        return await _generate(request, config, state, CompletionRequest, serving.create_completion)

    @app.post("/v1/chat/completions", openapi_extra=_openapi_body(bodies, ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        return await _generate(request, config, state, ChatCompletionRequest, serving.create_chat_completion)

    @app.post("/v1/responses", openapi_extra=_openapi_body(bodies, ResponsesRequest))
    async def responses(request: Request) -> Response:
        return await _generate(request, config, state, ResponsesRequest, serving.create_response)

    @app.post("/v1/embeddings", openapi_extra=_openapi_body(bodies, EmbeddingRequest))
    async def embeddings(request: Request) -> Response:
        return await _generate(request, config, state, EmbeddingRequest, serving.create_embedding)

    async def score(request: Request) -> Response:
        return await _generate(request, config, state, ScoreRequest, serving.create_score)

    async def rerank(request: Request) -> Response:
        return await _generate(request, config, state, RerankRequest, serving.create_rerank)

    for path in ("/score", "/v1/score"):           # vLLM's paths
        app.post(path, openapi_extra=_openapi_body(bodies, ScoreRequest))(score)
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.post(path, openapi_extra=_openapi_body(bodies, RerankRequest))(rerank)

    # SageMaker's one route, as vLLM serves it: the first of these fields the body has picks the API.
    invocation_routes = (("messages", chat_completions), ("prompt", completions), ("input", embeddings),
                         ("documents", rerank), ("text_1", score))

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        try:
            _check_api_key(request, config.api_keys)
            data = await _read_json(request, config.max_body_bytes)
            route = next((r for key, r in invocation_routes if isinstance(data, dict) and key in data), None)
            if route is None:
                raise APIError("the body is none of the requests /invocations takes: it needs one of "
                               + ", ".join(f"'{key}'" for key, _ in invocation_routes))
        except Exception as exc:
            return error_response(logged_api_error(exc))
        return await route(request)


def _add_answered_routes(app: FastAPI, config: GatewayConfig, serving: OpenAIServing, bodies: list[type[BaseModel]]) -> None:
    """The routes the gateway answers without an admission slot: tokenizing, runtime LoRA updates,
    the prefix-cache reset (dev mode), stored responses and the model list."""
    def answered(path: str, model: type[RequestT], handler: Callable[[RequestT], Awaitable[BaseModel | str]]) -> None:
        """A POST route that ``_answer`` answers with ``handler``."""
        async def route(request: Request) -> Response:
            return await _answer(request, config, model, handler)

        app.post(path, name=handler.__name__, openapi_extra=_openapi_body(bodies, model))(route)

    answered("/tokenize", TokenizeRequest, serving.tokenize)
    answered("/detokenize", DetokenizeRequest, serving.detokenize)
    if config.allow_runtime_lora_updating:
        answered("/v1/load_lora_adapter", LoadLoRAAdapterRequest, serving.load_lora_adapter)
        answered("/v1/unload_lora_adapter", UnloadLoRAAdapterRequest, serving.unload_lora_adapter)

    if config.dev_mode:
        @app.post("/reset_prefix_cache")
        async def reset_prefix_cache(request: Request) -> Response:
            try:
                _check_api_key(request, config.api_keys)
                await serving.reset_prefix_cache()
            except Exception as exc:
                return error_response(logged_api_error(exc))
            return Response(status_code=200)

    def stored(handler: Callable[[str], Awaitable[BaseModel]]) -> Callable[[Request, str], Awaitable[Response]]:
        """A route on a stored Responses API answer (``response_store``)."""
        async def route(request: Request, response_id: str) -> Response:
            try:
                _check_api_key(request, config.api_keys)
                return JSONResponse((await handler(response_id)).model_dump(mode="json"))
            except APIError as exc:
                return error_response(exc)

        return route

    app.get("/v1/responses/{response_id}", name="stored_response")(stored(serving.stored_response))
    app.delete("/v1/responses/{response_id}", name="delete_response")(stored(serving.delete_response))

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            _check_api_key(request, config.api_keys)
        except APIError as exc:
            return error_response(exc)
        return JSONResponse(serving.models().model_dump(mode="json"))


def _openapi_body(bodies: list[type[BaseModel]], model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of a handler that reads ``model`` from the raw request itself;
    ``model`` joins ``bodies``, whose schemas ``_document_bodies`` puts in the document."""
    bodies.append(model)
    schema = {"$ref": f"{SCHEMA_REFS}{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _document_bodies(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Put the request models' JSON schemas in the OpenAPI document (``/openapi.json``, ``/docs``)."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _, defs = models_json_schema([(m, "validation") for m in models], ref_template=SCHEMA_REFS + "{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
