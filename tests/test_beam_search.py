"""Beam search (vLLM's ``LLM.beam_search``): the search's rules on hand-made log-probs, and the
offline search against transformers' on the demo checkpoint."""

from __future__ import annotations

import pytest

from baton.engine.beam_search import Beam, BeamRules, BeamSearchParams, best, extend
from baton.engine.llm import LLM
from baton.engine.sequence import TokenLogprob

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
        assert [s.text for s in out.sequences] == [tok.decode(s[ids.shape[1]:], skip_special_tokens=True) for s in hf_out.sequences.tolist()]


def test_offline_beam_search_checks_its_params() -> None:
    with pytest.raises(ValueError, match="beam_width and max_tokens must be at least 1"):
        BeamSearchParams(beam_width=0, max_tokens=4)


def test_offline_beams_end_on_eos_unless_it_is_ignored(llm) -> None:
    """Scored by log-prob alone, one of the JULIET prompt's three best beams ends in EOS by its 8th token."""
    for ignore_eos in (False, True):
        (out,) = llm.beam_search(PROMPTS[:1], BeamSearchParams(3, 8, ignore_eos=ignore_eos, length_penalty=0.0))
        stopped = [s for s in out.sequences if s.finish_reason == "stop"]
        assert [s.tokens[-1] for s in stopped] == ([] if ignore_eos else [2])   # the demo model's EOS id
        assert [s.cum_logprob for s in out.sequences] == sorted((s.cum_logprob for s in out.sequences), reverse=True)
