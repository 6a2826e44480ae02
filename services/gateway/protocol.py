"""OpenAI API shapes: requests and responses of /v1/completions,
/v1/chat/completions (streaming chunks too) and /v1/models, and the error body; vLLM's
/score and /rerank.

Unknown request fields are ignored, like OpenAI; an explicit ``null`` means "the
default". Limits that depend on the deployment (``n`` against ``max_n``, lengths
against the context) are checked in ``serving.py``.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator, model_serializer,
    model_validator,
)

from baton.engine.chat_messages import template_message
from baton.engine.sampling_params import MAX_LOGIT_BIAS, StructuredOutputParams

INT32_MAX, UINT64_MAX = 2**31 - 1, 2**64 - 1   # what the workers' wire fields hold
MAX_STOP_STRINGS = 4
MAX_LOGIT_BIAS_TOKENS = 1024
MAX_BAD_WORDS = 128
MAX_EMBEDDING_INPUTS = 2048   # OpenAI's limit on inputs per embeddings request
MAX_CACHE_SALT_CHARS = 128    # vLLM's limit on a cache_salt
DONE = "[DONE]"               # the last event of a completion or chat completion stream


class APIError(Exception):
    """An error the client sees as HTTP ``status`` with OpenAI's error body."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.type = type
        self.code = code

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---- requests ---------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False
    continuous_usage_stats: bool = False   # vLLM's: every chunk carries the usage so far (with include_usage)


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")  # {}: any JSON value
    strict: bool | None = None


class StructuralTagItem(BaseModel):
    """One structure of vLLM's older structural tag: ``begin``, JSON following ``schema``, ``end``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    begin: str
    schema_: dict[str, Any] = Field(alias="schema")
    end: str


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: free text, any JSON object, or JSON following a schema; or
    vLLM's ``structural_tag``: xgrammar's ``format``, or the older ``structures`` and ``triggers``."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JSONSchemaFormat | None = None
    format: dict[str, Any] | None = None
    structures: list[StructuralTagItem] | None = None
    triggers: list[str] | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema")
        older = self.structures is not None and self.triggers is not None
        if self.type == "structural_tag" and (self.format is None) == (not older):
            raise ValueError("type 'structural_tag' needs a format, or structures and triggers")
        return self

    def structural_tag(self) -> str:
        """The structural tag, as JSON text (what vLLM's ``structured_outputs.structural_tag`` holds)."""
        fields = ("type", "format") if self.format is not None else ("type", "structures", "triggers")
        return json.dumps(self.model_dump(include=set(fields), by_alias=True))


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs``: one of ``json`` (a schema), ``json_object``, ``regex``,
    ``choice``, ``grammar`` (EBNF) or ``structural_tag`` (JSON text), and ``disable_any_whitespace``.
    Its other options are refused rather than ignored."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False

    @model_validator(mode="after")
    def _at_most_one_kind(self) -> StructuredOutputs:
        if self.has_kind:
            self.params()
        return self

    @property
    def has_kind(self) -> bool:
        kinds = (self.json_, self.regex, self.choice, self.grammar, self.structural_tag)
        return any(v is not None for v in kinds) or bool(self.json_object)

    def params(self) -> StructuredOutputParams:
        """The grammar; ``ValueError`` unless exactly one kind is given."""
        return StructuredOutputParams(
            json=self.json_, json_object=bool(self.json_object), regex=self.regex, choice=self.choice, grammar=self.grammar,
            structural_tag=self.structural_tag, disable_any_whitespace=self.disable_any_whitespace,
        )


def _check_cache_salt(value: str | None) -> str | None:
    """vLLM's rule for ``cache_salt``: absent, or a non-empty string of at most 128 characters
    without '@', '/', '\\' or NUL; and text that UTF-8 can carry (no lone surrogate), as the
    workers' wire and the block hashes need."""
    if value is None:
        return value
    if not value:
        raise ValueError("must be a non-empty string if provided")
    if len(value) > MAX_CACHE_SALT_CHARS or any(c in "@/\\\x00" for c in value):
        raise ValueError(f"must be at most {MAX_CACHE_SALT_CHARS} characters and must not contain '@', '/', '\\' or NUL")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from exc
    return value


# vLLM's: the prefix cache is salted with it, so a request reuses only blocks computed under the same
# salt (a tenant's prompts cannot be guessed from another's cache hits).
CacheSalt = Annotated[str | None, AfterValidator(_check_cache_salt)]


class NullMeansDefault(BaseModel):
    """A request whose fields sent as null take their defaults (as OpenAI's clients send them)."""

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


# vLLM's older request fields for structured output, each read as the structured_outputs field it became.
LEGACY_STRUCTURED_OUTPUTS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                             "guided_grammar": "grammar", "structural_tag": "structural_tag"}


