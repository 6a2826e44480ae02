"""Per-request sampling settings, validated on construction."""

from __future__ import annotations

import enum
import json as json_text
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field, replace
from typing import Any

DEFAULT_MAX_LOGPROBS = 20  # vLLM's --max-logprobs default: the most log-probs a request may ask for
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value: [-100, 100]
KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")   # what a structured output may be


@dataclass(frozen=True)
class StructuredOutputParams:
    """Constrain the output to a grammar: exactly one of ``json`` (a JSON schema, as JSON
    text), ``json_object`` (any JSON object), ``regex``, ``choice`` (exactly one of these
    strings), ``grammar`` (EBNF, as xgrammar reads it) or ``structural_tag`` (vLLM's, as JSON
    text: free text in which each trigger starts one of the tagged structures; xgrammar's
    ``{"type": "structural_tag", "format": ...}``, or vLLM's older ``{"structures": [{"begin",
    "schema", "end"}], "triggers": [...]}``). The output ends, with EOS, where
    the grammar is complete and admits nothing more. JSON may hold any whitespace between
    its tokens unless ``disable_any_whitespace`` (vLLM's option of that name): then it is
    written compactly, which spares a small model loops of blank lines. ``engine/structured_output.py``
    compiles it; this class only holds it (hashable: compiled grammars are cached by it).

    ``reasoning_end``: for a reasoning model, the tokens that end its thinking (``</think>``);
    the grammar binds only the output after their first appearance, so the thinking before
    it is free (as vLLM and SGLang do with a reasoning parser). Empty: from the first token.

    As vLLM's ``StructuredOutputsParams`` (also importable by that name), ``json`` may be the
    schema itself (a dict) and ``choice`` a list: they are kept as JSON text and a tuple."""

    json: str | dict | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False
    reasoning_end: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):
            object.__setattr__(self, "json", json_text.dumps(self.json))
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [name for name in KINDS if name != "json_object" and getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"structured output takes exactly one of {', '.join(KINDS)}, got {given or 'none'}")
        if self.choice is not None and not self.choice:
            raise ValueError("structured output's choice needs at least one string")
        if any(not isinstance(t, int) or t < 0 for t in self.reasoning_end):
            raise ValueError("structured output's reasoning_end must be token ids")


StructuredOutputsParams = StructuredOutputParams   # vLLM's name


