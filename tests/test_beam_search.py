"""Beam search (vLLM's ``use_beam_search`` and ``LLM.beam_search``): the search's rules on hand-made
log-probs, the offline search against transformers' on the demo checkpoint, and the gateway's
search over a backend that runs the same engine in this process against the offline one."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import httpx
import pytest

from baton.engine.beam_search import Beam, BeamRules, BeamSearchParams, best, extend
from baton.engine.llm import LLM
from baton.engine.sequence import TokenLogprob
from baton.services.gateway.app import create_app
from baton.services.gateway.backend import (
    Backend, BackendError, EmbedRequest, EmbedResult, GenerationChunk, GenerationRequest,
)
from baton.services.gateway.tokenizer import GatewayTokenizer
from test_gateway_api import FakeBackend, assert_error, make_config, post, serve, sse_events

from conftest import DEMO_MODEL

pytestmark = pytest.mark.model

PROMPTS = ["JULIET:\nO Romeo", "HAMLET:\nTo be, or not to be"]


def step(*alternatives: tuple[int, float]) -> TokenLogprob:
    """A step's answer: its likeliest token, with ``alternatives`` as its top log-probs."""
    return TokenLogprob(alternatives[0][0], alternatives[0][1], list(alternatives))


# ---- the search's rules -----------------------------------------------------------


def test_a_step_keeps_the_likeliest_extensions_and_finishes_beams_on_stop_tokens() -> None:
    rules = BeamRules(width=2, length_penalty=1.0, prompt_len=3, stop_ids=frozenset({2}), top_k=1)
    beams = [Beam([TokenLogprob(5, -0.5)], -0.5), Beam([TokenLogprob(6, -1.0)], -1.0)]
    live, finished = extend(beams, [step((7, -0.1), (2, -0.2), (8, -3.0)), step((9, -0.05), (10, -0.3))], rules)
    assert [(b.token_ids, round(b.cum_logprob, 6)) for b in live] == [([5, 7], -0.6), ([6, 9], -1.05)]
    assert [(b.token_ids, b.finished) for b in finished] == [([5, 2], True)]
    assert [t.top for t in live[0].tokens] == [[], [(7, -0.1)]]   # each new token keeps top_k alternatives


def test_stop_tokens_end_no_beam_before_min_tokens() -> None:
    rules = BeamRules(width=2, length_penalty=1.0, prompt_len=3, stop_ids=frozenset({2}), min_tokens=2)
    alternatives = step((2, -0.1), (7, -0.5), (8, -0.9))
    live, finished = extend([Beam([TokenLogprob(5, -0.5)], -0.5)], [alternatives], rules)
    assert finished == [] and [b.token_ids for b in live] == [[5, 7], [5, 8]]
    live, finished = extend([Beam([TokenLogprob(5, -0.5), TokenLogprob(6, -0.5)], -1.0)], [alternatives], rules)
    assert [b.token_ids for b in finished] == [[5, 6, 2]]


def test_scores_divide_by_the_length_without_a_final_stop_token() -> None:
    long = Beam([TokenLogprob(t, -1.0) for t in (5, 6, 7, 8)], -4.0)
    short = Beam([TokenLogprob(5, -1.0), TokenLogprob(2, -1.5)], -2.5, finished=True)
    plain = BeamRules(width=1, length_penalty=1.0, prompt_len=2, stop_ids=frozenset({2}))
    assert short.score(plain) == pytest.approx(-2.5 / 3) and long.score(plain) == pytest.approx(-4.0 / 6)
    assert best([short, long], plain) == [long]
    assert best([short, long], BeamRules(1, 0.0, 2, frozenset({2}))) == [short]   # no penalty: the likeliest


# ---- the offline search -----------------------------------------------------------


@pytest.fixture(scope="module")
def llm(demo_model) -> LLM:
    return LLM(demo_model)


@pytest.mark.parametrize("width", [2, 4])
def test_offline_beam_search_matches_transformers(llm, demo_model, width) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model)
    hf = AutoModelForCausalLM.from_pretrained(demo_model).eval()
    outs = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=width, max_tokens=10, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        ids = tok(prompt, return_tensors="pt").input_ids
        hf_out = hf.generate(ids, num_beams=width, num_return_sequences=width, do_sample=False, max_new_tokens=10,
                             eos_token_id=None, early_stopping=False, output_scores=True, return_dict_in_generate=True)
        assert [s.tokens for s in out.sequences] == hf_out.sequences.tolist()
        # transformers divides by the new tokens' count; with equal lengths the order is the same
        assert [s.cum_logprob / 10 for s in out.sequences] == pytest.approx(hf_out.sequences_scores.tolist(), abs=1e-4)
        assert all(s.finish_reason == "length" and s.cum_logprob == pytest.approx(sum(t.logprob for t in s.logprobs))
                   for s in out.sequences)
        texts = [tok.decode(s[ids.shape[1]:], skip_special_tokens=True) for s in hf_out.sequences.tolist()]
        assert [s.text for s in out.sequences] == texts


