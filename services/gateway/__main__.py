"""Run the gateway: ``python -m baton.services.gateway --model-dir DIR --served-model-name NAME ...``.

Shutdown on SIGTERM (or Ctrl-C) drains: ``/ready`` answers 503 at once and new
generation requests get 503, while the listener stays open so in-flight
requests can finish; once none is left (at least ``DRAIN_MIN_S`` after the
signal, so load balancers see the 503) or ``shutdown_timeout_s`` has passed,
uvicorn shuts down and the process exits 0. A second signal exits at once.

With ``--api-server-count N`` above 1, this process supervises N gateways that serve its port
(``api_servers``) and passes each signal on to them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from baton.engine.config import parse_lora_modules
from baton.engine.sampling_params import DEFAULT_MAX_LOGPROBS
from baton.services.gateway import api_servers, sampling_defaults, serving_flags
from baton.services.gateway.app import GatewayState, create_app
from baton.services.gateway.backend_grpc import GrpcBackend
from baton.services.gateway.config import GatewayConfig
from baton.services.gateway.tokenizer import GatewayTokenizer
from baton.services.gateway.tool_parsers import AUTO_TOOL_CHOICE_NEEDS_PARSER

DRAIN_MIN_S = 1.0
FINAL_SHUTDOWN_S = 5.0  # after draining: what uvicorn waits for connections before cancelling them


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m baton.services.gateway", description="Baton's OpenAI-compatible gateway")
    p.add_argument("--model-dir", required=True, help="local Hugging Face model directory (tokenizer, config.json)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="the tokenizer's directory (tokenizer.json, tokenizer_config.json, chat template), where it is "
                        "not --model-dir (vLLM's)")
    p.add_argument("--served-model-name", nargs="+", metavar="NAME",
                   help="the model's names for clients, the first in responses (vLLM's; default: the directory's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--redis-url", default=os.environ.get("BATON_REDIS_URL"), help="prefix index and worker registry")
    p.add_argument("--prefill-addr", action="append", default=[], help="static prefill worker host:port (repeatable)")
    p.add_argument("--decode-addr", action="append", default=[], help="static decode worker host:port (repeatable)")
    p.add_argument(
        "--api-key", action="append", default=[],
        help="accepted Bearer key (repeatable; also BATON_API_KEYS, comma-separated, and vLLM's VLLM_API_KEY); "
             "none: no authentication",
    )
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-n", type=int, default=8)
    p.add_argument("--max-logprobs", type=int, default=DEFAULT_MAX_LOGPROBS,
                   help="the most log-probs a request may ask for each token (vLLM's; -1: the whole vocabulary)")
    p.add_argument("--max-queue", type=int, default=256, help="requests in flight before 429")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds, whole request")
    p.add_argument(
        "--max-retries", type=int, default=2,
        help="times a request is retried on other workers after one fails (streamed tokens resume, not restart)",
    )
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds in-flight requests get after SIGTERM")
    p.add_argument("--lora-modules", nargs="+", action="extend", default=[], metavar="NAME=PATH",
                   help="the LoRA adapters the workers load (their --lora-modules): requests may name them as model")
    serving_flags.add(p)
    # An API server's, from its supervisor (api_servers.child_command).
    p.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--supervisor-pid", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="info")
    return p


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    env_keys = [k.strip() for k in os.environ.get("BATON_API_KEYS", "").split(",") if k.strip()]
    env_keys += [os.environ["VLLM_API_KEY"]] if os.environ.get("VLLM_API_KEY") else []   # vLLM's one key
    served_model_name, *aliases = args.served_model_name or [os.path.basename(os.path.normpath(args.model_dir))]
    return GatewayConfig(
        model_dir=args.model_dir,
        tokenizer=args.tokenizer,
        served_model_name=served_model_name,
        served_model_aliases=aliases,
        host=args.host,
        port=args.port,
        api_keys=args.api_key + env_keys,
        redis_url=args.redis_url,
        prefill_addrs=args.prefill_addr,
        decode_addrs=args.decode_addr,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        max_n=args.max_n,
        max_logprobs=args.max_logprobs,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        request_timeout_s=args.request_timeout,
        max_retries=args.max_retries,
        max_local_prefill_length=args.max_local_prefill_length,
        max_prefill_queue_size=args.max_prefill_queue_size,
        allowed_origins=args.allowed_origins,
        allowed_methods=args.allowed_methods,
        allowed_headers=args.allowed_headers,
        allow_credentials=args.allow_credentials,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        ssl_ca_certs=args.ssl_ca_certs,
        ssl_cert_reqs=args.ssl_cert_reqs,
        shutdown_timeout_s=args.shutdown_timeout,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        response_role=args.response_role,
        responses_store_mb=args.responses_store_mb,
        responses_store_ttl_s=args.responses_store_ttl,
        lora_modules=parse_lora_modules(args.lora_modules, served_model_name),
        allow_runtime_lora_updating=args.allow_runtime_lora_updating,
        dev_mode=args.dev_mode,
        chat_template=args.chat_template,
        trust_request_chat_template=args.trust_request_chat_template,
        return_tokens_as_token_ids=args.return_tokens_as_token_ids,
        enable_request_id_headers=args.enable_request_id_headers,
        enable_log_requests=args.enable_log_requests,
        enable_force_include_usage=args.enable_force_include_usage,
        root_path=args.root_path,
        disable_fastapi_docs=args.disable_fastapi_docs,
        disable_uvicorn_access_log=args.disable_uvicorn_access_log,
        max_log_len=args.max_log_len,
        generation_config=args.generation_config,
        override_generation_config=args.override_generation_config,
    )


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain phase between the signal and the listener closing."""

    def __init__(self, config: uvicorn.Config, state: GatewayState, drain_timeout_s: float,
                 supervisor: int | None = None) -> None:
        """``supervisor``: an API server's supervisor's pid (its exit stops the server), else None."""
        super().__init__(config)
        self.state = state
        self.drain_timeout_s = drain_timeout_s
        self.drain_started: float | None = None
        self.supervisor = supervisor

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.state.draining:
            super().handle_exit(sig, frame)  # second signal: stop now
            return
        logging.getLogger(__name__).info("signal %s: draining %d request(s)", sig, self.state.in_flight)
        self.state.draining = True
        self.drain_started = time.monotonic()

    def drained(self) -> bool:
        if self.drain_started is None:
            return False
        waited = time.monotonic() - self.drain_started
        return waited >= self.drain_timeout_s or (self.state.in_flight == 0 and waited >= min(DRAIN_MIN_S, self.drain_timeout_s))

    async def on_tick(self, counter: int) -> bool:
        if self.drained() or (self.supervisor is not None and api_servers.parent_gone(self.supervisor)):
            self.should_exit = True
        return await super().on_tick(counter)


