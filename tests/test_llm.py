"""The offline ``LLM`` entry point on the demo checkpoint: greedy parity with
transformers through the whole engine (scheduler, block manager, prefix cache,
chunked prefill), seeded sampling, n > 1 and prompt logprobs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from baton.engine.block_manager import BlockRemoved, BlockStored
from baton.engine.hashing import block_extra, block_hashes, model_fingerprint
from baton.engine.llm import LLM
from baton.engine.sampling_params import SamplingParams
from baton.engine.stop_strings import first_stop, tokens_through_stop
from roles import prefill_then_decode

pytestmark = pytest.mark.model

PROMPTS = ["JULIET:\nO Romeo", "ROMEO:\nBut, soft! what light through yonder", "First Citizen:\nBefore we proceed", "HAMLET:\n"]
GREEDY = SamplingParams(temperature=0, max_tokens=20)
SCHEDULINGS = pytest.mark.parametrize("device,async_scheduling", [("cpu", False), ("cpu", True), pytest.param(
    "cuda", True, marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])],
    ids=["cpu-sync", "cpu-async", "cuda"])


@pytest.fixture(scope="module")
def hf_greedy(demo_model) -> dict[str, list[int]]:
    tok = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model).eval()
    out = {}
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20)
        out[prompt] = gen[0, ids.shape[1]:].tolist()
    return out


@pytest.fixture(scope="module")
def hf_model(demo_model):
    return AutoModelForCausalLM.from_pretrained(demo_model).eval()


def _hf_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """transformers' log-probs of each position's next token: row ``i`` predicts token ``i + 1``."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([token_ids])).logits[0].float(), -1)


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def _hf_prefix_equal(ours: list[int], theirs: list[int]) -> bool:
    """transformers stops at EOS; Baton also stops there (EOS included)."""
    return ours == theirs[: len(ours)] and (len(ours) == len(theirs) or ours[-1] == 2)


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        {},
        {"max_num_batched_tokens": 7, "block_size": 4},          # chunked prefill across several steps
        {"num_blocks": 24, "block_size": 4, "max_num_seqs": 2},  # tight pool: admission control and preemption
        {"async_scheduling": True, "max_num_batched_tokens": 7, "block_size": 4},
        {"async_scheduling": True, "num_blocks": 24, "block_size": 4, "max_num_seqs": 2},
    ],
    ids=["default", "chunked", "tight-pool", "async-chunked", "async-tight-pool"],
)
def test_greedy_batch_matches_transformers(demo_model, hf_greedy, engine_kwargs):
    llm = LLM(demo_model, **engine_kwargs)
    for prompt, ours in zip(PROMPTS, _tokens(llm.generate(PROMPTS, GREEDY))):
        assert _hf_prefix_equal(ours, hf_greedy[prompt]), (prompt, ours, hf_greedy[prompt])
    assert llm.core.stats().used_blocks == 0


def test_shared_prefix_is_served_from_the_cache(demo_model, hf_greedy):
    llm = LLM(demo_model, block_size=4)
    first = llm.generate(PROMPTS[1], GREEDY)[0]
    again = llm.generate(PROMPTS[1], GREEDY)[0]
    assert first.num_cached_tokens == 0 and again.num_cached_tokens >= 4
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert _hf_prefix_equal(again.outputs[0].token_ids, hf_greedy[PROMPTS[1]])


def test_reset_prefix_cache_makes_the_next_prompts_cold(demo_model):
    """vLLM's ``llm.reset_prefix_cache()``: True, every cached block dropped (and its removal queued
    for the index); the same prompt is computed afresh, to the same tokens, and cached again."""
    llm = LLM(demo_model, block_size=4)
    first = llm.generate(PROMPTS[1], GREEDY)[0]
    assert llm.generate(PROMPTS[1], GREEDY)[0].num_cached_tokens >= 8
    stored = {h for event in llm.core.drain_block_events() for h in event.block_hashes}
    assert llm.reset_prefix_cache() is True
    assert llm.core.stats().cached_blocks == 0
    assert llm.core.stats().free_blocks == llm.core.stats().total_blocks
    (removed,) = llm.core.drain_block_events()
    assert isinstance(removed, BlockRemoved) and set(removed.block_hashes) == stored
    cold = llm.generate(PROMPTS[1], GREEDY)[0]
    assert cold.num_cached_tokens == 0 and cold.outputs[0].token_ids == first.outputs[0].token_ids
    assert llm.generate(PROMPTS[1], GREEDY)[0].num_cached_tokens >= 8


def test_chat_renders_conversations_as_the_gateway_does(demo_model):
    """``LLM.chat`` (vLLM's): each conversation through the chat template, as the gateway renders a
    chat request (its options and a template of the caller's too), then generated; each output's
    ``prompt`` is the rendered text, as vLLM's."""
    from baton.services.gateway.tokenizer import GatewayTokenizer

    llm, params = LLM(demo_model), SamplingParams(temperature=0, max_tokens=8)
    ask = [{"role": "user", "content": "Speak, Romeo."}]
    answer = [*ask, {"role": "assistant", "content": "O, she doth teach"}]
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    cases = [(dict(), ask), (dict(add_generation_prompt=False, continue_final_message=True), answer),
             (dict(chat_template=template), ask)]
    for options, conversation in cases:
        gateway = GatewayTokenizer(demo_model, options.get("chat_template"))
        ids = gateway.encode_chat(conversation, **{k: v for k, v in options.items() if k != "chat_template"})
        out = llm.chat(conversation, params, **options)[0]
        assert out.prompt_token_ids == ids
        assert out.prompt == gateway.render_chat(conversation, **{k: v for k, v in options.items() if k != "chat_template"})
        assert out.outputs[0].token_ids == llm.generate([ids], params)[0].outputs[0].token_ids
    both = llm.chat([ask, answer], params, add_generation_prompt=False, continue_final_message=True)
    assert [o.prompt_token_ids for o in both] == [
        GatewayTokenizer(demo_model).encode_chat(c, add_generation_prompt=False, continue_final_message=True)
        for c in (ask, answer)]


