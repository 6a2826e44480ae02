"""Speculative decoding by n-gram lookup: the index proposes what a brute-force search finds,
the scheduler computes a draft after its sequence's token within the budget and the pool, and
the engine's output with speculation is exactly its output without it (greedy, seeded, with
log-probs, stop tokens, n > 1, preemption and the decode role), in fewer steps."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roles import prefill_then_decode

from baton.engine.block_manager import BlockManager
from baton.engine.config import EngineConfig, SpeculativeConfig
from baton.engine.llm import LLM
from baton.engine.sampling_params import SamplingParams
from baton.engine.scheduler import Scheduler
from baton.engine.sequence import Sequence
from baton.engine.speculative import NgramIndex, can_speculate, propose

LINE = "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name.\n\n"
PROMPTS = [LINE * 3, LINE * 2 + "JULIET:\nO Romeo,", "ROMEO:\nBut, soft! what light through yonder", "HAMLET:\n"]
SPEC = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_max=3)


def brute_force(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    for n in range(min(max_n, len(tokens)), min_n - 1, -1):
        suffix = tokens[len(tokens) - n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


@pytest.mark.unit
@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=60), st.lists(st.integers(1, 7), min_size=1, max_size=12),
       st.integers(1, 3), st.integers(0, 2), st.integers(1, 5))
def test_the_index_proposes_what_a_brute_force_search_finds(tokens, growth, min_n, extra, k) -> None:
    """Grown piece by piece as a sequence's tokens grow, it proposes what searching the whole
    text for the longest n-gram suffix's latest earlier occurrence proposes."""
    index, seen = NgramIndex(min_n, min_n + extra), 0
    for step in growth:
        index.extend(tokens[seen:seen + step])
        seen = min(len(tokens), seen + step)
        assert index.propose(k) == brute_force(tokens[:seen], k, min_n, min_n + extra)


@pytest.mark.unit
def test_the_config_reads_vllms_json_and_refuses_the_rest() -> None:
    assert SpeculativeConfig.from_json('{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3}') == \
        SpeculativeConfig(num_speculative_tokens=5, prompt_lookup_max=3)
    for text, message in [
        ("{not json", "not JSON"), ('{"method": "eagle", "num_speculative_tokens": 2}', "ngram"),
        ('{"method": "ngram"}', "num_speculative_tokens"), ('{"method": "ngram", "num_speculative_tokens": 2, "model": "x"}', "model"),
        ('{"method": "ngram", "num_speculative_tokens": 0}', r"\[1, 16\]"), ('{"method": "ngram", "num_speculative_tokens": true}', "integers"),
        ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2}', "min <= max"),
    ]:
        with pytest.raises(ValueError, match=message):
            SpeculativeConfig.from_json(text)
    with pytest.raises(ValueError, match="async_scheduling"):
        EngineConfig(speculative=SPEC, async_scheduling=True)
    gated = SpeculativeConfig.from_json('{"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 3}')
    assert gated.disable_by_batch_size == 3 and SpeculativeConfig.from_json(gated.to_json()) == gated
    assert SpeculativeConfig.from_json(SPEC.to_json()) == SPEC
    with pytest.raises(ValueError, match="at least 1"):
        SpeculativeConfig.from_json('{"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0}')


@pytest.mark.unit
def test_only_sequences_whose_rows_sample_alike_propose_and_never_past_max_tokens() -> None:
    def seq(outputs: list[int], **params) -> Sequence:
        s = Sequence("s", [5, 6, 7, 5, 6], SamplingParams(max_tokens=8, **params))
        s.output_token_ids = list(outputs)
        return s

    assert propose(seq([]), SPEC) == [7, 5, 6]
    assert propose(seq([7, 5, 6, 7, 5]), SPEC) == [6, 7]            # 8 - 5 outputs - 1
    assert propose(seq([7, 5, 6, 7, 5, 6, 7]), SPEC) == []          # its next token is its last
    for params in ({"repetition_penalty": 1.2}, {"presence_penalty": 0.5}, {"frequency_penalty": 0.5},
                   {"bad_words_token_ids": [[9]]}, {"min_tokens": 3}):
        assert not can_speculate(seq([], **params)) and propose(seq([], **params), SPEC) == [], params
    assert can_speculate(seq([], temperature=0.7, top_p=0.9, logit_bias={3: 1.0}, allowed_token_ids=[5, 6, 7], logprobs=2))