# vLLM's request_id: names a request's response, and its sequences on the workers with a random
# suffix (requests in flight at once may share it); printable ASCII, so it reads the same in every log.
RequestId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[!-~]+$")]
# vLLM's truncate_prompt_tokens: keep only the prompt's last k tokens; -1, as many as the context
# leaves room for; 0, as in vLLM, all of them (``request_checks.truncated_prompt``).
TruncatePromptTokens = Annotated[int | None, Field(ge=-1)]


class BaseGenerationRequest(NullMeansDefault):
    """Parameters shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None      # None: the served model (vLLM's)
    request_id: RequestId | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1, le=INT32_MAX)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    seed: int | None = Field(default=None, ge=0, le=UINT64_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)     # each checked against the vocabulary in serving
    n: int = Field(default=1, ge=1)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # vLLM's extras
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    truncate_prompt_tokens: TruncatePromptTokens = None
    allowed_token_ids: list[int] | None = Field(default=None, min_length=1)   # vLLM's: only these may be sampled
    bad_words: list[str] = Field(default_factory=list, max_length=MAX_BAD_WORDS)   # vLLM's: words never written
    priority: int = Field(default=0, ge=-INT32_MAX - 1, le=INT32_MAX)   # vLLM's: lower first (--scheduling-policy priority)
    prompt_logprobs: int | None = Field(default=None, ge=-1)   # vLLM's: top-k per prompt token; -1: all
    return_tokens_as_token_ids: bool | None = None   # vLLM's: log-probs name tokens "token_id:{id}" (None: the gateway's)
    return_token_ids: bool = False  # vLLM's: the prompt's and each choice's token ids beside the text
    cache_salt: CacheSalt = None
    use_beam_search: bool = False   # vLLM's: the n likeliest sequences by beam search (beam_search.py)
    length_penalty: float = 1.0     # vLLM's: a beam's score is its log-prob / its length ** length_penalty
    # vLLM's structured-output fields before v0.12, which since ignores them (a client still sending
    # them gets free text, no error): read as the structured_outputs fields they became
    # (LEGACY_STRUCTURED_OUTPUTS). guided_decoding_backend, which chose the compiler, is ignored
    # (xgrammar compiles every grammar).
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(default=None, min_length=1)
    guided_grammar: str | None = None
    structural_tag: str | None = None
    guided_whitespace_pattern: str | None = None
    logits_processors: list[Any] | None = None   # vLLM's, behind its --logits-processor-pattern: refused here

    @field_validator("logits_processors")
    @classmethod
    def _refuse_logits_processors(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("not supported: Baton loads no logits processor a request names")
        return value

    @field_validator("guided_whitespace_pattern")
    @classmethod
    def _refuse_whitespace_pattern(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError("not supported (xgrammar takes no whitespace pattern); "
                             "structured_outputs.disable_any_whitespace writes JSON compactly")
        return value

    @model_validator(mode="after")
    def _one_structured_output(self) -> BaseGenerationRequest:
        given = [name for name in LEGACY_STRUCTURED_OUTPUTS if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of {', '.join(LEGACY_STRUCTURED_OUTPUTS)}, got {', '.join(given)}")
        if given:
            if self.structured_outputs is not None and self.structured_outputs.has_kind:
                raise ValueError(f"give the output's structure in structured_outputs or in {given[0]}, not both")
            compact = self.structured_outputs is not None and self.structured_outputs.disable_any_whitespace
            self.structured_outputs = StructuredOutputs.model_validate(
                {LEGACY_STRUCTURED_OUTPUTS[given[0]]: getattr(self, given[0]), "disable_any_whitespace": compact})
        if self.structured_outputs is not None and self.structured_outputs.has_kind and self.response_format is not None \
                and self.response_format.type != "text":
            raise ValueError("give the output's structure in response_format or in structured_outputs "
                             f"({', '.join(LEGACY_STRUCTURED_OUTPUTS)}), not both")
        return self

    @property
    def structured_output(self) -> StructuredOutputParams | None:
        """The grammar the output must follow, from ``response_format`` (OpenAI) or
        ``structured_outputs`` (vLLM; its ``disable_any_whitespace`` also applies to the former)."""
        compact = self.structured_outputs is not None and self.structured_outputs.disable_any_whitespace
        if self.structured_outputs is not None and self.structured_outputs.has_kind:
            return self.structured_outputs.params()
        if self.response_format is None or self.response_format.type == "text":
            return None
        if self.response_format.type == "json_object":
            return StructuredOutputParams(json_object=True, disable_any_whitespace=compact)
        if self.response_format.type == "structural_tag":
            return StructuredOutputParams(structural_tag=self.response_format.structural_tag(),
                                          disable_any_whitespace=compact)
        return StructuredOutputParams(json=self.response_format.json_schema.schema_, disable_any_whitespace=compact)

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_a_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and value.model_fields_set and not info.data.get("stream"):   # as OpenAI and vLLM answer
            raise ValueError("stream_options can only be given when stream is true")
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return value

    @field_validator("prompt_logprobs")
    @classmethod
    def _check_prompt_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and info.data.get("stream"):   # as vLLM: a stream has no place for them (0 asks for none)
            raise ValueError("prompt_logprobs are not available when stream is true")
        return value

    @field_validator("bad_words")
    @classmethod
    def _check_bad_words(cls, value: list[str]) -> list[str]:
        if any(not word.strip() for word in value):
            raise ValueError("a bad word must hold more than whitespace")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return value
        if len(value) > MAX_LOGIT_BIAS_TOKENS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS_TOKENS} tokens may be biased")
        for key, bias in value.items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"the bias of token {key} must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias:g}")
        return value

    @property
    def token_logit_bias(self) -> dict[int, float]:
        return {int(key): bias for key, bias in (self.logit_bias or {}).items()}

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and self.stream_options.continuous_usage_stats

    @property
    def prompt_only(self) -> bool:
        """Whether the answer leaves each choice's output out (``CompletionRequest.prompt_only``)."""
        return False