def test_chat_reads_content_parts_and_tool_calls_as_vllm_does(demo_model):
    """Messages in OpenAI's form: text parts joined by newlines (vLLM's string content format, not
    the parts' repr), no content an empty string, a tool call's JSON arguments an object for the
    template; a part that is not text is refused."""
    llm, params = LLM(demo_model), SamplingParams(temperature=0, max_tokens=2)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Speak,"}, {"type": "text", "text": "Romeo."}]}]
    joined = [{"role": "user", "content": "Speak,\nRomeo."}]
    assert llm.chat(parts, params, use_tqdm=False)[0].prompt == llm.chat(joined, params, use_tqdm=False)[0].prompt
    template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
                "{% for c in m.tool_calls or [] %}{{ c.function.name }}:{{ c.function.arguments.city }}{% endfor %};{% endfor %}")
    call = {"id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Verona"}'}}
    conversation = [*joined, {"role": "assistant", "content": None, "tool_calls": [call]}]
    out = llm.chat(conversation, params, chat_template=template, add_generation_prompt=False, use_tqdm=False)[0]
    assert out.prompt == "[user] Speak,\nRomeo.;[assistant] get_weather:Verona;"
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    with pytest.raises(ValueError, match="content parts must be text; got image_url"):
        llm.chat([{"role": "user", "content": [parts[0]["content"][0], image]}], params, use_tqdm=False)


def test_a_tokenizer_from_another_directory_serves_as_the_models_own(demo_model, split_checkpoint):
    """vLLM's ``tokenizer``: a checkpoint without tokenizer files runs with one from elsewhere, which
    encodes text prompts, renders chats and compiles structured outputs' grammars."""
    from baton.engine.sampling_params import StructuredOutputParams

    model, tokenizer = split_checkpoint
    with pytest.raises((OSError, ValueError)):
        LLM(model, num_blocks=32)
    split, whole = LLM(model, tokenizer=tokenizer, num_blocks=32), LLM(demo_model, num_blocks=32)
    names = StructuredOutputParams(choice=["Romeo", "Juliet", "Mercutio"])
    for params in (SamplingParams(temperature=0, max_tokens=8), SamplingParams(temperature=0, structured_output=names)):
        assert [o.outputs[0].text for o in split.generate(["JULIET:\nO Romeo", "ROMEO:\n"], params)] == \
               [o.outputs[0].text for o in whole.generate(["JULIET:\nO Romeo", "ROMEO:\n"], params)]
    chat = [{"role": "user", "content": "Speak, Romeo."}]
    out = split.chat(chat, SamplingParams(temperature=0, max_tokens=8))[0]
    assert out.outputs[0].token_ids == whole.chat(chat, SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].token_ids
    assert split.generate("ROMEO:\n", SamplingParams(temperature=0, structured_output=names))[0].outputs[0].text in names.choice


@SCHEDULINGS
def test_stop_strings_and_vllms_prompt_and_output_forms(demo_model, device, async_scheduling):
    """As vLLM's ``LLM``: a stop string ends the text where it first appears (cut before it, or
    after with ``include_stop_str_in_output``) and stops the sequence there; a stop token id is the
    ``stop_reason`` it gives; prompts may be vLLM's dicts, and outputs carry the prompt's text and,
    with log-probs, their sum. So too with a step in flight (async scheduling)."""
    llm = LLM(demo_model, device=device, num_blocks=64, async_scheduling=async_scheduling)
    greedy = SamplingParams(temperature=0, max_tokens=40)
    prompts = ["JULIET:\nO Romeo", "ROMEO:\n"]
    full = [o.outputs[0] for o in llm.generate(prompts, greedy)]
    assert all("\n" in o.text for o in full) and "Romeo" in full[0].text
    for stop, include in ((["\n", "Romeo"], False), ("\n", True)):
        params = SamplingParams(temperature=0, max_tokens=40, stop=stop, include_stop_str_in_output=include)
        outs = llm.generate([{"prompt": prompts[0]}, {"prompt_token_ids": llm.get_tokenizer()(prompts[1]).input_ids}],
                            sampling_params=params, use_tqdm=True)
        assert [o.prompt for o in outs] == [prompts[0], None]
        for out, whole in zip(outs, full):
            sample = out.outputs[0]
            hit = min((whole.text.find(s), s) for s in params.stop if s in whole.text)
            assert sample.text == whole.text[: hit[0] + (len(hit[1]) if include else 0)]
            assert (sample.finish_reason, sample.stop_reason) == ("stop", hit[1])
            assert sample.token_ids == whole.token_ids[: len(sample.token_ids)] < whole.token_ids   # stopped early
            # ... at the token that completed the stop string, not after it
            texts = [llm.get_tokenizer().decode(sample.token_ids[:k]) for k in (len(sample.token_ids) - 1, None)]
            assert [first_stop(t, params.stop) is not None for t in texts] == [False, True]
    stop_id = full[1].token_ids[4]
    by_id = llm.generate(prompts[1], SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_id], logprobs=0))
    sample = by_id[0].outputs[0]
    assert (sample.token_ids, sample.finish_reason, sample.stop_reason) == (full[1].token_ids[:5], "stop", stop_id)
    assert sample.cumulative_logprob == pytest.approx(sum(t.logprob for t in sample.logprobs)) and sample.cumulative_logprob < 0
    assert full[0].cumulative_logprob is None and full[0].stop_reason is None   # no log-probs asked; a length
    with pytest.raises(ValueError, match="prompt dict takes"):
        llm.generate({"text": "x"}, greedy)