@pytest.mark.unit
def test_a_draft_is_computed_after_its_token_within_the_budget_and_the_pool() -> None:
    def decoding(budget: int, full: bool = False) -> tuple[Scheduler, Sequence]:
        config = EngineConfig(block_size=4, max_num_batched_tokens=budget, speculative=SPEC)
        sched = Scheduler(config, BlockManager(8, 4))
        s = Sequence("s", [1, 2, 3, 1, 2, 3, 1], SamplingParams(max_tokens=16, temperature=0))
        sched.add(s)
        sched.schedule()
        s.num_computed_tokens = 7
        s.output_token_ids.append(2)                     # 1 2 3 1 2 3 1 2: "3 1 2" came before, then 3 1 2
        if full:                                         # another sequence holds every other block
            assert sched.block_manager.allocate(Sequence("other", list(range(50, 74)), SamplingParams()), 24)
        return sched, s

    sched, s = decoding(budget=64)
    (chunk,) = sched.schedule().chunks
    assert (chunk.draft, chunk.num_new_tokens, chunk.num_own_tokens, chunk.samples) == ([3, 1, 2], 4, 1, True)
    assert len(s.block_table) == 3                       # slots for tokens up to position 10
    sched, s = decoding(budget=3)
    assert sched.schedule().chunks[0].draft == [3, 1]
    sched, s = decoding(budget=64, full=True)            # no room for the draft: the token goes alone
    (chunk,) = sched.schedule().chunks
    assert (chunk.draft, chunk.num_new_tokens, len(s.block_table)) == ([], 1, 2)


@pytest.mark.unit
def test_no_drafts_while_the_running_batch_has_reached_disable_by_batch_size() -> None:
    spec = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_max=3, disable_by_batch_size=2)
    sched = Scheduler(EngineConfig(block_size=4, speculative=spec), BlockManager(64, 4))
    seqs = [Sequence(f"s{i}", [1, 2, 3, 1, 2, 3, 1], SamplingParams(max_tokens=16, temperature=0)) for i in range(2)]
    for s in seqs:
        sched.add(s)
    sched.schedule()
    for s in seqs:
        s.num_computed_tokens = 7
        s.output_token_ids.append(2)                     # each would propose 3 1 2
    assert [c.draft for c in sched.schedule().chunks] == [[], []]
    for s in seqs:
        s.num_computed_tokens += 1
        s.output_token_ids.append(3)
    sched.finish(seqs[1], "stop")                        # one left running: it drafts again
    assert [c.draft for c in sched.schedule().chunks] == [[1, 2, 3]]


@pytest.fixture(scope="module")
def engines(demo_model) -> tuple[LLM, LLM]:
    return LLM(demo_model, block_size=4), LLM(demo_model, block_size=4, speculative=SPEC)


@pytest.mark.model
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=96, logprobs=2),
    SamplingParams(temperature=0.8, top_p=0.95, seed=11, max_tokens=96, n=2),
    SamplingParams(temperature=0, max_tokens=96, stop_token_ids=[14], ignore_eos=True),
    SamplingParams(temperature=1.0, seed=5, max_tokens=7, logit_bias={201: 2.0}),
    SamplingParams(temperature=0, max_tokens=96, stop=["Romeo"], ignore_eos=True, logprobs=0),
], ids=["greedy-logprobs", "seeded-n2", "stop-token", "short-biased", "stop-string"])
def test_speculation_changes_nothing_but_the_number_of_steps(engines, params) -> None:
    base, spec = engines
    before = (spec.core.spec_stats.proposed_tokens, spec.core.spec_stats.accepted_tokens)
    want = base.generate(PROMPTS, params)
    got = spec.generate(PROMPTS, params)
    for w, g in zip(want, got):
        for wo, go in zip(w.outputs, g.outputs):
            assert (go.token_ids, go.finish_reason, go.text) == (wo.token_ids, wo.finish_reason, wo.text)
            if wo.logprobs is None:        # not asked for
                assert go.logprobs is None
                continue
            assert [[i for i, _ in t.top] for t in go.logprobs] == [[i for i, _ in t.top] for t in wo.logprobs]
            for got_lp, want_lp in zip(go.logprobs, wo.logprobs):
                assert [got_lp.logprob, *(v for _, v in got_lp.top)] == \
                    pytest.approx([want_lp.logprob, *(v for _, v in want_lp.top)], abs=1e-4)
    assert spec.core.stats().used_blocks == 0
    proposed, accepted = spec.core.spec_stats.proposed_tokens - before[0], spec.core.spec_stats.accepted_tokens - before[1]
    assert proposed > 0                                          # drafts were verified
    assert accepted > 0 or params.stop_token_ids or params.max_tokens < 8   # and some were right (where long enough)


