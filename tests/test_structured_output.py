"""Structured output on the demo checkpoint: constrained greedy output equals transformers'
``generate`` under xgrammar's own logits processor for the same grammar; sampled output stays
in the grammar; a resumed sequence and the prefill / decode role split go on as one process
does; unconstrained rows beside constrained ones are untouched; bad grammars are refused."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
import xgrammar as xgr
from transformers import AutoModelForCausalLM

from roles import prefill_then_decode

from baton.engine.engine_core import EngineCore
from baton.engine.llm import LLM
from baton.engine.sampling_params import SamplingParams, StructuredOutputParams

pytestmark = pytest.mark.model

PROMPTS = ["JULIET:\nO Romeo", "ROMEO:\nBut, soft! what light through yonder", "HAMLET:\n"]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}, "mood": {"enum": ["merry", "sad"]}},
    "required": ["name", "age", "mood"],
    "additionalProperties": False,
}
NAMES = ("Romeo", "Juliet", "Mercutio", "Tybalt")
SENTENCE = r"[A-Z][a-z]+ (is|was) [a-z]+\."
# Free text in which "Romeo" starts a tagged structure: "Romeo!", a JSON name, " END" (the demo model writes "Romeo").
NAMED = {"type": "string", "enum": ["Juliet", "Tybalt"]}
TAGGED = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["Romeo"], "tags": [
    {"begin": "Romeo!", "content": {"type": "json_schema", "json_schema": NAMED}, "end": " END"}]}}
TAGGED_OLDER = {"type": "structural_tag", "structures": [{"begin": "Romeo!", "schema": NAMED, "end": " END"}],
                "triggers": ["Romeo"]}
SPECS = {
    "json": StructuredOutputParams(json=json.dumps(PERSON), disable_any_whitespace=True),
    "json_object": StructuredOutputParams(json_object=True, disable_any_whitespace=True),
    "regex": StructuredOutputParams(regex=SENTENCE),
    "choice": StructuredOutputParams(choice=NAMES),
    "grammar": StructuredOutputParams(grammar='root ::= "O " [A-Z] [a-z]+ ("!" | "?")'),
    "structural_tag": StructuredOutputParams(structural_tag=json.dumps(TAGGED)),
}


def follows(spec: StructuredOutputParams, text: str) -> bool:
    """Whether a finished output's text is what its grammar describes (checked without xgrammar)."""
    if spec.json is not None:
        value = json.loads(text)
        return set(value) == set(PERSON["required"]) and isinstance(value["age"], int) and value["mood"] in ("merry", "sad")
    if spec.json_object:
        return isinstance(json.loads(text), dict)
    if spec.regex is not None:
        return re.fullmatch(spec.regex, text) is not None
    if spec.choice is not None:
        return text in spec.choice
    if spec.structural_tag is not None:
        starts = [i for i in range(len(text)) if text.startswith("Romeo", i)]
        return all(re.match(r'Romeo!"(Juliet|Tybalt)" END', text[i:]) for i in starts)
    return re.fullmatch(r"O [A-Z][a-z]+[!?]", text) is not None


@pytest.fixture(scope="module")
def llm(demo_model) -> LLM:
    return LLM(demo_model, block_size=4)


@pytest.fixture(scope="module")
def hf_model(demo_model):
    return AutoModelForCausalLM.from_pretrained(demo_model).eval()


@pytest.mark.parametrize("kind", list(SPECS))
def test_greedy_output_matches_transformers_under_the_same_grammar(llm, hf_model, kind):
    spec = SPECS[kind]
    for async_scheduling in (False, True):
        llm.core.async_scheduling = async_scheduling
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=48, structured_output=spec))
        for out in outs:
            ids = torch.tensor([out.prompt_token_ids])
            processor = xgr.contrib.hf.LogitsProcessor(llm.core.structured_outputs.compile(spec))
            theirs = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=48,
                                       logits_processor=[processor])[0, ids.shape[1]:].tolist()
            ours = out.outputs[0]
            assert ours.token_ids == theirs, (kind, async_scheduling, ours.text)
            if ours.finish_reason == "stop":
                assert ours.token_ids[-1] == 2 and follows(spec, ours.text), ours.text
        # The demo model writes these to the end well within 48 tokens (a structural tag's text never ends).
        assert all(o.outputs[0].finish_reason == "stop" for o in outs) or kind in ("json_object", "structural_tag")
    assert llm.core.stats().used_blocks == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_constrained_output_equals_the_cpu_engine(demo_model, llm):
    """The mask applied on the device (xgrammar's kernel) and read back after a step in flight."""
    cuda = LLM(demo_model, device="cuda", block_size=4, async_scheduling=True)
    for spec in SPECS.values():
        params = SamplingParams(temperature=0, max_tokens=48, structured_output=spec)
        want = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
        assert [o.outputs[0].token_ids for o in cuda.generate(PROMPTS, params)] == want, spec