@pytest.mark.unit
def test_the_tokens_through_a_stop_string_are_the_fewest_whose_text_holds_it():
    words = ["O", " Rom", "eo", ",", " Rom", "eo", "!"]
    decode = lambda ids: "".join(words[i] for i in ids)  # noqa: E731
    ids = list(range(len(words)))
    assert [tokens_through_stop(ids, decode, stops) for stops in (["Romeo"], ["o,"], ["O"], ["!"], ["Juliet"])] == \
        [3, 4, 1, 7, 7]
    assert tokens_through_stop([], decode, ["O"]) == 0


def test_generate_shows_a_progress_bar_unless_told_not_to(demo_model, capfd):
    """vLLM's ``use_tqdm`` default: a bar over the finished prompts on stderr."""
    llm = LLM(demo_model, num_blocks=16)
    params = SamplingParams(temperature=0, max_tokens=2)
    capfd.readouterr()
    llm.generate(PROMPTS[:2], params)
    assert "Generating: 100%" in capfd.readouterr().err
    llm.generate(PROMPTS[:2], params, use_tqdm=False)
    llm.embed(PROMPTS[0], use_tqdm=False)
    assert "Generating" not in capfd.readouterr().err
    counted = []

    class Counting(tqdm):   # vLLM's use_tqdm may be the bar's class
        def update(self, n: float | None = 1) -> bool | None:
            counted.append(n)
            return super().update(n)

    llm.generate(PROMPTS[:3], params, use_tqdm=Counting)
    assert sum(counted) == 3


def test_vllms_constructor_arguments_that_change_nothing_here_are_taken(demo_model):
    llm = LLM(demo_model, trust_remote_code=True, tensor_parallel_size=1, kv_cache_dtype="auto", enable_lora=True,
              dtype="auto", num_blocks=16)
    assert llm.generate("JULIET:", SamplingParams(temperature=0, max_tokens=2))[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="on one device"):
        LLM(demo_model, tensor_parallel_size=2)


