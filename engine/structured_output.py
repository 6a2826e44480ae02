"""Structured output with xgrammar: a request's grammar (``StructuredOutputParams``) compiled
against the model's tokenizer, one matcher per sequence, and the mask each step applies.

A worker compiles a request's grammar before the engine takes the request
(``StructuredOutputs.compile``, off the engine thread: a large JSON schema can take a while);
xgrammar's compiler caches what it compiled, so creating the sequence's matcher finds it there.
The engine advances a sequence's ``Grammar`` over every token appended, wherever it was sampled
(a prefill worker's first token, a resumed request's earlier ones), and the sampler masks each
constrained row by its matcher's bitmask. The matcher ends the output: it is terminated once it
has accepted EOS where the grammar was complete. A reasoning model's grammar waits for the end
of its thinking (``StructuredOutputParams.reasoning_end``): until then it neither masks nor ends.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Sequence as Seq
from pathlib import Path

import torch
import xgrammar as xgr
from transformers import AutoTokenizer

from baton.engine.attention import to_device
from baton.engine.sampling_params import StructuredOutputParams

# Compiled grammars kept for reuse, evicted past this size: a server that meets a
# stream of distinct schemas must not grow without bound.
GRAMMAR_CACHE_BYTES = 512 << 20

# xgrammar's errors start with a timestamp and its C++ source position: not for the client.
_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\]\s+\S+:\d+:\s*")


def _message(exc: Exception) -> str:
    return _SOURCE_PREFIX.sub("", str(exc)).strip()


class StructuredOutputs:
    """Compiles grammars against the tokenizer of ``model_dir`` (loaded on first use) for logits
    of width ``vocab_size``; EOS (``eos_token_ids``) is what ends a complete grammar. Thread-safe."""

    def __init__(self, model_dir: Path | str, vocab_size: int, eos_token_ids: Seq[int]) -> None:
        self.model_dir = Path(model_dir)
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self._lock = threading.Lock()
        self._compiler: xgr.GrammarCompiler | None = None

    def _get_compiler(self) -> xgr.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
                info = xgr.TokenizerInfo.from_huggingface(
                    tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.eos_token_ids
                )
                self._compiler = xgr.GrammarCompiler(info, cache_limit_bytes=GRAMMAR_CACHE_BYTES)
            return self._compiler

    def compile(self, spec: StructuredOutputParams) -> xgr.CompiledGrammar:
        """The compiled grammar of ``spec`` (cached); ``ValueError`` naming what is wrong with it."""
        compiler = self._get_compiler()
        try:
            if spec.json is not None or spec.json_object:
                schema = spec.json if spec.json is not None else '{"type": "object"}'
                return compiler.compile_json_schema(schema, any_whitespace=not spec.disable_any_whitespace)
            if spec.regex is not None:
                return compiler.compile_regex(spec.regex)
            if spec.choice is not None:
                # A JSON string literal is also an EBNF one: the same escapes.
                return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in spec.choice))
            if spec.structural_tag is not None:
                return compiler.compile_structural_tag(_structural_tag(spec.structural_tag))
            return compiler.compile_grammar(spec.grammar)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"invalid structured output: {_message(exc)}") from exc

    def grammar(self, spec: StructuredOutputParams, accepted: Seq[int] = ()) -> Grammar:
        """A fresh ``Grammar`` for ``spec``, advanced over ``accepted`` (a resumed sequence's output
        so far); ``ValueError`` if the grammar rejects one of them."""
        grammar = Grammar(xgr.GrammarMatcher(self.compile(spec)), spec.reasoning_end)
        for i, token in enumerate(accepted):
            if not grammar.accept(token):
                raise ValueError(f"output token {i} ({token}) is not allowed by the structured output's grammar")
        return grammar


def _structural_tag(text: str) -> str:
    """A structural tag as xgrammar reads it: vLLM's older form (``structures`` of ``begin``, JSON
    ``schema`` and ``end``, and ``triggers``) becomes the ``triggered_tags`` format it stands for."""
    tag = json.loads(text)
    if not isinstance(tag, dict) or "structures" not in tag:
        return text
    try:
        tags = [{"begin": s["begin"], "content": {"type": "json_schema", "json_schema": s["schema"]}, "end": s["end"]}
                for s in tag["structures"]]
        triggers = tag["triggers"]
    except (KeyError, TypeError) as exc:
        raise ValueError("a structural tag's structures each need begin, schema and end, beside its triggers") from exc
    triggered = {"type": "triggered_tags", "triggers": triggers, "tags": tags}
    return json.dumps({"type": "structural_tag", "format": triggered})


class Grammar:
    """One sequence's structured output: its matcher, which binds once the output has written
    ``reasoning_end`` (at once if that is empty)."""

    def __init__(self, matcher: xgr.GrammarMatcher, reasoning_end: Seq[int] = ()) -> None:
        self.matcher = matcher
        self._reasoning_end = list(reasoning_end)
        self._recent: list[int] = []            # the output's last tokens, while the grammar waits
        self.binding = not reasoning_end        # False: still thinking, nothing masked

    def accept(self, token: int) -> bool:
        """Advance over the output's next token; False if the grammar does not allow it."""
        if self.binding:
            return self.matcher.accept_token(token)
        self._recent = (self._recent + [token])[-len(self._reasoning_end):]
        self.binding = self._recent == self._reasoning_end
        return True

    def is_terminated(self) -> bool:
        """Whether the grammar has ended the output (accepted EOS where it was complete)."""
        return self.binding and self.matcher.is_terminated()


def mask_logits(logits: torch.Tensor, grammars: Seq[Grammar | None]) -> None:
    """Set to -inf, in place, each row's logits of the tokens its grammar does not allow next
    (rows without a grammar, or whose grammar is not binding yet, are left alone). ``logits``:
    float32 ``[rows, vocab]``."""
    rows = [i for i, g in enumerate(grammars) if g is not None and g.binding]
    if not rows:
        return
    bitmask = xgr.allocate_token_bitmask(len(grammars), logits.shape[1])   # all allowed
    _batch_filler().batch_fill_next_token_bitmask([grammars[i].matcher for i in rows], bitmask, indices=rows)
    # Every row, the free ones' masks allowing all: row indices would reach the GPU from pageable
    # memory, and such a copy (the mask's too, so it goes pinned) waits for the step in flight.
    xgr.apply_token_bitmask_inplace(logits, to_device(bitmask, logits.device))


@functools.cache
def _batch_filler() -> xgr.BatchGrammarMatcher:
    """Fills a batch's bitmasks on a pool of threads (the GIL released)."""
    return xgr.BatchGrammarMatcher()