def test_sampled_output_stays_in_the_grammar(llm):
    params = [
        SamplingParams(temperature=t, top_p=0.95, seed=seed, max_tokens=64, structured_output=spec)
        for seed, t in enumerate([0.7, 1.0, 1.5]) for spec in SPECS.values()
    ]
    outs = [o.outputs[0] for o in llm.generate([PROMPTS[i % 3] for i in range(len(params))], params)]
    finished = [(p.structured_output, o.text) for p, o in zip(params, outs) if o.finish_reason == "stop"]
    assert len(finished) >= len(params) - 3
    assert all(follows(spec, text) for spec, text in finished), finished


def test_an_extreme_repetition_penalty_leaves_the_grammar_something_to_sample(llm):
    """Penalized logits stay finite (float32 would overflow to -inf): the grammar's tokens can
    all be penalized without leaving the row empty (a found-by-fuzzing abort)."""
    for regex in ("(ab )+x", "[a-c]{30}"):
        for penalty in (4.6e307, 1e-300):
            for temperature in (0.0, 1.0):
                params = SamplingParams(temperature=temperature, seed=1, max_tokens=64, repetition_penalty=penalty,
                                        structured_output=StructuredOutputParams(regex=regex))
                out = llm.generate([2, 0], params)[0].outputs[0]
                assert out.finish_reason in ("stop", "length"), (regex, penalty, temperature, out.text)
                assert out.finish_reason == "length" or re.fullmatch(regex, out.text), out.text


def test_unconstrained_rows_beside_constrained_ones_are_untouched(llm):
    free = SamplingParams(temperature=0.8, seed=5, max_tokens=24, repetition_penalty=1.1)
    alone = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, free)]
    constrained = SamplingParams(temperature=0.8, seed=5, max_tokens=24, structured_output=SPECS["regex"])
    mixed = llm.generate(PROMPTS + PROMPTS, [free] * 3 + [constrained] * 3)
    assert [o.outputs[0].token_ids for o in mixed[:3]] == alone
    assert [o.outputs[0].token_ids for o in mixed[3:]] != alone


def test_a_resumed_sequence_goes_on_as_it_would_have(llm):
    """The matcher is advanced over the tokens generated elsewhere, so the rest is the same."""
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=48, structured_output=SPECS["json"])
    prompt = llm.tokenizer(PROMPTS[1]).input_ids
    whole = llm.generate(prompt, params)[0].outputs[0]
    assert whole.finish_reason == "stop" and follows(SPECS["json"], whole.text)
    for k in (1, 5, len(whole.token_ids) - 1):
        (seq,) = llm.core.add_request(f"resumed-{k}", prompt, params, whole.token_ids[:k])
        while llm.core.has_unfinished():
            llm.core.step()
        assert seq.output_token_ids == whole.token_ids and seq.finish_reason == "stop"
    broken = whole.token_ids[:3] + [llm.tokenizer.convert_tokens_to_ids("]")]
    with pytest.raises(ValueError, match="output token 3 .* not allowed"):
        llm.core.add_request("broken", prompt, params, broken)


@pytest.mark.parametrize("kind", ["json", "choice"])
def test_prefill_then_decode_equals_one_process(demo_model, llm, kind):
    """The prefill role samples the first token under the grammar; the decode role advances
    its own matcher over it (``activate``) and goes on. KV moves between the two engines'
    caches as the transfer would put it: the prompt's blocks, layer by layer."""
    params = SamplingParams(temperature=0, max_tokens=48, structured_output=SPECS[kind])
    prompt = llm.tokenizer(PROMPTS[0]).input_ids
    whole = llm.generate(prompt, params)[0].outputs[0]
    seq, _ = prefill_then_decode(demo_model, prompt, params)
    assert seq.output_token_ids == whole.token_ids and seq.finish_reason == whole.finish_reason == "stop"


# A reasoning model's thinking ends with these tokens (" thou Rome"): the grammar binds only
# after them. The demo model writes them at output 7-8 of PROMPTS[0]; " Rome" alone comes at 1.
THOU_ROME = (345, 790)