@pytest.mark.parametrize("kv_cache_dtype, dtype", [("fp8", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_an_fp8_kv_cache_holds_each_key_and_value_in_a_byte(demo_model, kv_cache_dtype, dtype):
    """vLLM's ``kv_cache_dtype="fp8"``: the cache holds the keys and values rounded to 8-bit floats (the
    float32 demo model's in a quarter of the bytes, four times the blocks in the same memory), and
    greedy output follows the full-precision cache's closely (the same first tokens here)."""
    full, fp8 = LLM(demo_model), LLM(demo_model, kv_cache_dtype=kv_cache_dtype)
    assert all(cache.dtype == dtype for cache in fp8.runner.kv_caches)
    assert 4 * fp8.runner.block_bytes() == full.runner.block_bytes()
    assert fp8.runner.num_blocks >= 4 * full.runner.num_blocks
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = PROMPTS[0]
    want, got = full.generate(prompt, params)[0], fp8.generate(prompt, params)[0]
    assert got.outputs[0].token_ids[:4] == want.outputs[0].token_ids[:4]
    blocks = fp8.runner.kv_caches[0][: -(-len(got.prompt_token_ids) // fp8.runner.block_size)]
    assert blocks.float().abs().sum() > 0   # the prompt's keys and values were written, as 8-bit floats
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8"):
        LLM(demo_model, kv_cache_dtype="int8")


def test_prefix_cache_is_salted(demo_model):
    llm = LLM(demo_model, block_size=4)
    prompt, salted = PROMPTS[1], lambda salt: llm.generate(prompt, GREEDY, cache_salt=salt)[0]
    first = salted("tenant-a")
    assert first.num_cached_tokens == 0
    # The blocks go to the prefix index under the hashes the gateway computes for the salt.
    stored = [h for event in llm.core.drain_block_events() if isinstance(event, BlockStored) for h in event.block_hashes]
    expected = block_hashes(llm.tokenizer(prompt).input_ids, 4, block_extra(model_fingerprint(demo_model), None, "tenant-a"))
    assert stored[: len(expected)] == expected
    again, other, unsalted = salted("tenant-a"), salted("tenant-b"), salted(None)
    assert again.num_cached_tokens >= 8                                  # the same salt: reused
    assert other.num_cached_tokens == 0 and unsalted.num_cached_tokens == 0
    assert {tuple(o.outputs[0].token_ids) for o in (first, again, other, unsalted)} == {tuple(first.outputs[0].token_ids)}
    per_prompt = llm.generate([prompt, prompt], GREEDY, cache_salt=["tenant-b", "tenant-c"])
    assert per_prompt[0].num_cached_tokens >= 8 and per_prompt[1].num_cached_tokens == 0
    with pytest.raises(ValueError, match="must not be empty"):
        llm.generate(prompt, GREEDY, cache_salt="")


def test_prefill_and_decode_roles_with_a_salt(demo_model):
    llm = LLM(demo_model, block_size=4)
    prompt = llm.tokenizer(PROMPTS[1]).input_ids
    seq, decode = prefill_then_decode(demo_model, prompt, GREEDY, cache_salt="tenant-a")
    assert seq.cache_salt == "tenant-a"
    assert seq.output_token_ids == llm.generate(PROMPTS[1], GREEDY)[0].outputs[0].token_ids
    salted = block_hashes(prompt, 4, block_extra(model_fingerprint(demo_model), None, "tenant-a"))
    stored = [h for event in decode.drain_block_events() if isinstance(event, BlockStored) for h in event.block_hashes]
    assert stored[: len(salted)] == salted
    # The decode worker's cached prompt blocks serve a later reservation under the same salt only.
    for salt, reused in (("tenant-a", True), ("tenant-b", False), (None, False)):
        reserved = decode.reserve(f"again-{salt}", prompt, GREEDY, cache_salt=salt)
        assert (reserved.num_cached_tokens > 0) == reused, salt
        decode.abort(f"again-{salt}")


def test_n_samples_share_the_salt_and_the_prompt_blocks(demo_model):
    llm = LLM(demo_model, block_size=4)
    seqs = llm.core.add_request("r", llm.tokenizer(PROMPTS[2]).input_ids,
                                SamplingParams(temperature=1.0, max_tokens=4, n=3, seed=1), cache_salt="tenant-a")
    while llm.core.has_unfinished():
        llm.core.step()
    assert {seq.cache_salt for seq in seqs} == {"tenant-a"}
    assert seqs[0].num_cached_tokens == 0 and all(seq.num_cached_tokens >= 8 for seq in seqs[1:])


def test_seeded_sampling_is_reproducible_across_batches(demo_model):
    llm = LLM(demo_model)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234)
    alone = llm.generate(PROMPTS[0], params)[0].outputs[0].token_ids
    assert LLM(demo_model, async_scheduling=True).generate(PROMPTS[0], params)[0].outputs[0].token_ids == alone
    others = [SamplingParams(temperature=1.0, max_tokens=16, seed=s) for s in range(5)]
    batch = llm.generate([PROMPTS[2]] * 5 + [PROMPTS[0]], others + [params])
    assert batch[-1].outputs[0].token_ids == alone
    unseeded = {tuple(o.outputs[0].token_ids) for o in llm.generate([PROMPTS[3]] * 6, SamplingParams(temperature=1.5, max_tokens=16))}
    assert len(unseeded) > 1  # without a seed, samples differ


def test_fresh_engines_with_one_seed_sample_unseeded_requests_alike(demo_model):
    """``LLM(model, seed=N)`` (vLLM's ``--seed``): the same unseeded requests in the same order give
    the same tokens on a fresh engine seeded alike, each request its own sample."""
    params = SamplingParams(temperature=1.5, max_tokens=16)

    def samples(seed: int) -> list[list[int]]:
        return [o.outputs[0].token_ids for o in LLM(demo_model, seed=seed).generate([PROMPTS[3]] * 4, params)]

    first = samples(7)
    assert samples(7) == first and len({tuple(t) for t in first}) > 1
    assert samples(8) != first


def test_n_samples_share_the_prompt_blocks(demo_model):
    llm = LLM(demo_model, block_size=4)
    prompt = PROMPTS[1]
    out = llm.generate(prompt, SamplingParams(temperature=3.0, max_tokens=8, n=4, seed=7))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    texts = {tuple(c.token_ids) for c in out.outputs}
    assert len(texts) > 1
    # Child i is sampled with seed + i: the same as a lone request with that seed.
    lone = llm.generate(prompt, SamplingParams(temperature=3.0, max_tokens=8, seed=9))[0]
    assert lone.outputs[0].token_ids == out.outputs[2].token_ids
    assert lone.num_cached_tokens > 0
    assert llm.core.stats().used_blocks == 0


@SCHEDULINGS
def test_a_resumed_sequence_goes_on_as_it_would_have(demo_model, device, async_scheduling):
    """A sequence resumed after k of its tokens (as the gateway resumes one whose worker
    failed) samples what the uninterrupted one sampled next: the seed's index, the penalties
    and min_tokens count the resumed tokens as output. Once over the prefix cache that
    holds them, once computing everything."""
    params = SamplingParams(temperature=0.9, top_k=50, max_tokens=24, min_tokens=20, seed=11,
                            repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.4, logprobs=0)
    cached = LLM(demo_model, device=device, block_size=4, async_scheduling=async_scheduling)
    fresh = LLM(demo_model, device=device, block_size=4, async_scheduling=async_scheduling, enable_prefix_caching=False)
    prompt = cached.tokenizer(PROMPTS[2]).input_ids
    whole = cached.generate(prompt, params)[0].outputs[0]
    assert len(whole.token_ids) == 24 and whole.finish_reason == "length"
    for llm in (cached, fresh):
        for k in (1, 6, 13):
            (seq,) = llm.core.add_request(f"resumed-{k}", prompt, params, whole.token_ids[:k])
            while llm.core.has_unfinished():
                llm.core.step()
            assert seq.output_token_ids == whole.token_ids and seq.finish_reason == "length"
            assert [t.token_id for t in seq.output_logprobs] == whole.token_ids
            assert [t.logprob for t in seq.output_logprobs[k:]] == pytest.approx([t.logprob for t in whole.logprobs[k:]], abs=1e-3)
    assert cached.core.stats().used_blocks == fresh.core.stats().used_blocks == 0
    with pytest.raises(ValueError, match="fewer output tokens"):
        fresh.core.add_request("too-many", prompt, params, whole.token_ids)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_prompt_and_output_logprobs_match_transformers(demo_model, hf_model, async_scheduling):
    """Log-probs and their top alternatives as transformers' logits give them, in vLLM's forms too:
    ``logprobs`` and ``prompt_logprobs`` None unless asked for, the latter else None for the first
    token; each position a mapping of token ids to ``Logprob`` (the token itself, then the
    alternatives ranked 1 to k, each with its text as the tokenizer decodes it alone)."""
    llm = LLM(demo_model, async_scheduling=async_scheduling)
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2))[0]
    tok = AutoTokenizer.from_pretrained(demo_model)
    logprobs = _hf_logprobs(hf_model, out.prompt_token_ids + out.outputs[0].token_ids)
    n_prompt = len(out.prompt_token_ids)
    assert len(out.prompt_logprobs) == n_prompt and out.prompt_logprobs[0] is None
    for i, lp in enumerate(out.prompt_logprobs[1:]):
        token = out.prompt_token_ids[i + 1]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(logprobs[i, token].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == logprobs[i].topk(2).indices.tolist()
        assert (lp[token].logprob, lp[token].rank) == (lp.logprob, (logprobs[i] >= logprobs[i, token]).sum().item())
        assert list(lp) == [token, *(t for t, _ in lp.top if t != token)]
        assert [e.decoded_token for e in lp.values()] == [tok.decode([t]) for t in lp]
    for j, lp in enumerate(out.outputs[0].logprobs):
        row = logprobs[n_prompt - 1 + j]
        assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == row.topk(3).indices.tolist()
        assert {t: (e.logprob, e.rank) for t, e in lp.items()} == {t: (v, r) for r, (t, v) in enumerate(lp.top, 1)}   # greedy: the top one
        assert {t: e.decoded_token for t, e in lp.items()} == {t: tok.decode([t]) for t, _ in lp.top}
    assert tok.decode(out.outputs[0].token_ids)
    plain = llm.generate(PROMPTS[0], GREEDY)[0]
    assert plain.prompt_logprobs is None and plain.outputs[0].logprobs is None and plain.outputs[0].cumulative_logprob is None


def test_logprobs_of_minus_one_give_the_whole_vocabulary(demo_model, hf_model):
    """vLLM's ``logprobs=-1`` / ``prompt_logprobs=-1``: every token of the vocabulary, in
    transformers' order, where ``max_logprobs`` allows that many (-1: the vocabulary); refused
    in vLLM's words where it does not."""
    llm = LLM(demo_model, max_logprobs=-1)
    vocab = llm.runner.vocab_size
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=2, logprobs=-1, prompt_logprobs=-1))[0]
    logprobs = _hf_logprobs(hf_model, out.prompt_token_ids + out.outputs[0].token_ids)
    n_prompt = len(out.prompt_token_ids)
    rows = [(lp, logprobs[i]) for i, lp in enumerate(out.prompt_logprobs[1:])]
    rows += [(lp, logprobs[n_prompt - 1 + j]) for j, lp in enumerate(out.outputs[0].logprobs)]
    for lp, row in rows:
        assert len(lp.top) == len(lp) == vocab
        assert [t for t, _ in lp.top[:50]] == row.topk(50).indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(row.sort(descending=True).values.tolist(), abs=1e-4)
    with pytest.raises(ValueError, match=f"sample logprobs of {vocab}, which is greater than max allowed: 20"):
        LLM(demo_model).generate(PROMPTS[0], SamplingParams(max_tokens=2, logprobs=-1))
    with pytest.raises(ValueError, match="prompt_logprobs must be -1"):
        SamplingParams(prompt_logprobs=-2)


@pytest.mark.parametrize(
    "engine_kwargs",
    [{"block_size": 4}, {"block_size": 4, "max_num_batched_tokens": 7, "async_scheduling": True}],
    ids=["whole", "async-chunked"],
)
def test_prompt_logprobs_and_ranks_match_transformers_over_a_cached_prefix(demo_model, hf_model, engine_kwargs):
    """Every prompt token after the first gets its log-prob, its rank (how many tokens are at
    least as likely) and the top-k alternatives of transformers' logits, though the prompt's
    blocks sit in the prefix cache: prompt log-probs compute the whole prompt again."""
    llm = LLM(demo_model, **engine_kwargs)
    prompt = PROMPTS[1]
    llm.generate(prompt, GREEDY)
    assert llm.generate(prompt, GREEDY)[0].num_cached_tokens >= 8          # the prompt's blocks are cached
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3))[0]
    assert out.num_cached_tokens == 0
    ids = out.prompt_token_ids
    logprobs = _hf_logprobs(hf_model, ids)
    assert [lp.token_id for lp in out.prompt_logprobs[1:]] == ids[1:]
    ranks = []
    for row, lp in zip(logprobs, out.prompt_logprobs[1:]):
        ranks.append(lp.rank)
        assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)
        assert lp.rank == (row >= row[lp.token_id]).sum().item()
        top = row.topk(3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert min(ranks) == 1 and max(ranks) > 1          # the prompt has likely tokens and less likely ones
    assert llm.core.stats().used_blocks == 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_async_scheduling_samples_what_sync_scheduling_samples(demo_model, device):
    """Seeded sampling with every per-row option gives the same tokens and log-probs
    with a step in flight as without (on CUDA: the sampler paths that stage host
    tensors must not wait for the step in flight, and must not read stale data)."""
    llm = LLM(demo_model, device=device, num_blocks=256, max_num_seqs=8)
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, top_k=20, max_tokens=24, seed=1, logprobs=2),
        SamplingParams(temperature=1.2, min_p=0.05, repetition_penalty=1.2, max_tokens=24, seed=2, logprobs=0),
        SamplingParams(temperature=0.7, presence_penalty=0.5, frequency_penalty=0.3, min_tokens=6, max_tokens=24, seed=3,
                       logprobs=0),
        SamplingParams(temperature=0, max_tokens=17, logprobs=0),
    ]
    runs = []
    for async_scheduling in (True, False):
        llm.core.async_scheduling = async_scheduling
        runs.append([o.outputs[0] for o in llm.generate(PROMPTS, params)])
    assert len(runs[0][3].token_ids) == 17 and all(len(out.token_ids) >= 6 for out in runs[0])
    for ours, theirs in zip(*runs):
        assert ours.token_ids == theirs.token_ids and ours.finish_reason == theirs.finish_reason
        # Batches differ in their last rows (a finished sequence's row computed in vain), which moves float rounding.
        for a, b in zip(ours.logprobs, theirs.logprobs):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
    assert llm.core.stats().used_blocks == 0