class CompletionRequest(BaseGenerationRequest):
    prompt_embeds: Any = None   # vLLM's (behind --enable-prompt-embeds): refused, checked before the prompt
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)   # 0, with echo: the prompt alone, scored (``prompt_only``)
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None
    add_special_tokens: bool = True   # vLLM's: the tokenizer's special tokens (the BOS) around each text prompt

    @field_validator("best_of")
    @classmethod
    def _check_best_of(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise ValueError(f"best_of must equal n (no server-side ranking of samples), got {value}")
        return value

    @model_validator(mode="after")
    def _prompt_only_with_echo(self) -> CompletionRequest:
        if self.max_tokens == 0 and not (self.echo and not self.use_beam_search):
            raise ValueError("max_tokens 0 returns the prompt alone: it needs echo (and no beam search)")
        return self

    @property
    def prompt_only(self) -> bool:
        """``echo`` with ``max_tokens`` 0 (OpenAI's older API, vLLM's): the prompt's text and, with
        ``logprobs``, its tokens' log-probs, nothing generated. The workers generate one token, which
        the answer leaves out."""
        return self.echo and self.max_tokens == 0

    @field_validator("prompt_embeds")
    @classmethod
    def _refuse_prompt_embeds(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("not supported: send the prompt as text or token ids (Baton loads no tensor a client sends)")

    @field_validator("suffix")
    @classmethod
    def _check_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("a suffix (insertion) is not supported")
        return value

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str | list[int] | list[str] | list[list[int]]) -> Any:
        if isinstance(value, list) and (not value or any(isinstance(p, list) and not p for p in value)):
            raise ValueError("a prompt must not be an empty list")
        return value


class TextContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str                  # JSON text


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None     # an assistant's earlier calls
    tool_call_id: str | None = None              # a tool's result: which call it answers

    def template_dict(self) -> dict[str, Any]:
        """The message as the chat template sees it (``template_message``: text parts joined by
        newlines, a tool call's arguments as an object where they are JSON)."""
        return template_message(self.model_dump(exclude_none=True))


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None     # a JSON schema of the arguments; None: no arguments
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDefinition


def _template_tools(tools: list[Tool] | None) -> list[dict[str, Any]] | None:
    """Tools as a chat template sees them (as transformers hands them over)."""
    return [t.model_dump(exclude_none=True) for t in tools] if tools else None


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: NamedFunction


class ChatTemplateOptions(BaseModel):
    """How chat messages go through the template, as vLLM takes them. That the last message is
    the assistant's, for ``continue_final_message``, is checked where they are rendered."""

    model_config = ConfigDict(extra="ignore")
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None   # vLLM's: the request's own Jinja template (--trust-request-chat-template)
    documents: list[dict[str, str]] | None = None   # vLLM's: for a RAG model's template, as transformers hands them

    @field_validator("continue_final_message")
    @classmethod
    def _check_continue_final_message(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("add_generation_prompt", True):
            raise ValueError("continue_final_message needs add_generation_prompt to be false")
        return value


class ChatCompletionRequest(BaseGenerationRequest, ChatTemplateOptions):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=-1)   # -1: the whole vocabulary (vLLM's)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    tools: list[Tool] | None = None
    parallel_tool_calls: bool = True
    functions: list[dict[str, Any]] | None = None
    echo: bool = False      # vLLM's: the answer starts with the last message's text (``echoed``)
    add_special_tokens: bool = False   # vLLM's: the tokenizer's special tokens too, around the template's text
    include_reasoning: bool = True     # vLLM's: false leaves a reasoning parser's thinking out of the answer

    @field_validator("tools")
    @classmethod
    def _check_tools(cls, value: list[Tool] | None, info: ValidationInfo) -> list[Tool] | None:
        choice = info.data.get("tool_choice")
        if value and isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in value}:
            raise ValueError(f"tool_choice names function {choice.function.name!r}, which is not among the tools")
        return value

    @model_validator(mode="after")
    def _tools_for_forced_choice(self) -> ChatCompletionRequest:
        if self.forced_tools and not self.tools:
            raise ValueError("tool_choice 'required' or a named function needs tools")
        if self.forced_tools and super().structured_output is not None:
            raise ValueError("a forced tool_choice already fixes the output's structure: "
                             "give no response_format or structured_outputs with it")
        return self

    @property
    def forced_tools(self) -> bool:
        """Whether the output must be tool calls: ``tool_choice`` is 'required' or names a function."""
        return self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)

    def answer_role(self, response_role: str) -> str:
        """The answer's role, as vLLM gives it: ``response_role`` (``--response-role``) where the
        prompt asks for a new message, else the last message's, which the answer continues."""
        return response_role if self.add_generation_prompt else self.messages[-1].role

    def echoed(self, role: str) -> str:
        """What vLLM's ``echo`` puts before the answer: the last message's text where that message
        is in the answer's ``role``."""
        last = self.messages[-1]
        return last.template_dict()["content"] if self.echo and last.role == role else ""

    @property
    def auto_tools(self) -> bool:
        """Whether the model may call the tools or answer (``tool_choice`` 'auto', the default with tools)."""
        return bool(self.tools) and self.tool_choice in (None, "auto")

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as the chat template sees them (none with tool_choice 'none')."""
        return None if self.tool_choice == "none" else _template_tools(self.tools)

    @field_validator("functions")
    @classmethod
    def _check_functions(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if value:
            raise ValueError("function calling is not supported")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _check_top_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return value

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(ChatTemplateOptions):
    """``/tokenize`` (as vLLM has it): a prompt, or chat messages through the template."""

    model: str | None = None      # None: the served model (vLLM's)
    prompt: str | None = None
    add_special_tokens: bool | None = None   # vLLM's: None adds a prompt's special tokens, not the messages'
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None          # rendered with the messages, as a chat request's would be
    return_token_strs: bool = False          # vLLM's: each token's vocabulary entry too

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        return _template_tools(self.tools)

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either a prompt or messages")
        return self


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request, with vLLM's ``truncate_prompt_tokens``, ``add_special_tokens``,
    ``priority`` and ``cache_salt``."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None      # None: the served model (vLLM's)
    request_id: RequestId | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: TruncatePromptTokens = None
    add_special_tokens: bool = True   # vLLM's: the tokenizer's special tokens around each text input
    priority: int = Field(default=0, ge=-INT32_MAX - 1, le=INT32_MAX)
    cache_salt: CacheSalt = None

    @field_validator("input")
    @classmethod
    def _check_input(cls, value: str | list) -> str | list:
        inputs = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else value
        if not inputs or any(len(i) == 0 for i in inputs):
            raise ValueError("input must be a non-empty string or token list, or a non-empty list of them")
        _check_embedding_count(len(inputs), "inputs")
        return value

    @field_validator("dimensions")
    @classmethod
    def _check_dimensions(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError("dimensions (a shortened embedding) is not supported: the full embedding is returned")
        return value


def _check_embedding_count(count: int, what: str, limit: int = MAX_EMBEDDING_INPUTS) -> None:
    """One request embeds at most ``MAX_EMBEDDING_INPUTS`` texts, whichever route it comes by."""
    if count > limit:
        raise ValueError(f"at most {limit} {what}, got {count}")


def _texts(value: str | list[str], name: str) -> list[str]:
    """A text or a list of texts, as a list; refused where there is none or one is empty."""
    texts = [value] if isinstance(value, str) else value
    if not texts or any(not t for t in texts):
        raise ValueError(f"{name} must hold at least one text, and no empty one")
    return texts


class ScoringRequest(NullMeansDefault):
    """What vLLM's score and rerank requests share: the model (the served one where left out, as
    vLLM takes it), and ``truncate_prompt_tokens``, ``priority`` and ``cache_salt`` as an embeddings
    request has them."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    truncate_prompt_tokens: TruncatePromptTokens = None
    priority: int = Field(default=0, ge=-INT32_MAX - 1, le=INT32_MAX)
    cache_salt: CacheSalt = None