async def serve(config: GatewayConfig, tokenizer: GatewayTokenizer, log_level: str, listen_fd: int | None,
                supervisor: int | None) -> None:
    """Build the app inside the running loop (the backend's gRPC channels bind to it) and serve, on
    the inherited socket ``listen_fd`` of an API server's ``supervisor`` where given."""
    app = create_app(config, GrpcBackend(config), tokenizer)
    server = DrainingServer(uvicorn_config(app, config, log_level), app.state.gateway, config.shutdown_timeout_s,
                            supervisor)
    await server.serve(sockets=None if listen_fd is None else [socket.socket(fileno=listen_fd)])


def uvicorn_config(app: FastAPI, config: GatewayConfig, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        app, host=config.host, port=config.port, log_level=log_level, timeout_graceful_shutdown=FINAL_SHUTDOWN_S,
        ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile, ssl_ca_certs=config.ssl_ca_certs,
        ssl_cert_reqs=config.ssl_cert_reqs, access_log=not config.disable_uvicorn_access_log, root_path=config.root_path,
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        parser.error(AUTO_TOOL_CHOICE_NEEDS_PARSER)
    if args.api_server_count < 1:
        parser.error("--api-server-count must be at least 1")
    if args.api_server_count > 1 and not args.redis_url:
        parser.error(api_servers.NEEDS_REDIS)
    try:
        config = config_from_args(args)
        # a default a request's field would refuse stops the start
        sampling_defaults.load(config.model_dir, config.generation_config, config.override_generation_config)
        tokenizer = GatewayTokenizer(config.tokenizer_dir, config.chat_template)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.api_server_count > 1:
        sys.exit(api_servers.supervise(argv, config.host, config.port, args.api_server_count))
    asyncio.run(serve(config, tokenizer, args.uvicorn_log_level or args.log_level, args.listen_fd, args.supervisor_pid))


if __name__ == "__main__":
    main()