def test_offline_beam_search_checks_its_params() -> None:
    with pytest.raises(ValueError, match="beam_width and max_tokens must be at least 1"):
        BeamSearchParams(beam_width=0, max_tokens=4)


# ---- the gateway's search -----------------------------------------------------------


class EngineBackend(Backend):
    """Each sequence run by an aggregated engine in this process; records every request, and
    fails the ``fail_at``-th with a worker's error."""

    def __init__(self, llm: LLM, fail_at: int | None = None) -> None:
        self.llm = llm
        self.fail_at = fail_at
        self.requests: list[GenerationRequest] = []
        self.open: set[str] = set()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self.requests.append(request)
        if len(self.requests) == self.fail_at:
            raise BackendError("decode worker 127.0.0.1:1 went away", 503)
        # A worker streams each token's log-prob whether asked or not; the offline LLM gives them where asked.
        params = request.params if request.params.logprobs is not None else replace(request.params, logprobs=0)
        (out,) = self.llm.generate([request.prompt_token_ids], params, lora=request.lora)
        self.open.add(request.request_id)
        try:
            await asyncio.sleep(0)
            o = out.outputs[0]
            scored = out.prompt_logprobs[1:] if out.prompt_logprobs else []   # a chunk's have no None for the first token
            yield GenerationChunk(tokens=o.logprobs, finish_reason=o.finish_reason,
                                  prompt_tokens=len(out.prompt_token_ids), cached_tokens=out.num_cached_tokens,
                                  prompt_logprobs=scored or None)
        finally:
            self.open.discard(request.request_id)

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        raise BackendError("no embeddings here", 501)

    async def reachable(self) -> dict[str, int]:
        return {"prefill": 1, "decode": 1}


@pytest.fixture(scope="module")
def gateway_tok() -> GatewayTokenizer:
    return GatewayTokenizer(DEMO_MODEL)


def beam_body(prompt: str, n: int, **fields: object) -> dict:
    return {"model": "shakespeare", "prompt": prompt, "n": n, "max_tokens": 8, "use_beam_search": True,
            "ignore_eos": True, **fields}


