"""Beam search as vLLM runs it, over one-token requests (pure: ``LLM.beam_search`` runs the steps on
the engine, the gateway's ``beam_search`` over the workers).

Each step asks for one token after every live beam (its prompt and tokens so far: the prefix cache
holds all of it but the newest token) with the top ``2 * width`` log-probs (``step_params``), and
extends each beam by each of those tokens (``extend``). A candidate that ends in a stop token (an
EOS token unless ``ignore_eos``, or one of ``stop_token_ids``; none before ``min_tokens``) is
finished; of the others, the ``width`` likeliest live on. After ``max_tokens`` steps, or once no
beam lives, the ``width`` best of the finished and live beams by score are the answer, best first
(``best``): a beam's score is its cumulative log-prob over its length ** ``length_penalty``, its
length counting the prompt and not a final stop token (vLLM's ``get_beam_search_score``).

The log-probs are the model's own (raw, as vLLM's), so the search follows no sampling parameter:
temperature, penalties, biases and grammars change nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from baton.engine.sampling_params import SamplingParams
from baton.engine.sequence import TokenLogprob


@dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's: ``beam_width`` beams of up to ``max_tokens`` tokens, ``length_penalty`` the power of
    the length a beam's log-prob is divided by; ``ignore_eos``: EOS tokens end no beam."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.beam_width < 1 or self.max_tokens < 1:
            raise ValueError(f"beam_width and max_tokens must be at least 1, got {self.beam_width} and "
                             f"{self.max_tokens}")


@dataclass(frozen=True)
class BeamRules:
    """What one prompt's search keeps: ``width`` beams, scored with ``length_penalty`` over
    ``prompt_len`` prompt tokens; ``stop_ids`` finish a beam once it has ``min_tokens``; each token
    keeps its ``top_k`` likeliest alternatives (those the caller asked for)."""

    width: int
    length_penalty: float
    prompt_len: int
    stop_ids: frozenset[int]
    min_tokens: int = 0
    top_k: int = 0

    def step_params(self) -> SamplingParams:
        """A step's request: one token with the log-probs of the ``2 * width`` likeliest (at least ``top_k``)."""
        return SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=max(2 * self.width, self.top_k))


@dataclass
class Beam:
    tokens: list[TokenLogprob] = field(default_factory=list)
    cum_logprob: float = 0.0
    finished: bool = False      # ends in a stop token

    @property
    def token_ids(self) -> list[int]:
        return [t.token_id for t in self.tokens]

    def score(self, rules: BeamRules) -> float:
        length = rules.prompt_len + len(self.tokens) - self.finished
        return self.cum_logprob / max(length, 1) ** rules.length_penalty


def extend(beams: list[Beam], steps: list[TokenLogprob], rules: BeamRules) -> tuple[list[Beam], list[Beam]]:
    """The beams that live on (the ``width`` likeliest, likeliest first) and those that finish,
    from each beam of ``beams`` extended by each alternative of its step (``steps[i].top``)."""
    live: list[Beam] = []
    finished: list[Beam] = []
    for beam, step in zip(beams, steps, strict=True):
        may_stop = len(beam.tokens) >= rules.min_tokens
        for token_id, logprob in step.top:
            stops = token_id in rules.stop_ids
            if stops and not may_stop:
                continue
            token = replace(step, token_id=token_id, logprob=logprob, top=step.top[: rules.top_k])   # its decode kept
            (finished if stops else live).append(Beam([*beam.tokens, token], beam.cum_logprob + logprob, stops))
    live.sort(key=lambda b: b.cum_logprob, reverse=True)   # stable: ties keep beam, then rank, order
    return live[: rules.width], finished


def best(beams: list[Beam], rules: BeamRules) -> list[Beam]:
    """The ``width`` best of ``beams`` by score, best first."""
    return sorted(beams, key=lambda b: b.score(rules), reverse=True)[: rules.width]
