"""Offline entry point: prefill and decode in one process (aggregated).

    llm = LLM("../shared/models/shakespeare-llama-5m")
    out = llm.generate(["JULIET:\\nO Romeo"], SamplingParams(temperature=0, max_tokens=16))
    print(out[0].outputs[0].text)

Without params, ``generate`` samples with ``get_default_sampling_params()``: the model's
``generation_config.json`` defaults, as vLLM applies them (``generation_config="auto"``; ``"vllm"``
reads none, a folder that folder's file), with ``override_generation_config`` on top:

    llm = LLM(model, override_generation_config={"temperature": 0, "max_new_tokens": 32})
    llm.generate(prompts)                              # greedy, 32 tokens at most

LoRA adapters (PEFT directories) load at start, or later between ``generate`` calls, and a
request names one by its name:

    llm = LLM(model, lora_modules={"sonnets": "/path/to/adapter"}, max_lora_rank=16)
    llm.generate(prompts, params, lora="sonnets")     # or one name (or None) per prompt
    llm.generate(prompts, params, lora_request=LoRARequest("sql", 1, "/path"))  # vLLM's: loaded on first use
    llm.unload_lora("sonnets")
    llm.load_lora("sql", "/path/to/other/adapter")

``llm.reset_prefix_cache()`` (vLLM's) drops every cached block between ``generate`` calls: the next
prompts are computed afresh (a cold-cache benchmark, or after something that invalidates cached KV).

``llm.beam_search(prompts, BeamSearchParams(beam_width=4, max_tokens=32))`` gives each prompt's best
beams, as vLLM's ``LLM.beam_search`` does (``engine.beam_search``).

``LLM(model, tokenizer=path)`` takes the tokenizer (and its chat template) from another directory or
hub id than the model's, as vLLM's ``tokenizer`` does.

``llm.chat(messages, params)`` renders a conversation through the model's chat template first, as
vLLM's ``LLM.chat`` does.

``llm.embed(prompts)`` and ``llm.score(text_1, text_2)`` answer in vLLM's types (``engine.outputs``), so that its scripts
run unchanged:

    llm.embed(prompts)[0].outputs.embedding            # a list of floats
    [o.outputs.score for o in llm.score(query, docs)]  # the cosine of each pair's embeddings

As in vLLM, a prompt may also be ``{"prompt": text}`` or ``{"prompt_token_ids": ids}``;
``SamplingParams(stop=[...])`` ends a text at its first stop string (checked after each step, on
the newest tokens' text, and cut there); each ``CompletionOutput`` says what stopped it
(``stop_reason``) and, with ``logprobs``, its ``cumulative_logprob``; a progress bar shows on
stderr, as vLLM's does, unless ``use_tqdm=False``; and ``get_tokenizer()`` returns the tokenizer.

The disaggregated services and the tests use it as their reference.
"""

from __future__ import annotations

import gc
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from baton.engine.beam_search import Beam, BeamRules, BeamSearchParams, best, extend
from baton.engine.chat_messages import template_message
from baton.engine.config import EngineConfig
from baton.engine.engine_core import EngineCore
from baton.engine.generation_config import GenerationDefaults, as_params, load_generation_defaults
from baton.engine.hashing import model_fingerprint
from baton.engine.model_runner import ModelRunner
from baton.engine.outputs import (
    CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput, RequestOutput, ScoringOutput, ScoringRequestOutput,
)
from baton.engine.request_checks import truncated_prompt
from baton.engine.sampling_params import SamplingParams, bad_word_sequences
from baton.engine.sequence import Sequence, TokenLogprob
from baton.engine.stop_strings import cut_at_stop, first_stop, tail_tokens, tokens_through_stop
from baton.engine.structured_output import StructuredOutputs