class RequestOutputKind(enum.Enum):
    """vLLM's: what a streaming engine hands back for a request as it runs (everything so far, the
    new part, or only the finished output). The offline ``LLM`` returns finished requests alone,
    so every kind reads as ``FINAL_ONLY`` there, as vLLM's ``LLM`` sets it."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    """What to generate and how. ``temperature == 0`` is greedy.

    ``seed`` makes sampling reproducible whatever the batch: the token at output
    index ``t`` is drawn with noise keyed by ``(seed, t)`` (see ``sampler``).
    ``logprobs`` / ``prompt_logprobs``: ``None`` = off, ``k`` = the chosen token
    plus its top-``k`` alternatives, -1 = the whole vocabulary (vLLM's; the engine reads it as its
    vocabulary's size, ``with_vocabulary``). ``logit_bias`` maps token ids to what is added to
    their logits before sampling (ids beyond the vocabulary are ignored).
    ``structured_output`` masks, each step, the tokens its grammar does not allow next
    (``structured_outputs=`` is taken too, vLLM's name for it).
    ``allowed_token_ids`` (vLLM's option): only these may be sampled (None: any).
    ``bad_words_token_ids``: token sequences the text may not gain: a sequence's last token is
    masked wherever the tokens before it (prompt and output) end with the rest of it. ``bad_words``
    (vLLM's): words as text, which the offline ``LLM`` and the gateway (a request's own) turn into
    such sequences (``bad_word_sequences``) before a request goes on.
    ``stop``: strings that end the text where it first holds one (cut before it, unless
    ``include_stop_str_in_output``). The offline ``LLM`` applies them, as it detokenizes; the
    gateway applies a request's own, so neither field goes to the workers. Nor do
    ``skip_special_tokens`` (vLLM's: the offline ``LLM``'s text leaves special tokens out, as the
    gateway does by a request's own field), ``detokenize`` (vLLM's: false leaves the offline
    ``LLM``'s samples without text, their tokens alone) and ``truncate_prompt_tokens`` (vLLM's: the prompt's
    last k tokens kept, as the offline ``LLM`` and the gateway read it before a request goes on:
    ``request_checks.truncated_prompt``).
    vLLM's ``spaces_between_special_tokens``, ``output_kind`` and ``extra_args`` are taken and change
    nothing, as in vLLM's offline ``LLM``: the first acts only in slow tokenizers' decoding (Baton's are
    fast ones), the second is set to ``FINAL_ONLY`` there, and the third is for out-of-tree sampling
    code, which Baton does not load (it stays on the params as given).
    """

    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    structured_output: StructuredOutputParams | None = None
    allowed_token_ids: list[int] | None = None
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    bad_words: list[str] = field(default_factory=list)
    skip_special_tokens: bool = True
    detokenize: bool = True
    truncate_prompt_tokens: int | None = None
    spaces_between_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    extra_args: dict[str, Any] | None = None
    structured_outputs: InitVar[StructuredOutputParams | None] = None

    def __post_init__(self, structured_outputs: StructuredOutputParams | None) -> None:
        if structured_outputs is not None:
            if self.structured_output is not None:
                raise ValueError("give structured_output or structured_outputs (vLLM's name for it), not both")
            self.structured_output = structured_outputs
        if isinstance(self.stop, str):     # vLLM takes one string too
            self.stop = [self.stop]
        checks = [
            (self.n >= 1, f"n must be at least 1, got {self.n}"),
            (self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            (0 <= self.min_tokens <= self.max_tokens, f"min_tokens must be in [0, max_tokens], got {self.min_tokens}"),
            (self.temperature >= 0, f"temperature must be non-negative, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= -1, f"top_k must be -1, 0 (off) or positive, got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be positive, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.seed is None or self.seed >= 0, f"seed must be non-negative, got {self.seed}"),
            (self.logprobs is None or self.logprobs >= -1, f"logprobs must be -1 (all) or more, got {self.logprobs}"),
            (
                self.prompt_logprobs is None or self.prompt_logprobs >= -1,
                f"prompt_logprobs must be -1 (all) or more, got {self.prompt_logprobs}",
            ),
            (all(t >= 0 for t in self.logit_bias), "logit_bias token ids must be non-negative"),
            (
                all(-MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS for b in self.logit_bias.values()),
                f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]",
            ),
            (
                self.allowed_token_ids is None or (self.allowed_token_ids and min(self.allowed_token_ids) >= 0),
                "allowed_token_ids must be a non-empty list of token ids",
            ),
            (
                all(word and min(word) >= 0 for word in self.bad_words_token_ids),
                "each of bad_words_token_ids must be a non-empty list of token ids",
            ),
            (
                self.allowed_token_ids is None
                or not set(self.allowed_token_ids) <= {w[0] for w in self.bad_words_token_ids if len(w) == 1},
                "every one of allowed_token_ids is a bad word: nothing would be left to sample",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "each of stop must be a non-empty string"),
            (all(isinstance(w, str) and w.strip() for w in self.bad_words), "each of bad_words must hold more than whitespace"),
            (self.detokenize or not self.stop, "stop strings need detokenize: they are found in the text"),
            (
                self.truncate_prompt_tokens is None or self.truncate_prompt_tokens >= -1,
                f"truncate_prompt_tokens must be -1 or more, got {self.truncate_prompt_tokens}",
            ),
            (
                # A complete grammar allows only EOS, which min_tokens would mask: nothing would be left.
                self.structured_output is None or self.min_tokens == 0,
                "min_tokens cannot be combined with structured output",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_vocabulary(self, vocab_size: int) -> SamplingParams:
        """These params with log-probs of -1 (the whole vocabulary) as ``vocab_size`` of them."""
        whole = {name: vocab_size for name in ("logprobs", "prompt_logprobs") if getattr(self, name) == -1}
        return replace(self, **whole) if whole else self


def bad_word_sequences(words: list[str], encode: Callable[[str], list[int]]) -> list[list[int]]:
    """Each bad word's tokens (``encode``: text to token ids, no special tokens) as it would start
    the text and as it would follow a space, as vLLM bans them."""
    sequences: list[list[int]] = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = encode(text)
            if ids not in sequences:
                sequences.append(ids)
    return sequences