@pytest.mark.model
def test_speculation_beside_penalties_under_preemption_and_in_the_decode_role(demo_model, engines) -> None:
    """Rows that cannot speculate decode beside ones that do; a tight pool preempts drafted
    sequences; the decode role (reserve, activate) speculates too."""
    base, _ = engines
    params = [SamplingParams(temperature=0, max_tokens=64, ignore_eos=True),
              SamplingParams(temperature=0.7, seed=2, max_tokens=64, repetition_penalty=1.3)] * 2
    want = [o.outputs[0].token_ids for o in base.generate(PROMPTS, params)]
    tight = LLM(demo_model, block_size=4, num_blocks=110, max_num_seqs=4, speculative=SPEC)
    steps = 0
    for request_id, (prompt, p) in enumerate(zip(PROMPTS, params)):
        tight.core.add_request(str(request_id), tight.tokenizer(prompt).input_ids, p)
    seqs = [tight.core.requests[str(i)][0] for i in range(len(PROMPTS))]
    while tight.core.has_unfinished():
        tight.core.step()
        steps += 1
    assert [s.output_token_ids for s in seqs] == want and tight.core.stats().used_blocks == 0
    assert steps < 64 + len(PROMPTS) and tight.core.spec_stats.accepted_tokens > 0
    prompt = base.tokenizer(PROMPTS[0]).input_ids
    seq, decode = prefill_then_decode(demo_model, prompt, params[0], speculative=SPEC)
    assert seq.output_token_ids == want[0] and decode.spec_stats.accepted_tokens > 0


@pytest.mark.model
def test_async_scheduling_above_disable_by_batch_size_and_drafts_below_it(demo_model, engines) -> None:
    """Two sequences propose and verify drafts, each step read back at once; two more arrive
    (the step that admits them verifies drafts: it is read back too), and while the batch is
    at disable_by_batch_size steps stay in flight (async scheduling); once it shrinks below,
    drafts come back. The output is the output without speculation."""
    base, _ = engines
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (72, 96, 12, 20)]
    want = [o.outputs[0].token_ids for o in base.generate(PROMPTS, params)]
    gated = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_max=3, disable_by_batch_size=3)
    llm = LLM(demo_model, block_size=4, async_scheduling=True, speculative=gated)
    in_flight = 0
    for request_id, (prompt, p) in enumerate(zip(PROMPTS, params)):
        llm.core.add_request(str(request_id), llm.tokenizer(prompt).input_ids, p)
        if request_id == 1:
            for _ in range(8):
                llm.core.step()
                assert llm.core._in_flight is None
            assert llm.core.spec_stats.proposed_tokens > 0
    seqs = [llm.core.requests[str(i)][0] for i in range(len(PROMPTS))]
    while llm.core.has_unfinished():
        llm.core.step()
        if llm.core._in_flight is not None:
            in_flight += 1
            assert not any(llm.core._in_flight.drafts)
            assert len(llm.core.scheduler.running) >= 3
    assert [s.output_token_ids for s in seqs] == want and llm.core.stats().used_blocks == 0
    assert in_flight > 10 and llm.core.spec_stats.accepted_tokens > 0
    with pytest.raises(ValueError, match="disable_by_batch_size"):
        EngineConfig(speculative=SPEC, async_scheduling=True)


@pytest.mark.unit
def test_baton_up_hands_the_speculative_config_to_the_decode_workers(capsys) -> None:
    from baton.services import launcher
    from baton.services.worker import worker_arg_parser

    text = json.dumps({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2})
    args = launcher.build_parser().parse_args(["up", "--redis-url", "redis://r:1/0", "--speculative-config", text])
    plan = launcher.make_plan(args)
    (decode,), (prefill,) = plan.decode, plan.prefill
    parsed = worker_arg_parser("decode", default_port=1).parse_args(decode[4:])
    assert parsed.speculative_config == SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=2)
    assert "--speculative-config" not in prefill
    assert worker_arg_parser("decode", default_port=1).parse_args(["--model", "m"]).speculative_config is None
    with pytest.raises(SystemExit):
        launcher.build_parser().parse_args(["up", "--speculative-config", '{"method": "eagle"}'])
    assert '"method": "ngram"' in capsys.readouterr().err