@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_bad_words_and_allowed_tokens_match_transformers(demo_model, async_scheduling):
    """vLLM's ``bad_words`` and ``allowed_token_ids`` against transformers' ``bad_words_ids``
    and a prefix-constrained processor: the same greedy tokens."""
    tok = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model).eval()
    llm = LLM(demo_model, block_size=4, async_scheduling=async_scheduling)
    bad = [tok.encode(word, add_special_tokens=False) for word in (" Romeo", " the", ",", "!")]
    assert len(bad[0]) == 2
    allowed = sorted(set(tok.encode(" Romeo, O Juliet! the night is fair and sweet.\n", add_special_tokens=False)) | {2})
    changed = {"bad_words_ids": 0, "prefix_allowed_tokens_fn": 0}
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20))[0].outputs[0].token_ids
        for params, constraint in [
            (SamplingParams(temperature=0, max_tokens=20, bad_words_token_ids=bad), {"bad_words_ids": bad}),
            (SamplingParams(temperature=0, max_tokens=20, allowed_token_ids=allowed),
             {"prefix_allowed_tokens_fn": lambda batch, seen: allowed}),
        ]:
            theirs = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                                    **constraint)[0, ids.shape[1]:].tolist()
            ours = llm.generate(prompt, params)[0].outputs[0].token_ids
            assert _hf_prefix_equal(ours, theirs), (prompt, constraint.keys(), ours, theirs)
            changed[next(iter(constraint))] += ours != free
        sampled = llm.generate(prompt, SamplingParams(temperature=1.5, seed=4, max_tokens=32, allowed_token_ids=allowed,
                                                      bad_words_token_ids=bad))[0].outputs[0].token_ids
        assert set(sampled) <= set(allowed)
        prompt_ids = tok(prompt).input_ids
        text = prompt_ids + sampled      # no bad word ends in the output
        assert not any(text[end - len(word):end] == word for word in bad for end in range(len(prompt_ids) + 1, len(text) + 1))
    assert min(changed.values()) >= 2, changed        # each constraint changed most outputs
    assert llm.core.stats().used_blocks == 0


