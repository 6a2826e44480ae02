"""The gateway's flags that ``baton up`` takes too, declared once for both (``add``), and handed on
to the gateway ``baton up`` starts (``forwarded``): those set to other than their defaults, as the
gateway's command line takes them."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from baton.engine.generation_config import generation_config_arg
from baton.services.gateway.reasoning import PARSERS as REASONING_PARSERS
from baton.services.gateway.sampling_defaults import override_generation_config_arg
from baton.services.gateway.tokenizer import chat_template_arg
from baton.services.gateway.tool_parsers import PARSERS


def json_list_arg(text: str) -> list[str]:
    """A flag's JSON list of strings (vLLM's CORS flags take them so)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {text}")
    return value


def env_flag(name: str) -> bool:
    """A vLLM switch in the environment: "1" or "true", any case."""
    return os.environ.get(name, "0").strip().lower() in ("1", "true")


def _flags() -> list[tuple[str, dict[str, Any]]]:
    """Each flag's name and ``add_argument`` keywords (the environment read now, for the defaults)."""
    switch = {"action": "store_true", "default": False}
    return [
        ("--max-local-prefill-length", dict(
            type=int, default=0,
            help="a prompt whose tokens to compute (past the prefix the decode worker caches) are at most this many "
                 "is computed on the decode worker, with no prefill worker or KV transfer (Dynamo's; default 0: every "
                 "prompt goes to a prefill worker)")),
        ("--max-prefill-queue-size", dict(
            type=int, default=0,
            help="while every prefill worker has at least this many prompts (running and waiting), or none answers, "
                 "prompts of any length are computed on the decode worker (Dynamo's; default 0: never)")),
        ("--api-server-count", dict(
            type=int, default=1, metavar="N",
            help="serve the port from N gateway processes (vLLM's), each taking the connections it accepts and "
                 "admitting --max-queue requests; their metrics are summed; above 1 needs Redis, through which they "
                 "share stored responses and runtime LoRA adapters")),
        ("--tool-call-parser", dict(
            choices=PARSERS, default=None,
            help="read the model's own tool calls in this format, for tool_choice 'auto' (default: 'auto' is refused)")),
        ("--enable-auto-tool-choice", dict(
            switch, help="vLLM's flag, taken as vLLM takes it: it needs --tool-call-parser, which turns tool_choice "
                         "'auto' on by itself")),
        ("--reasoning-parser", dict(
            choices=REASONING_PARSERS, default=None,
            help="give a reasoning model's thinking (<think> text; granite: its thought process; mistral: "
                 "[THINK] text) as the message's reasoning, apart from its content")),
        ("--chat-template", dict(
            type=chat_template_arg, default=None, metavar="FILE_OR_TEMPLATE",
            help="the Jinja chat template, or a file holding it, in place of the model's own (vLLM's)")),
        ("--trust-request-chat-template", dict(
            switch, help="a chat request may bring its own chat_template (Jinja, sandboxed; vLLM's): only where every "
                         "client is trusted, since rendering one can take the gateway's time and memory")),
        ("--enable-request-id-headers", dict(
            switch, help="generation responses carry the request's id as X-Request-Id (vLLM's)")),
        ("--enable-log-requests", dict(
            switch, help="log each request's prompt, token ids, sampling parameters and LoRA adapter (vLLM's)")),
        ("--disable-log-requests", dict(
            switch, help="accepted so that older vLLM command lines run: requests are logged only with "
                         "--enable-log-requests")),
        ("--max-log-len", dict(
            type=int, default=None, metavar="N",
            help="with --enable-log-requests: log at most N characters and N token ids of a prompt (vLLM's; "
                 "default: all)")),
        ("--enable-force-include-usage", dict(
            switch, help="every streamed response ends with a usage chunk, as if it asked for stream_options."
                         "include_usage (vLLM's)")),
        ("--root-path", dict(
            default="", metavar="PATH", help="the path prefix a proxy serves the gateway under (vLLM's; uvicorn's)")),
        ("--disable-fastapi-docs", dict(switch, help="serve no /docs, /redoc or /openapi.json (vLLM's)")),
        ("--disable-uvicorn-access-log", dict(switch, help="log no line per HTTP request (vLLM's)")),
        ("--uvicorn-log-level", dict(
            default=None, choices=("critical", "error", "warning", "info", "debug", "trace"),
            help="the HTTP server's log level (vLLM's; default: the gateway's --log-level)")),
        ("--response-role", dict(
            default="assistant", metavar="ROLE",
            help="the role of a chat answer where the request has add_generation_prompt (vLLM's; default assistant); "
                 "without it, the answer continues the last message in that message's role")),
        ("--responses-store-mb", dict(
            type=int, default=64, metavar="MB",
            help="the Responses API answers a request may store (store, the default) for later ones to go on from "
                 "(previous_response_id) and clients to read or delete: without Redis, at most MB of them in this "
                 "gateway's memory, the least recently used out first (0: none stored, with Redis or without)")),
        ("--responses-store-ttl", dict(
            type=int, default=86400, metavar="SECONDS",
            help="with Redis, where every gateway sees the stored answers: how long each is kept")),
        ("--return-tokens-as-token-ids", dict(
            switch, help='log-probs name their tokens "token_id:{id}" unless a request says otherwise (vLLM\'s)')),
        ("--generation-config", dict(
            type=generation_config_arg, default="auto", metavar="auto|vllm|DIR",
            help="sampling defaults for requests that leave them out, as vLLM takes them: from the model's "
                 "generation_config.json (auto), none (vllm), or DIR/generation_config.json")),
        ("--override-generation-config", dict(
            type=override_generation_config_arg, default={}, metavar="JSON",
            help='sampling defaults set on top of the generation config\'s (vLLM\'s), e.g. \'{"temperature": 0.5, '
                 '"max_new_tokens": 256}\': its max_new_tokens caps every request')),
        ("--allow-runtime-lora-updating", dict(
            switch, default=env_flag("VLLM_ALLOW_RUNTIME_LORA_UPDATING"),
            help="serve /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's; also "
                 "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True in the environment)")),
        ("--allowed-origins", dict(
            type=json_list_arg, default=["*"], metavar="JSON",
            help='CORS: the origins a browser may call from, a JSON list (vLLM\'s; default ["*"])')),
        ("--allowed-methods", dict(
            type=json_list_arg, default=["*"], metavar="JSON", help="CORS: the methods allowed (vLLM's)")),
        ("--allowed-headers", dict(
            type=json_list_arg, default=["*"], metavar="JSON", help="CORS: the request headers allowed (vLLM's)")),
        ("--allow-credentials", dict(switch, help="CORS: allow credentials (cookies, HTTP authentication; vLLM's)")),
        ("--ssl-keyfile", dict(default=None, metavar="FILE", help="TLS: the server's private key (vLLM's)")),
        ("--ssl-certfile", dict(default=None, metavar="FILE", help="TLS: the server's certificate chain (vLLM's)")),
        ("--ssl-ca-certs", dict(
            default=None, metavar="FILE", help="TLS: the CA certificates clients' certificates are checked against (vLLM's)")),
        ("--ssl-cert-reqs", dict(
            type=int, choices=(0, 1, 2), default=0,
            help="TLS: client certificates none (0), optional (1) or required (2), as Python's ssl.CERT_* (vLLM's)")),
        ("--dev-mode", dict(
            switch, default=env_flag("VLLM_SERVER_DEV_MODE"),
            help="serve vLLM's dev-mode route /reset_prefix_cache (also VLLM_SERVER_DEV_MODE=1 in the environment, "
                 "as in vLLM)")),
    ]


def add(parser: argparse.ArgumentParser) -> None:
    for name, options in _flags():
        parser.add_argument(name, **options)


def forwarded(args: argparse.Namespace) -> list[str]:
    """The gateway's arguments for the flags of ``args`` set to other than their defaults."""
    out: list[str] = []
    for name, options in _flags():
        value = getattr(args, name[2:].replace("-", "_"))
        if value == options["default"]:
            continue
        if options.get("action") == "store_true":
            out.append(name)
        else:
            out += [name, json.dumps(value) if isinstance(value, dict | list) else str(value)]
    return out