async def test_gateway_beams_are_the_offline_searchs(llm, gateway_tok) -> None:
    offline = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=3, max_tokens=8, ignore_eos=True))
    backend = EngineBackend(llm)
    r = await post(backend, gateway_tok, "/v1/completions", beam_body(PROMPTS, 3, temperature=1.3, logprobs=2))
    assert r.status_code == 200, r.text
    body = r.json()
    prompt_len = [len(o.sequences[0].tokens) - len(o.sequences[0].logprobs) for o in offline]
    expected = [s for out in offline for s in out.sequences]
    assert [c["text"] for c in body["choices"]] == [s.text for s in expected]
    assert [c["index"] for c in body["choices"]] == list(range(6))
    assert all(c["finish_reason"] == "length" for c in body["choices"])
    for choice, seq in zip(body["choices"], expected):
        assert choice["logprobs"]["token_logprobs"] == pytest.approx([t.logprob for t in seq.logprobs], abs=1e-5)
        assert all(len(top) == 2 for top in choice["logprobs"]["top_logprobs"])
    assert body["usage"]["prompt_tokens"] == sum(prompt_len)
    assert body["usage"]["completion_tokens"] == 6 * 8
    # one single-token request per live beam and step, greedy, with the top 2n log-probs
    assert len(backend.requests) == 2 * (1 + 3 * 7)
    assert {(q.params.max_tokens, q.params.temperature, q.params.logprobs) for q in backend.requests} == {(1, 0.0, 6)}
    # the steps past the first may be computed on the decode worker: a block at most is uncached there
    assert all(q.local_prefill_limit == (0 if "-s0-" in q.request_id else 16) for q in backend.requests)
    assert not backend.open

    stream = await post(EngineBackend(llm), gateway_tok, "/v1/completions", beam_body(PROMPTS, 3, stream=True))
    texts = {}
    for event in sse_events(stream)[:-1]:
        for c in json.loads(event)["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert [texts[i] for i in range(6)] == [s.text for s in expected]


async def test_chat_beams_search_the_templated_conversation(llm, gateway_tok) -> None:
    messages = [{"role": "user", "content": "Speak, Romeo."}]
    ids = gateway_tok.encode_chat(messages, add_generation_prompt=True)
    (offline,) = llm.beam_search([ids], BeamSearchParams(beam_width=2, max_tokens=8, ignore_eos=True))
    body = {"model": "shakespeare", "messages": messages, "n": 2, "max_tokens": 8, "use_beam_search": True,
            "ignore_eos": True}
    r = await post(EngineBackend(llm), gateway_tok, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    assert [c["message"]["content"] for c in r.json()["choices"]] == [s.text for s in offline.sequences]


async def test_beams_stop_on_stop_tokens_and_rank_by_length_penalised_score(llm, gateway_tok) -> None:
    newline = gateway_tok.encode("\n", add_special_tokens=False)[-1]
    prompt_len = len(gateway_tok.encode(PROMPTS[1]))
    for penalty in (0.0, 1.0, 3.0):
        body = beam_body(PROMPTS[1], 4, max_tokens=12, stop_token_ids=[newline], logprobs=0, length_penalty=penalty)
        r = await post(EngineBackend(llm), gateway_tok, "/v1/completions", body)
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        stopped = [c for c in choices if c["finish_reason"] == "stop"]
        assert stopped and all(c["stop_reason"] == newline and c["logprobs"]["tokens"][-1] == "\n" for c in stopped)
        scores = [sum(c["logprobs"]["token_logprobs"])
                  / (prompt_len + len(c["logprobs"]["tokens"]) - (c["finish_reason"] == "stop")) ** penalty
                  for c in choices]
        assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("fields, param", [
    ({"logit_bias": {"5": 3.0}}, "logit_bias"),
    ({"bad_words": ["Romeo"]}, "bad_words"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, "structured_outputs"),
    ({"repetition_penalty": 1.2}, "repetition_penalty"),
    ({"n": 11}, "n"),                   # 22 log-probs a step, past --max-logprobs' 20
])
async def test_beam_search_refuses_what_its_log_probs_cannot_follow(llm, gateway_tok, fields, param) -> None:
    backend = EngineBackend(llm)
    r = await post(backend, gateway_tok, "/v1/completions", {**beam_body(PROMPTS[0], 2), **fields},
                   config=make_config(max_n=16))
    assert "use_beam_search" in assert_error(r, 400, param)["message"]
    assert backend.requests == []


async def test_a_failed_step_fails_the_request_and_closes_every_step(llm, gateway_tok) -> None:
    backend = EngineBackend(llm, fail_at=5)
    r = await post(backend, gateway_tok, "/v1/completions", beam_body(PROMPTS[0], 3))
    assert "went away" in assert_error(r, 503)["message"]
    assert len(backend.requests) <= 7 and not backend.open


def test_offline_beams_end_on_eos_unless_it_is_ignored(llm) -> None:
    """Scored by log-prob alone, one of the JULIET prompt's three best beams ends in EOS by its 8th token."""
    for ignore_eos in (False, True):
        (out,) = llm.beam_search(PROMPTS[:1], BeamSearchParams(3, 8, ignore_eos=ignore_eos, length_penalty=0.0))
        stopped = [s for s in out.sequences if s.finish_reason == "stop"]
        assert [s.tokens[-1] for s in stopped] == ([] if ignore_eos else [2])   # the demo model's EOS id
        assert [s.cum_logprob for s in out.sequences] == sorted((s.cum_logprob for s in out.sequences), reverse=True)


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_gone_mid_search_aborts_the_steps_in_flight_and_starts_no_more(gateway_tok, stream) -> None:
    backend = FakeBackend(gateway_tok, per_chunk=1, delay=0.05)     # 40 steps of 50 ms: 2 s a search
    app = create_app(make_config(), backend, gateway_tok)
    with serve(app) as (url, _, _):
        body = {"model": "shakespeare", "prompt": "x", "max_tokens": 40, "n": 2, "stream": stream,
                "use_beam_search": True}
        with httpx.Client(base_url=url, timeout=0.6) as client, pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", json=body)
        deadline = time.monotonic() + 5
        while (not backend.aborted or app.state.gateway.in_flight) and time.monotonic() < deadline:
            time.sleep(0.02)
        started = len(backend.requests)
        time.sleep(0.3)
    ids = {r.request_id for r in backend.requests}
    assert backend.aborted and ids == set(backend.aborted) | set(backend.finished)    # none left running
    assert len(backend.requests) == started < 1 + 2 * 39                            # none started since