def test_a_grammar_after_reasoning_binds_only_once_the_thinking_ends(llm, hf_model):
    """Up to ``reasoning_end`` the output is what it is unconstrained; after it, what
    transformers writes under the grammar from there."""
    prompt = llm.tokenizer(PROMPTS[0]).input_ids
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=48))[0].outputs[0].token_ids
    thinking = free[: free.index(THOU_ROME[1], 2) + 1]
    assert thinking[-2:] == list(THOU_ROME)
    for kind in ("json", "regex", "choice"):
        spec = replace(SPECS[kind], reasoning_end=THOU_ROME)
        for async_scheduling in (False, True):
            llm.core.async_scheduling = async_scheduling
            out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=96, structured_output=spec))[0].outputs[0]
            ids = torch.tensor([prompt + thinking])
            processor = xgr.contrib.hf.LogitsProcessor(llm.core.structured_outputs.compile(spec))
            answer = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=96 - len(thinking), logits_processor=[processor])[0, ids.shape[1]:]
            assert out.token_ids == thinking + answer.tolist(), (kind, async_scheduling, out.text)
            assert out.finish_reason == "stop"
            assert follows(spec, llm.tokenizer.decode(out.token_ids[len(thinking):], skip_special_tokens=True))
    never = replace(SPECS["regex"], reasoning_end=(1000, 1001))
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=48, structured_output=never))[0].outputs[0]
    assert out.token_ids == free and out.finish_reason == "length"
    assert llm.core.stats().used_blocks == 0


def test_a_grammar_after_reasoning_resumes_and_splits_roles_as_one_process(demo_model, llm):
    """Resumed inside the thinking or after it, and with the first token sampled by the prefill
    role (free: still thinking), the output is what one process writes."""
    spec = replace(SPECS["json"], reasoning_end=THOU_ROME)
    params = SamplingParams(temperature=0, max_tokens=96, structured_output=spec)
    prompt = llm.tokenizer(PROMPTS[0]).input_ids
    whole = llm.generate(prompt, params)[0].outputs[0]
    for k in (1, 8, 9, 14):
        (seq,) = llm.core.add_request(f"resumed-{k}", prompt, params, whole.token_ids[:k])
        while llm.core.has_unfinished():
            llm.core.step()
        assert seq.output_token_ids == whole.token_ids and seq.finish_reason == "stop", k
    seq, _ = prefill_then_decode(demo_model, prompt, params)
    assert seq.output_token_ids == whole.token_ids and seq.finish_reason == "stop"
    with pytest.raises(ValueError, match="token ids must be ints"):
        llm.core.add_request("bad-end", prompt, SamplingParams(structured_output=replace(spec, reasoning_end=(1 << 20,))))


def test_a_structural_tag_frees_the_text_until_a_trigger_starts_a_structure(llm):
    """vLLM's structural tag, in xgrammar's form and in vLLM's older one: the text is the model's own
    until it writes "Romeo", which starts the tagged structure; then free again."""
    free = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=24))[0].outputs[0].text
    assert free.startswith(", Romeo! wherefore")
    for tag in (TAGGED, TAGGED_OLDER):
        spec = StructuredOutputParams(structural_tag=json.dumps(tag))
        (out,) = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, structured_output=spec))
        text = out.outputs[0].text
        assert text.startswith(', Romeo!"Juliet" END') and follows(spec, text), text


def test_bad_grammars_and_combinations_are_refused(llm):
    for spec, message in [
        (StructuredOutputParams(structural_tag='{"type": "structural_tag", "format": {"type": "nonsense"}}'),
         "Format type not recognized"),
        (StructuredOutputParams(structural_tag='{"structures": [{"begin": "<a>"}], "triggers": ["<"]}'),
         "each need begin, schema and end"),
        (StructuredOutputParams(structural_tag="not json"), "invalid structured output"),
        (StructuredOutputParams(regex="(a"), "Regex parsing error"),
        (StructuredOutputParams(json='{"type": "nothing"}'), "Unsupported type"),
        (StructuredOutputParams(json="{not json"), "invalid structured output"),
        (StructuredOutputParams(grammar='root ::= "a" |'), "EBNF parser error"),
    ]:
        with pytest.raises(ValueError, match=message) as caught:
            llm.generate(PROMPTS[0], SamplingParams(max_tokens=4, structured_output=spec))
        assert "/project/" not in str(caught.value) and not str(caught.value).startswith("[")
    for fields in [{}, {"regex": "a", "choice": ("a",)}, {"json_object": True, "grammar": 'root ::= "a"'}]:
        with pytest.raises(ValueError, match="exactly one"):
            StructuredOutputParams(**fields)
    with pytest.raises(ValueError, match="at least one"):
        StructuredOutputParams(choice=())
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=1, structured_output=SPECS["regex"])
    bare = EngineCore(llm.runner, llm.config, [2], "demo")
    with pytest.raises(ValueError, match="no tokenizer for structured output"):
        bare.add_request("r", [1, 2, 3], SamplingParams(structured_output=SPECS["regex"]))
    assert llm.core.stats().used_blocks == 0