T = TypeVar("T")
Prompt = str | list[int] | dict
Prompts = Prompt | list[str] | list[list[int]] | list[dict]
ProgressBar = bool | Callable[..., tqdm]   # vLLM's use_tqdm: on, off, or the tqdm-like class to draw with
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's: a LoRA adapter by name, id and PEFT directory; ``generate`` loads it under
    ``lora_name`` on first use (``lora_int_id`` is not used here: adapters go by name)."""

    lora_name: str
    lora_int_id: int
    lora_path: str


@dataclass
class BeamSearchSequence:
    """One beam, as vLLM's: ``tokens`` are the prompt's and then the beam's; ``finish_reason`` is
    "stop" where an EOS token ended it (the last of ``tokens``), else "length"."""

    tokens: list[int]
    logprobs: list[TokenLogprob]
    cum_logprob: float
    text: str
    finish_reason: str


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]    # best first


class LLM:
    def __init__(
        self, model: str, tokenizer: str | None = None, generation_config: str = "auto",
        override_generation_config: dict | None = None, enable_lora: bool = True, trust_remote_code: bool = False,
        tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, **engine_config,
    ) -> None:
        """``enable_lora``, ``trust_remote_code`` and parallel sizes of 1 are taken so that vLLM's
        calls run: LoRA is always on, no checkpoint code runs, the model is on one device.
        ``engine_config``: ``EngineConfig``'s fields (``kv_cache_dtype="fp8"`` as in vLLM)."""
        if (tensor_parallel_size, pipeline_parallel_size) != (1, 1):
            raise ValueError("an LLM runs its model on one device: tensor_parallel_size and pipeline_parallel_size "
                             "must be 1")
        self.config = EngineConfig(tokenizer=tokenizer, **engine_config)
        self.runner = ModelRunner(model, self.config)
        self.generation_defaults = _generation_defaults(self.runner.model_dir, generation_config,
                                                        override_generation_config or {})
        self.tokenizer = AutoTokenizer.from_pretrained(self.runner.tokenizer_dir)
        self.core = EngineCore(
            self.runner,
            self.config,
            eos_token_ids=self.runner.model_config.eos_token_ids,
            hash_extra=model_fingerprint(self.runner.model_dir),
            structured_outputs=StructuredOutputs(
                self.runner.tokenizer_dir, self.runner.vocab_size, self.runner.model_config.eos_token_ids
            ),
        )
        self._ids = itertools.count()
        # Everything built so far (torch, transformers, the model) lives as long as the
        # process: keep it out of the collector's full scans, which would otherwise take
        # ~0.15 s each on a CPU host once enough per-token objects have piled up.
        gc.freeze()

    def get_default_sampling_params(self) -> SamplingParams:
        """What ``generate`` samples with when given no params: the generation config's defaults
        (``generation_config``, ``override_generation_config``), the rest ``SamplingParams``'s own."""
        return SamplingParams(**self.generation_defaults.values)

    def generate(
        self,
        prompts: Prompts,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        priority: list[int] | None = None,
        lora: str | list[str | None] | None = None,
        cache_salt: str | list[str | None] | None = None,
        use_tqdm: ProgressBar = True,
        lora_request: LoRARequest | list[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text, token ids, or vLLM's ``{"prompt": text}`` and
        ``{"prompt_token_ids": ids}``) and return the outputs in prompt order.
        ``priority``: one per prompt, lower first (``scheduling_policy="priority"``). ``lora``: the
        LoRA adapter (a name of ``lora_modules``) all prompts run under, or one per prompt (None:
        the base model). ``cache_salt``: the salt of all prompts' prefix-cache hashes, or one per
        prompt (None: unsalted); only prompts with the same salt share cached blocks. No
        ``sampling_params``: ``get_default_sampling_params()``. ``use_tqdm``: a progress bar over
        the finished prompts (vLLM's, on by default as there; or the tqdm-like class to draw it). ``lora_request`` (vLLM's, in place of
        ``lora``): the adapter of all prompts or of each, loaded on first use."""
        texts = _texts(prompts)
        prompts = self._token_ids(prompts)
        params_list = _per_prompt(self.get_default_sampling_params() if sampling_params is None else sampling_params,
                                  len(prompts), "sampling params")
        priorities = priority if priority is not None else [0] * len(prompts)
        if len(priorities) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(priorities)} priorities")
        adapters = self._adapters(lora, lora_request, len(prompts))
        salts = _per_prompt(cache_salt, len(prompts), "cache salts")
        requests: list[tuple[str, list[Sequence]]] = []
        for token_ids, p, rank, adapter, salt in zip(prompts, params_list, priorities, adapters, salts):
            token_ids = truncated_prompt(token_ids, p.truncate_prompt_tokens, self.core.max_model_len, p.max_tokens)
            if p.bad_words:
                words = bad_word_sequences(p.bad_words, lambda text: self.tokenizer(text, add_special_tokens=False).input_ids)
                p = replace(p, bad_words_token_ids=p.bad_words_token_ids + [w for w in words if w not in p.bad_words_token_ids])
            request_id = str(next(self._ids))
            requests.append((request_id, self.core.add_request(request_id, token_ids, p, priority=rank, lora=adapter,
                                                               cache_salt=salt)))
        self._run(sum(len(seqs) for _, seqs in requests), use_tqdm)
        return [self._output(request_id, seqs, text) for (request_id, seqs), text in zip(requests, texts)]

    def _adapters(self, lora: str | list[str | None] | None, lora_request: LoRARequest | list[LoRARequest | None] | None,
                  count: int) -> list[str | None]:
        """Each of ``count`` prompts' adapter name: ``lora``'s, or vLLM's ``lora_request``'s (loaded on
        first use); not both."""
        if lora_request is None:
            return _per_prompt(lora, count, "LoRA adapters")
        if lora is not None:
            raise ValueError("give lora (adapters by name) or lora_request (vLLM's), not both")
        return self._load_requested(_per_prompt(lora_request, count, "LoRA requests"))

    def _load_requested(self, requests: list[LoRARequest | None]) -> list[str | None]:
        """Each request's adapter name, loading those not loaded yet from their directory
        (``load_lora``'s checks: other weights under a loaded name are a ``LoRAConflict``)."""
        for request in {r for r in requests if r is not None}:
            loaded = self.runner.adapters.get(request.lora_name)
            if loaded is None or loaded.path != Path(request.lora_path).expanduser():
                self.load_lora(request.lora_name, request.lora_path)
        return [None if r is None else r.lora_name for r in requests]

    def _run(self, num_seqs: int, use_tqdm: ProgressBar) -> None:
        """Step until every sequence is finished, ending those whose text gained a stop string;
        the bar (``use_tqdm``: on, off, or vLLM's tqdm-like class to draw it with) counts each
        sequence once, in the step that finishes it."""
        bar_class = use_tqdm if callable(use_tqdm) else tqdm
        with bar_class(total=num_seqs, desc="Generating", unit="seq", disable=not use_tqdm) as bar:
            while self.core.has_unfinished():
                changed = self.core.step()
                for seq in changed:
                    if seq.params.stop and not seq.is_finished and self._stopped(seq):
                        self.core.finish(seq, "stop")
                bar.update(sum(seq.is_finished for seq in changed))

    def _stopped(self, seq: Sequence) -> bool:
        """Whether the end of ``seq``'s text holds one of its stop strings."""
        tail = seq.output_token_ids[-tail_tokens(seq.params.stop):]
        text = self.tokenizer.decode(tail, skip_special_tokens=seq.params.skip_special_tokens)
        return first_stop(text, seq.params.stop) is not None

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
        lora: str | list[str | None] | None = None,
        cache_salt: str | list[str | None] | None = None,
        use_tqdm: ProgressBar = True,
        lora_request: LoRARequest | list[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """vLLM's ``LLM.chat``: one conversation (a list of messages) or several, each rendered by the
        model's chat template (``chat_template`` in its place) as transformers renders it, then
        ``generate``d with ``sampling_params`` (``lora``, ``cache_salt``, ``use_tqdm``, ``lora_request`` as there).
        ``continue_final_message`` continues the last (assistant) message instead of opening a new one.
        Messages are read as the gateway reads them (``template_message``: text parts joined by newlines,
        as vLLM joins them). Each output's ``prompt`` is the rendered text, as vLLM's."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        texts = [
            self.tokenizer.apply_chat_template(
                [template_message(m) for m in conversation], chat_template=chat_template, tools=tools, tokenize=False,
                add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                **(chat_template_kwargs or {}),
            )
            for conversation in conversations
        ]
        prompts = [self.tokenizer(text, add_special_tokens=False).input_ids for text in texts]   # the template writes its own
        outputs = self.generate(prompts, sampling_params, lora=lora, cache_salt=cache_salt, use_tqdm=use_tqdm,
                                lora_request=lora_request)
        for output, text in zip(outputs, texts):
            output.prompt = text
        return outputs

    def beam_search(
        self, prompts: Prompts, params: BeamSearchParams, lora: str | None = None, lora_request: LoRARequest | None = None,
    ) -> list[BeamSearchOutput]:
        """Each prompt's ``params.beam_width`` best beams (under LoRA adapter ``lora``, or vLLM's
        ``lora_request``, loaded on first use), as vLLM's ``LLM.beam_search`` finds them
        (``engine.beam_search``); each step runs every prompt's live beams in one batch."""
        (lora,) = self._adapters(lora, lora_request, 1)
        prompts = self._token_ids(prompts)
        stop_ids = frozenset() if params.ignore_eos else frozenset(self.core.eos_token_ids)
        rules = [BeamRules(params.beam_width, params.length_penalty, len(p), stop_ids) for p in prompts]
        live: list[list[Beam]] = [[Beam()] for _ in prompts]
        finished: list[list[Beam]] = [[] for _ in prompts]
        for _ in range(params.max_tokens):
            batch = [(i, beam) for i, beams in enumerate(live) for beam in beams]
            if not batch:
                break
            outs = self.generate([prompts[i] + beam.token_ids for i, beam in batch], rules[0].step_params(), lora=lora)
            steps: list[list[TokenLogprob]] = [[] for _ in prompts]
            for (i, _), out in zip(batch, outs):
                steps[i].append(out.outputs[0].logprobs[0])
            for i, rule in enumerate(rules):
                live[i], ended = extend(live[i], steps[i], rule)
                finished[i] += ended
        return [
            BeamSearchOutput([
                BeamSearchSequence(prompt + beam.token_ids, beam.tokens, beam.cum_logprob,
                                   self.tokenizer.decode(beam.token_ids, skip_special_tokens=True),
                                   "stop" if beam.finished else "length")
                for beam in best(finished[i] + live[i], rules[i])
            ])
            for i, prompt in enumerate(prompts)
        ]

    def load_lora(self, name: str, path: str) -> bool:
        """Load the LoRA adapter (PEFT directory) ``path`` under ``name``, checked as ``lora_modules``
        are at start (ValueError naming what is wrong, ``max_loras`` included). False, changing
        nothing, where the same adapter is loaded under ``name`` already (``LoRAConflict``: other weights)."""
        return self.core.load_lora(name, path)

    def unload_lora(self, name: str) -> None:
        """Unload LoRA adapter ``name`` (``UnknownLoRA`` where it is not loaded); the blocks cached
        under it are dropped, so an adapter loaded later under the same name starts afresh."""
        self.core.unload_lora(name)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block, so that no later prompt reuses one; whether it succeeded, as
        vLLM's answers. It always does: a block a request still holds (one left by a ``generate``
        that raised) is uncached too, its KV left to that request."""
        self.core.reset_prefix_cache()
        return True

    def embed(self, prompts: Prompts, use_tqdm: ProgressBar = True,
              truncate_prompt_tokens: int | None = None) -> list[EmbeddingRequestOutput]:
        """Each prompt's (as ``generate`` takes them) embedding, in prompt order and as vLLM's
        ``LLM.embed`` answers (``outputs.embedding``): its final hidden states pooled as ``pooler``
        (``EngineConfig``) says, by default as the checkpoint's sentence-transformers modules do,
        else its last token's, L2-normalized (as decoder embedding models such as Qwen3-Embedding
        are read). ``use_tqdm``: a progress bar over the embedded prompts. ``truncate_prompt_tokens``
        (vLLM's): each prompt's last k tokens embedded (-1: as many as the context takes)."""
        ids = [truncated_prompt(p, truncate_prompt_tokens, self.core.max_model_len, None) for p in self._token_ids(prompts)]
        seqs = [self.core.add_embedding_request(str(next(self._ids)), p) for p in ids]
        self._run(len(seqs), use_tqdm)
        # A request of one sequence: the sequence's id is the request's.
        return [EmbeddingRequestOutput(seq.seq_id, EmbeddingOutput(seq.embedding), list(seq.prompt_token_ids),
                                       seq.num_cached_tokens) for seq in seqs]

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer prompts are encoded and outputs decoded with (vLLM's)."""
        return self.tokenizer

    def score(self, text_1: Prompts, text_2: Prompts, use_tqdm: ProgressBar = True,
              truncate_prompt_tokens: int | None = None) -> list[ScoringRequestOutput]:
        """vLLM's ``LLM.score`` over the embeddings: each pair's cosine similarity (``outputs.score``),
        paired as vLLM pairs them (one ``text_1`` against each ``text_2``, else the i-th with the
        i-th); texts as ``embed`` takes prompts. As vLLM's embedding-model path answers, a pair's
        ``request_id`` joins its two embeddings' ("0_1"), its ``prompt_token_ids`` are the first
        text's, the tokenizer's pad token (where it has one), then the second text's, and its
        ``num_cached_tokens`` are the two texts' summed. ``truncate_prompt_tokens``: as ``embed``
        takes it, for each text."""
        first, second = _as_list(text_1), _as_list(text_2)
        if not second or len(first) not in (1, len(second)):
            raise ValueError(f"score pairs 1 text_1 with N text_2, or N with N: got {len(first)} and {len(second)}")
        embedded = self.embed(first + second, use_tqdm, truncate_prompt_tokens)
        vectors = torch.tensor([e.outputs.embedding for e in embedded], dtype=torch.float64)
        scores = torch.cosine_similarity(vectors[: len(first)], vectors[len(first):]).tolist()   # 1:N broadcasts
        firsts = embedded[: len(first)] * (len(second) if len(first) == 1 else 1)
        pad = [] if self.tokenizer.pad_token_id is None else [self.tokenizer.pad_token_id]
        return [_scored(a, b, score, pad) for a, b, score in zip(firsts, embedded[len(first):], scores)]

    def _token_ids(self, prompts: Prompts) -> list[list[int]]:
        """One prompt or several (``Prompts``), each as token ids."""
        ids = [_prompt(p) for p in _as_list(prompts)]
        return [self.tokenizer(p).input_ids if isinstance(p, str) else list(p) for p in ids]

    def _output(self, request_id: str, seqs: list[Sequence], prompt: str | None) -> RequestOutput:
        first = seqs[0]
        samples = [self._completion(i, seq) for i, seq in enumerate(seqs)]
        scored = [None, *self._decoded(first.prompt_logprobs)] if first.params.prompt_logprobs is not None else None
        return RequestOutput(request_id, list(first.prompt_token_ids), samples, first.num_cached_tokens, scored, prompt)

    def _decoded(self, logprobs: list[TokenLogprob]) -> list[TokenLogprob]:
        """``logprobs`` whose entries carry each token's text (``Logprob.decoded_token``), as vLLM
        writes it: the token decoded alone, special tokens included."""
        return [replace(lp, decode=self._token_text) for lp in logprobs]

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _completion(self, index: int, seq: Sequence) -> CompletionOutput:
        """A finished sequence's sample: its text cut at its first stop string, and what stopped it;
        a stop string's sample keeps its tokens up to the one that completed the string."""
        params, ids, logprobs = seq.params, seq.output_token_ids, seq.output_logprobs
        decode = partial(self.tokenizer.decode, skip_special_tokens=params.skip_special_tokens)
        text, stop = cut_at_stop(decode(ids) if params.detokenize else "", params.stop, params.include_stop_str_in_output)
        if isinstance(stop, str):
            kept = tokens_through_stop(ids, decode, params.stop)
            ids, logprobs = ids[:kept], logprobs[:kept]
        elif seq.finish_reason == "stop" and ids and ids[-1] in params.stop_token_ids:
            stop = ids[-1]
        asked = params.logprobs is not None
        return CompletionOutput(
            index=index, text=text, token_ids=list(ids),
            finish_reason="stop" if isinstance(stop, str) else seq.finish_reason,
            logprobs=self._decoded(logprobs) if asked else None, stop_reason=stop,
            cumulative_logprob=sum(t.logprob for t in logprobs) if asked else None,
        )


def _generation_defaults(model_dir: str, source: str, override: dict) -> GenerationDefaults:
    """The generation config's sampling defaults, each checked as ``SamplingParams`` checks its
    values (ValueError naming the argument, and the file); logged once."""
    defaults = load_generation_defaults(model_dir, source, override, lambda values: SamplingParams(**as_params(values)))
    if defaults.values:
        logger.info("default sampling params from %s: %s", defaults.describe(), defaults.values)
    return defaults


def _scored(a: EmbeddingRequestOutput, b: EmbeddingRequestOutput, score: float, pad: list[int]) -> ScoringRequestOutput:
    """The pair ``a``, ``b`` with its ``score``, as vLLM's embedding-model path answers it."""
    return ScoringRequestOutput(f"{a.request_id}_{b.request_id}", ScoringOutput(score),
                                a.prompt_token_ids + pad + b.prompt_token_ids, a.num_cached_tokens + b.num_cached_tokens)


def _as_list(prompts: Prompts) -> list[Prompt]:
    if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)


def _prompt(prompt: Prompt) -> str | list[int]:
    """A prompt's text or token ids (vLLM's dict forms: ``prompt_token_ids`` first, then ``prompt``)."""
    if not isinstance(prompt, dict):
        return prompt
    if "prompt_token_ids" in prompt:
        return prompt["prompt_token_ids"]
    if "prompt" in prompt:
        return prompt["prompt"]
    raise ValueError(f"a prompt dict takes 'prompt' (text) or 'prompt_token_ids', got keys {sorted(prompt)}")


def _texts(prompts: Prompts) -> list[str | None]:
    """Each prompt's text, where it was given as text (None for token ids)."""
    return [p if isinstance(p, str) else None for p in map(_prompt, _as_list(prompts))]


def _per_prompt(value: T | list[T], count: int, what: str) -> list[T]:
    """One ``value`` for each of ``count`` prompts: a list is one per prompt already (ValueError
    naming ``what`` where its length differs), anything else is every prompt's."""
    values = value if isinstance(value, list) else [value] * count
    if len(values) != count:
        raise ValueError(f"{count} prompts but {len(values)} {what}")
    return values