def test_priority_policy_serves_lower_priorities_first_with_the_same_tokens(demo_model):
    llm = LLM(demo_model, block_size=4, max_num_seqs=1, scheduling_policy="priority")
    params = SamplingParams(temperature=0, max_tokens=6)
    finished: list[str] = []
    for request_id, prompt, priority in [("late", PROMPTS[0], 3), ("first", PROMPTS[1], -1), ("second", PROMPTS[2], 0)]:
        llm.core.add_request(request_id, llm.tokenizer(prompt).input_ids, params, priority=priority)
    seqs = {rid: seq for rid, (seq,) in llm.core.requests.items()}
    while llm.core.has_unfinished():
        finished += [s.seq_id for s in llm.core.step() if s.is_finished]
    assert finished == ["first", "second", "late"]
    plain = LLM(demo_model, block_size=4)
    want = [o.outputs[0].token_ids for o in plain.generate(PROMPTS[:3], params)]
    assert [seqs[rid].output_token_ids for rid in ("late", "first", "second")] == want
    with pytest.raises(ValueError, match="scheduling policy"):
        plain.generate(PROMPTS[0], params, priority=[1])
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:3], params, priority=[2, 1, 0])] == want


@pytest.mark.model
def test_the_profile_step_runs_the_largest_step_over_a_scratch_cache(demo_model):
    """What sizing the KV cache by ``gpu_memory_utilization`` runs first: a step of
    ``max_num_batched_tokens`` prompt tokens, over a scratch cache (its bytes returned), that
    leaves the engine's own cache as it was."""
    from baton.engine.config import EngineConfig
    from baton.engine.model_runner import ModelRunner

    runner = ModelRunner(demo_model, EngineConfig(max_num_batched_tokens=300, block_size=16, num_blocks=8))
    before = [cache.clone() for cache in runner.kv_caches]
    assert runner.profile_step() == 19 * runner.block_bytes()            # 300 tokens: 19 blocks of 16
    assert all(torch.equal(a, b) for a, b in zip(before, runner.kv_caches))


