"""Gateway configuration (from the launcher's flags or the environment)."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from baton.engine.sampling_params import DEFAULT_MAX_LOGPROBS


class GatewayConfig(BaseModel):
    model_dir: str                                   # local HF directory (config.json, generation_config.json)
    tokenizer: str | None = None                     # the tokenizer's directory, if not model_dir (vLLM's --tokenizer)
    served_model_name: str                           # the id /v1/models reports and requests must name
    served_model_aliases: list[str] = Field(default_factory=list)  # other names requests may use (vLLM's)
    allowed_origins: list[str] = Field(default_factory=lambda: ["*"])   # CORS, as vLLM's flags of these names
    allowed_methods: list[str] = Field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = Field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    ssl_keyfile: str | None = None                    # TLS (uvicorn's), as vLLM's flags of these names
    ssl_certfile: str | None = None
    ssl_ca_certs: str | None = None
    ssl_cert_reqs: int = 0
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = Field(default_factory=list)  # empty: no authentication
    redis_url: str | None = None                     # None: static addresses only
    prefill_addrs: list[str] = Field(default_factory=list)  # static gRPC host:port, besides the registry
    decode_addrs: list[str] = Field(default_factory=list)
    block_size: int = 16                             # must match the workers' (checked against the registry)
    max_model_len: int | None = None                 # default: config.json's max_position_embeddings
    max_n: int = 8
    max_logprobs: int = Field(default=DEFAULT_MAX_LOGPROBS, ge=-1)  # per token a request may ask for (-1: the vocabulary)
    max_queue: int = 256                             # admitted requests (running + waiting) before 429
    max_body_bytes: int = 1 << 20
    request_timeout_s: float = 600.0                 # whole request, end to end
    prefill_timeout_s: float = 120.0                 # deadline of one Prefill RPC
    control_timeout_s: float = 5.0                   # deadline of Reserve / Abort / GetLoad
    max_local_prefill_length: int = Field(default=0, ge=0)  # prompts computing at most this many tokens: on decode
    max_prefill_queue_size: int = Field(default=0, ge=0)    # every prefill worker this busy (or none up): on decode
    max_retries: int = Field(default=2, ge=0)        # on other workers after one fails; streamed tokens resume
    tool_call_parser: str | None = None              # reads tool_choice "auto" calls (tool_parsers.PARSERS); None: refused
    reasoning_parser: str | None = None              # splits the thinking from the answer (reasoning.PARSERS)
    responses_store_mb: int = Field(default=64, ge=0)  # stored Responses API answers without Redis (0: none, anywhere)
    responses_store_ttl_s: int = Field(default=86400, ge=1)  # how long Redis keeps a stored answer
    response_role: str = "assistant"                  # a chat answer's role where the prompt asks for a new message
    lora_modules: dict[str, str] = Field(default_factory=dict)  # LoRA adapters the workers load: name -> directory
    allow_runtime_lora_updating: bool = False         # serve /v1/load_lora_adapter and /v1/unload_lora_adapter
    lora_timeout_s: float = 60.0                      # deadline of one LoadLoRA / UnloadLoRA RPC
    dev_mode: bool = False                            # vLLM's dev mode: serve /reset_prefix_cache
    cache_reset_timeout_s: float = 30.0               # deadline of one ResetPrefixCache RPC
    chat_template: str | None = None                  # Jinja, in place of the model's own (vLLM's --chat-template)
    trust_request_chat_template: bool = False         # a request may bring its own chat_template (vLLM's flag)
    return_tokens_as_token_ids: bool = False          # log-probs name tokens "token_id:{id}" unless a request says
    enable_request_id_headers: bool = False           # responses carry X-Request-Id (vLLM's flag)
    enable_log_requests: bool = False                 # log each prompt and its parameters (vLLM's flag)
    enable_force_include_usage: bool = False          # every stream ends with a usage chunk (vLLM's flag)
    root_path: str = ""                               # the path prefix a proxy serves the gateway under (uvicorn's)
    disable_fastapi_docs: bool = False                # no /docs, /redoc, /openapi.json (vLLM's flag)
    disable_uvicorn_access_log: bool = False          # no line per HTTP request (vLLM's flag)
    max_log_len: int | None = Field(default=None, ge=0)  # of a logged prompt: characters and token ids (None: all)
    # vLLM's: sampling defaults from the model's generation_config.json ("auto"), none ("vllm") or a folder's,
    # and the values set on top of them
    generation_config: str = "auto"
    override_generation_config: dict[str, float | int | None] = Field(default_factory=dict)
    shutdown_timeout_s: float = 30.0                 # in-flight requests may finish within this after SIGTERM
    load_poll_interval_s: float = 0.5

    @property
    def tokenizer_dir(self) -> str:
        return self.tokenizer or self.model_dir

    @property
    def served_model_names(self) -> tuple[str, ...]:
        """Every name the model answers to, the one responses give first."""
        return (self.served_model_name, *self.served_model_aliases)

    @model_validator(mode="after")
    def _tls_pair(self) -> GatewayConfig:
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError("TLS needs both --ssl-keyfile and --ssl-certfile")
        return self