class ScoreRequest(ScoringRequest):
    """vLLM's score request: each ``text_1`` scored against its ``text_2``, paired 1:1, 1:N (one
    ``text_1`` against each ``text_2``) or N:N (the i-th with the i-th). With an embedding model a
    pair's score is the cosine similarity of the two texts' embeddings. Both become lists once
    validated."""

    text_1: str | list[str]
    text_2: str | list[str]

    @field_validator("text_1")
    @classmethod
    def _check_text_1(cls, value: str | list[str]) -> list[str]:
        return _texts(value, "text_1")

    @field_validator("text_2")
    @classmethod
    def _check_text_2(cls, value: str | list[str], info: ValidationInfo) -> list[str]:
        second = _texts(value, "text_2")
        first = info.data.get("text_1")
        if first is not None:
            if len(first) not in (1, len(second)):
                raise ValueError(f"text_1 and text_2 pair 1:1, 1:N or N:N; got {len(first)} and {len(second)} texts")
            _check_embedding_count(len(first) + len(second), "texts in text_1 and text_2 together")
        return second


class RerankRequest(ScoringRequest):
    """vLLM's rerank request (Jina's and Cohere's shape): the ``documents`` ranked by their
    relevance to the ``query``, the ``top_n`` first (0: all of them), each with its text unless
    ``return_documents`` is false."""

    query: str = Field(min_length=1)
    documents: list[str]
    top_n: int = Field(default=0, ge=0)
    return_documents: bool = True

    @field_validator("documents")
    @classmethod
    def _check_documents(cls, value: list[str]) -> list[str]:
        _check_embedding_count(len(_texts(value, "documents")), "documents (the query is embedded too)",
                               MAX_EMBEDDING_INPUTS - 1)
        return value