@pytest.mark.unit
def test_kv_blocks_fill_the_device_share_beside_the_peak_or_fail_saying_why():
    from baton.engine.config import EngineConfig
    from baton.engine.model_runner import kv_blocks_in_share

    gib = 2**30
    assert kv_blocks_in_share(0.5, 80 * gib, 10 * gib, 70 * gib, 2**20, "cuda:0") == 30 * 1024
    with pytest.raises(ValueError, match="no room for a KV block"):
        kv_blocks_in_share(0.1, 80 * gib, 8 * gib, 70 * gib, 2**20, "cuda:0")
    with pytest.raises(ValueError, match="has 20.00 GiB free"):
        kv_blocks_in_share(0.9, 80 * gib, 10 * gib, 20 * gib, 2**20, "cuda:0")
    with pytest.raises(ValueError, match="on a CUDA device"):
        EngineConfig(gpu_memory_utilization=0.5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        EngineConfig(device="cuda", gpu_memory_utilization=1.5)


@pytest.mark.model
def test_per_prompt_arguments_must_give_one_per_prompt(demo_model):
    from baton.engine.sampling_params import SamplingParams as Params

    llm = LLM(demo_model, num_blocks=16)
    for kwargs, what in (({"sampling_params": [Params(max_tokens=2)]}, "sampling params"), ({"lora": [None]}, "LoRA adapters"),
                         ({"cache_salt": ["s"]}, "cache salts"), ({"priority": [0]}, "priorities")):
        with pytest.raises(ValueError, match=f"2 prompts but 1 {what}"):
            llm.generate(["JULIET:", "ROMEO:"], **kwargs)
    one = llm.generate(["JULIET:", "ROMEO:"], Params(max_tokens=2, temperature=0), cache_salt="s")
    assert [len(o.outputs[0].token_ids) for o in one] == [2, 2]


@pytest.mark.model
def test_bad_words_as_text_are_banned_at_the_start_and_after_a_space(demo_model):
    """vLLM's ``bad_words``, offline: each word's tokens as the text's start and after a space are
    banned, as if given as ``bad_words_token_ids``; the greedy output then leaves the word out."""
    llm = LLM(demo_model, num_blocks=32)
    tok = llm.get_tokenizer()
    free = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    word = next(w for w in free.text.split() if w.isalpha() and len(w) > 2)
    banned = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=20, bad_words=[word]))[0].outputs[0]
    sequences = [tok(text, add_special_tokens=False).input_ids for text in (word, " " + word)]
    by_ids = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=20, bad_words_token_ids=sequences))
    assert banned.token_ids == by_ids[0].outputs[0].token_ids != free.token_ids
    assert f" {word} " not in f" {banned.text} "
    with pytest.raises(ValueError, match="bad_words must hold more than whitespace"):
        SamplingParams(bad_words=[" "])


@pytest.mark.model
def test_skip_special_tokens_false_keeps_them_in_the_text_and_its_stop_strings(demo_model):
    """vLLM's ``skip_special_tokens``, offline: special tokens are left out of a sample's text by
    default; with it false they are written, and a stop string may hold one."""
    llm = LLM(demo_model, num_blocks=16)
    tokenizer = llm.get_tokenizer()
    eos = tokenizer.eos_token_id
    only_eos = {"temperature": 0, "max_tokens": 3, "ignore_eos": True, "allowed_token_ids": [eos]}
    (skipped,) = llm.generate(["JULIET:"], SamplingParams(**only_eos))
    (kept,) = llm.generate(["JULIET:"], SamplingParams(**only_eos, skip_special_tokens=False))
    assert skipped.outputs[0].token_ids == kept.outputs[0].token_ids == [eos] * 3
    assert skipped.outputs[0].text == "" and kept.outputs[0].text == tokenizer.eos_token * 3
    (stopped,) = llm.generate(["JULIET:"], SamplingParams(**only_eos, skip_special_tokens=False, stop=[tokenizer.eos_token]))
    assert (stopped.outputs[0].text, stopped.outputs[0].token_ids, stopped.outputs[0].stop_reason) == \
        ("", [eos], tokenizer.eos_token)


@pytest.mark.model
def test_detokenize_false_leaves_the_samples_without_text(demo_model):
    """vLLM's ``detokenize=False`` (its throughput benchmark's): the same tokens, no text; stop strings,
    found in the text, are refused with it."""
    llm = LLM(demo_model, num_blocks=16)
    greedy = {"temperature": 0, "max_tokens": 8}
    (text,) = llm.generate(["JULIET:"], SamplingParams(**greedy))
    (tokens,) = llm.generate(["JULIET:"], SamplingParams(**greedy, detokenize=False))
    assert tokens.outputs[0].token_ids == text.outputs[0].token_ids and text.outputs[0].text
    assert tokens.outputs[0].text == ""
    with pytest.raises(ValueError, match="stop strings need detokenize"):
        SamplingParams(detokenize=False, stop=["\n"])


@pytest.mark.model
def test_vllms_sampling_fields_that_change_nothing_offline_are_taken(demo_model):
    """vLLM's ``spaces_between_special_tokens``, ``output_kind`` and ``extra_args``: a ported
    ``SamplingParams`` is built, its ``extra_args`` kept, and it samples the tokens and text it
    samples without them (special tokens written, where the first would act)."""
    from baton.engine.sampling_params import RequestOutputKind

    llm = LLM(demo_model, num_blocks=16)
    eos = llm.get_tokenizer().eos_token_id
    base = {"temperature": 0, "max_tokens": 6, "skip_special_tokens": False, "logit_bias": {eos: 8.0}, "ignore_eos": True}
    ported = SamplingParams(**base, spaces_between_special_tokens=False, output_kind=RequestOutputKind.DELTA,
                            extra_args={"plugin": {"level": 2}})
    assert ported.extra_args == {"plugin": {"level": 2}}
    (plain,) = llm.generate(["JULIET:\nO Romeo"], SamplingParams(**base))
    (theirs,) = llm.generate(["JULIET:\nO Romeo"], ported)
    assert eos in plain.outputs[0].token_ids
    assert (theirs.outputs[0].token_ids, theirs.outputs[0].text) == (plain.outputs[0].token_ids, plain.outputs[0].text)
    assert theirs.finished