class ResponseInputText(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["input_text", "output_text"]
    text: str


class ResponseInputMessage(BaseModel):
    """An input item of the Responses API: a message (other item kinds are refused)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ResponseInputText]

    def chat_message(self) -> ChatMessage:
        if isinstance(self.content, str):
            return ChatMessage(role=self.role, content=self.content)
        return ChatMessage(role=self.role, content=[TextContentPart(type="text", text=p.text) for p in self.content])


class ResponseFunctionCallItem(BaseModel):
    """An input item: a call the model made earlier (an assistant message's tool call)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class ResponseFunctionCallOutputItem(BaseModel):
    """An input item: a call's result (a tool message)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["function_call_output"]
    call_id: str
    output: str


InputItem = ResponseInputMessage | ResponseFunctionCallItem | ResponseFunctionCallOutputItem


class ResponseFunctionTool(BaseModel):
    """A Responses API tool: a function, named at the top level (chat nests it in ``function``)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def chat_tool(self) -> Tool:
        return Tool(type="function", function=FunctionDefinition(name=self.name, description=self.description,
                                                                 parameters=self.parameters, strict=self.strict))


class ResponseNamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    name: str


class ResponseTextFormat(BaseModel):
    """``text.format``: plain text, any JSON object, or JSON that follows ``schema`` (written back
    as given: ``schema`` by its name, unset fields left out)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, serialize_by_alias=True)
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = Field(default=None, min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}

    @model_validator(mode="after")
    def _schema_has_a_name(self) -> ResponseTextFormat:
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("a json_schema format needs a name and a schema")
        return self


class ResponseText(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: ResponseTextFormat = Field(default_factory=ResponseTextFormat)


class ResponsesRequest(NullMeansDefault):
    """OpenAI's Responses API request: text or JSON out, and function calls (``tools``,
    ``tool_choice``; earlier calls and their outputs as input items), as the chat completions
    have them. ``store`` keeps the answer for a later request to go on from (``previous_response_id``;
    ``response_store``); ``background`` is refused."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None      # None: the served model (vLLM's)
    input: str | list[InputItem] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    store: bool = True
    text: ResponseText = Field(default_factory=ResponseText)
    metadata: dict[str, str] | None = None
    user: str | None = None
    previous_response_id: str | None = None
    background: bool = False
    tools: list[ResponseFunctionTool] = Field(default_factory=list)
    tool_choice: Literal["none", "auto", "required"] | ResponseNamedToolChoice | None = None
    parallel_tool_calls: bool = True
    cache_salt: CacheSalt = None     # vLLM's, as a chat completion takes it
    # "auto": a prompt past the context loses its first tokens (vLLM's reading: truncate_prompt_tokens
    # -1; OpenAI drops whole items from the conversation's middle instead); "disabled": a 400.
    truncation: Literal["auto", "disabled"] = "disabled"
    # What else the output carries: "message.output_text.logprobs" (each token's log-prob and its
    # top_logprobs alternatives) is honoured; the rest name what Baton never makes (encrypted
    # reasoning, tools' results) and add nothing.
    include: list[str] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @field_validator("background")
    @classmethod
    def _no_background(cls, value: bool) -> bool:
        if value:
            raise ValueError("background responses are not supported")
        return value

    def input_items(self) -> list[InputItem]:
        """The input as items (text is a user message)."""
        return [ResponseInputMessage(role="user", content=self.input)] if isinstance(self.input, str) else list(self.input)

    def chat_request(self) -> ChatCompletionRequest:
        """The chat completion this response is: the instructions as a system message first."""
        messages = [ChatMessage(role="system", content=self.instructions)] if self.instructions is not None else []
        for item in self.input_items():
            if isinstance(item, ResponseInputMessage):
                messages.append(item.chat_message())
            elif isinstance(item, ResponseFunctionCallOutputItem):
                messages.append(ChatMessage(role="tool", tool_call_id=item.call_id, content=item.output))
            else:   # consecutive calls are one assistant message's
                call = ToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
                if messages and messages[-1].role == "assistant" and messages[-1].tool_calls and not messages[-1].content:
                    messages[-1].tool_calls.append(call)
                else:
                    messages.append(ChatMessage(role="assistant", tool_calls=[call]))
        tool_choice = self.tool_choice
        if isinstance(tool_choice, ResponseNamedToolChoice):
            tool_choice = NamedToolChoice(type="function", function=NamedFunction(name=tool_choice.name))
        fmt = self.text.format
        response_format = None
        if fmt.type == "json_object":
            response_format = ResponseFormat(type="json_object")
        elif fmt.type == "json_schema":
            response_format = ResponseFormat(type="json_schema", json_schema=JSONSchemaFormat(
                name=fmt.name, description=fmt.description, schema=fmt.schema_, strict=fmt.strict))
        return ChatCompletionRequest(
            model=self.model, messages=messages, max_completion_tokens=self.max_output_tokens, temperature=self.temperature,
            top_p=self.top_p, stream=self.stream, stream_options=StreamOptions(include_usage=True) if self.stream else None,
            response_format=response_format, user=self.user, tools=[t.chat_tool() for t in self.tools] or None,
            tool_choice=tool_choice, parallel_tool_calls=self.parallel_tool_calls, cache_salt=self.cache_salt,
            truncate_prompt_tokens=-1 if self.truncation == "auto" else None,
            logprobs=self.wants_logprobs, top_logprobs=(self.top_logprobs or 0) if self.wants_logprobs else None,
        )

    @property
    def wants_logprobs(self) -> bool:
        """Whether the output text carries its tokens' log-probs (``include``, as OpenAI asks for them)."""
        return "message.output_text.logprobs" in (self.include or ())


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None      # None: the served model (vLLM's)
    tokens: list[int]


class LoadLoRAAdapterRequest(BaseModel):
    """vLLM's ``/v1/load_lora_adapter``: an adapter's name and its directory where the workers run
    (``lora_int_id`` is accepted and ignored, as vLLM ignores it)."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)
    lora_int_id: int | None = None


class UnloadLoRAAdapterRequest(BaseModel):
    """vLLM's ``/v1/unload_lora_adapter``."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = None


# ---- responses --------------------------------------------------------------


def _now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's ``Logprob``: one token of a prompt position's ``prompt_logprobs`` entry."""

    logprob: float
    rank: int | None = None           # 1 = the most likely token
    decoded_token: str | None = None


PromptLogprobs = list[dict[str, PromptLogprob] | None]   # per prompt token (the first: None), keyed by token id


def _unless_null(data: dict[str, Any], *keys: str) -> dict[str, Any]:
    """``data`` without those of ``keys`` that are null: extra fields only those who asked for them see."""
    return {k: v for k, v in data.items() if k not in keys or v is not None}


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None    # vLLM's: the stop string or stop token id that ended it
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None   # return_token_ids (vLLM's; a stream: a choice's first chunk)
    token_ids: list[int] | None = None          # return_token_ids: the choice's (a stream: the chunk's)

    @model_serializer(mode="wrap")
    def _extras_if_asked(self, handler: Any) -> dict[str, Any]:
        return _unless_null(handler(self), "prompt_logprobs", "prompt_token_ids", "token_ids")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobToken] | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"                 # --response-role, or the continued message's
    content: str | None = None
    reasoning: str | None = None           # a reasoning model's thinking (--reasoning-parser), as vLLM names it
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None    # as CompletionChoice's
    token_ids: list[int] | None = None      # as CompletionChoice's

    @model_serializer(mode="wrap")
    def _token_ids_if_asked(self, handler: Any) -> dict[str, Any]:
        return _unless_null(handler(self), "token_ids")


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None   # return_token_ids (vLLM's)

    @model_serializer(mode="wrap")
    def _extras_if_asked(self, handler: Any) -> dict[str, Any]:
        return _unless_null(handler(self), "prompt_logprobs", "prompt_token_ids")


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaToolCall(BaseModel):
    """A streamed piece of a tool call: the first names it, the rest add to its arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None    # with finish_reason: as CompletionChoice's
    token_ids: list[int] | None = None      # return_token_ids (vLLM's): the chunk's

    @model_serializer(mode="wrap")
    def _token_ids_if_asked(self, handler: Any) -> dict[str, Any]:
        return _unless_null(handler(self), "token_ids")


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None   # return_token_ids (vLLM's): on a choice's first chunk

    @model_serializer(mode="wrap")
    def _prompt_token_ids_if_asked(self, handler: Any) -> dict[str, Any]:
        return _unless_null(handler(self), "prompt_token_ids")


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str           # base64: the float32 values, little-endian


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=_now)
    model: str
    data: list[ScoreData]
    usage: EmbeddingUsage


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    document: RerankDocument | None = None     # left out where the request's return_documents is false
    relevance_score: float

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class RerankUsage(BaseModel):
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[ChatLogprobToken] = Field(default_factory=list)   # with include's "message.output_text.logprobs"


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class OutputReasoning(BaseModel):
    type: Literal["reasoning"] = "reasoning"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningText]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(BaseModel):
    """A Responses API response, as OpenAI's clients read it."""

    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=_now)
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    incomplete_details: IncompleteDetails | None = None
    error: dict[str, Any] | None = None
    model: str
    instructions: str | None = None
    output: list[OutputReasoning | OutputMessage | OutputFunctionCall] = Field(default_factory=list)
    max_output_tokens: int | None = None
    temperature: float
    top_p: float
    text: ResponseText
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool = True
    tool_choice: Literal["none", "auto", "required"] | ResponseNamedToolChoice = "auto"
    tools: list[ResponseFunctionTool] = Field(default_factory=list)
    store: bool = False
    previous_response_id: str | None = None
    user: str | None = None
    truncation: Literal["auto", "disabled"] = "disabled"
    top_logprobs: int | None = None
    usage: ResponseUsage | None = None


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None      # with return_token_strs (vLLM's)


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "baton"
    root: str | None = None          # the model's directory (an adapter's, for a LoRA adapter)
    parent: str | None = None        # a LoRA adapter's base model
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