@pytest.mark.model
def test_vllms_structured_outputs_params_constrain_offline_generation(demo_model):
    """vLLM's names and forms: ``SamplingParams(structured_outputs=StructuredOutputsParams(...))``
    with the schema as a dict and the choices as a list constrain the output as Baton's own
    ``structured_output`` does (the same tokens); giving both names is refused."""
    from baton.engine.sampling_params import StructuredOutputParams, StructuredOutputsParams

    llm = LLM(demo_model, num_blocks=32)
    schema = {"type": "object", "properties": {"name": {"enum": ["Romeo", "Juliet"]}}, "required": ["name"]}
    names = ["Romeo", "Juliet", "Mercutio"]
    for theirs, ours in ((StructuredOutputsParams(json=schema, disable_any_whitespace=True),
                          StructuredOutputParams(json=json.dumps(schema), disable_any_whitespace=True)),
                         (StructuredOutputsParams(choice=names), StructuredOutputParams(choice=tuple(names)))):
        assert theirs == ours and hash(theirs) == hash(ours)
        (got,) = llm.generate(["ROMEO:\n"], SamplingParams(temperature=0, max_tokens=32, structured_outputs=theirs))
        (want,) = llm.generate(["ROMEO:\n"], SamplingParams(temperature=0, max_tokens=32, structured_output=ours))
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        text = got.outputs[0].text
        assert (json.loads(text)["name"] in ("Romeo", "Juliet")) if theirs.json else text in names
    with pytest.raises(ValueError, match="not both"):
        SamplingParams(structured_output=StructuredOutputParams(regex="a"), structured_outputs=StructuredOutputParams(regex="b"))


@pytest.mark.model
def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens_as_vllm_does(demo_model):
    """vLLM's ``truncate_prompt_tokens``, offline: ``generate`` runs each prompt's last k tokens
    (greedy: the tokens the truncated prompt gives), -1 as many as fit beside ``max_tokens``;
    ``embed`` and ``score`` truncate each text so too; more than the context holds is refused."""
    llm = LLM(demo_model, num_blocks=64, max_model_len=24)
    ids = llm.get_tokenizer()("But, soft! what light through yonder window breaks? It is the east").input_ids
    assert len(ids) > 24
    greedy = SamplingParams(temperature=0, max_tokens=4)
    for keep, kept in ((6, 6), (-1, 20), (0, None)):
        if kept is None:
            with pytest.raises(ValueError, match="exceeds max_model_len"):
                llm.generate([ids], SamplingParams(temperature=0, max_tokens=4, truncate_prompt_tokens=keep))
            continue
        (out,) = llm.generate([ids], SamplingParams(temperature=0, max_tokens=4, truncate_prompt_tokens=keep))
        assert out.prompt_token_ids == ids[-kept:]
        assert out.outputs[0].token_ids == llm.generate([ids[-kept:]], greedy)[0].outputs[0].token_ids
    (embedded,) = llm.embed([ids], truncate_prompt_tokens=-1)
    assert embedded.prompt_token_ids == ids[-23:]
    assert embedded.outputs.embedding == pytest.approx(llm.embed([ids[-23:]])[0].outputs.embedding, abs=1e-6)
    (scored,) = llm.score([ids], [ids[:5]], truncate_prompt_tokens=4)
    pad = llm.get_tokenizer().pad_token_id
    assert scored.prompt_token_ids == ids[-4:] + [pad] + ids[1:5]
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate([ids], SamplingParams(truncate_prompt_tokens=25))
    with pytest.raises(ValueError, match="-1 or more"):
        SamplingParams(truncate_prompt_tokens=-2)


@pytest.mark.model
def test_generate_without_params_samples_with_the_generation_configs_defaults(demo_model, tmp_path):
    """As vLLM's ``LLM``: the model's generation_config.json sets the default params (its sampling
    keys only), ``"vllm"`` ignores it, and the override goes on top; set params are the caller's."""
    model = tmp_path / "model"
    shutil.copytree(demo_model, model)
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.0, "max_new_tokens": 7}))
    llm = LLM(str(model), num_blocks=32)
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.0, max_tokens=7)
    prompt = "ROMEO:\n"   # the model is unsure how it goes on: sampling at temperature 1 is not greedy here
    greedy = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=7))[0].outputs[0].token_ids
    assert llm.generate(prompt)[0].outputs[0].token_ids == greedy and len(greedy) == 7
    assert len(llm.generate(prompt, SamplingParams(temperature=0, max_tokens=3))[0].outputs[0].token_ids) == 3
    assert LLM(str(model), generation_config="vllm", num_blocks=32).get_default_sampling_params() == SamplingParams()
    over = LLM(str(model), override_generation_config={"temperature": 0.7, "max_new_tokens": None, "top_k": 5}, num_blocks=32)
    assert over.get_default_sampling_params() == SamplingParams(temperature=0.7, top_k=5)
    assert LLM(demo_model, num_blocks=32).get_default_sampling_params() == SamplingParams()   # the demo's sets none
    with pytest.raises(ValueError, match="^override_generation_config: top_p must be in"):
        LLM(str(model), override_generation_config={"top_p": 1.5}, num_blocks=32)
    with pytest.raises(ValueError, match="^override_generation_config: unknown key"):
        LLM(str(model), override_generation_config={"do_sample": True}, num_blocks=32)
    (model / "generation_config.json").write_text(json.dumps({"temperature": -1}))
    with pytest.raises(ValueError, match=f"^generation_config auto: {model}/generation_config.json: temperature must"):
        LLM(str(model), num_blocks=32)
