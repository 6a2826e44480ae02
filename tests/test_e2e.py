"""The whole system on loopback: real Redis, real gRPC workers in their own
processes, the real gateway, driven through the official ``openai`` client.

Two prefill workers and two decode workers, started as ``baton up`` starts them (the
decode workers with async scheduling, their default on a GPU). Every test runs once
with each KV transport: the gRPC stream, and UCX."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import grpc
import httpx
import pytest
import redis
import torch

from baton.engine.beam_search import BeamSearchParams
from baton.engine.hashing import block_extra, block_hashes, model_fingerprint
from baton.engine.llm import LLM
from baton.engine.pooling import PoolerConfig
from baton.engine.sampling_params import SamplingParams, StructuredOutputParams
from baton.protos import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from baton.services import launcher
from baton.services.gateway import tools
from baton.services.gateway.protocol import ChatCompletionRequest
from baton.services.redis_keys import WORKER_PREFIX, WorkerRecord, block_key
from lora_adapters import make_adapter

openai = pytest.importorskip("openai")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

PROMPTS = ["JULIET:\nO Romeo", "ROMEO:\nBut, soft! what light", "HAMLET:\nTo be, or not to be", "KING RICHARD III:\nNow is the winter"]
MODEL_NAME = "shakespeare-llama-5m"
MAX_LOGPROBS = 25   # past vLLM's default of 20: the systems here raise it with baton up --max-logprobs


class System:
    def __init__(self, model: str, kv_transport: str, prefill: int = 2, decode: int = 2,
                 decode_flags: tuple[str, ...] = (), scheduling_policy: str = "fcfs", up_flags: tuple[str, ...] = (),
                 gateway_flags: tuple[str, ...] = ()) -> None:
        args = launcher.build_parser().parse_args(
            ["up", "--model", model, "--port", str(launcher.free_port()), "--prefill", str(prefill),
             "--decode", str(decode), "--kv-transport", kv_transport, "--worker-metrics",
             "--scheduling-policy", scheduling_policy, *up_flags]
        )
        os.environ.pop("REDIS_URL", None)
        self.kv_transport = kv_transport
        self.scheduling_policy = scheduling_policy
        self.plan = launcher.make_plan(args)
        # The decode workers schedule asynchronously, as they do by default on a GPU.
        self.plan.decode = [cmd + ["--async-scheduling", *decode_flags] for cmd in self.plan.decode]
        self.plan.gateway += gateway_flags
        self.procs: list[subprocess.Popen] = []
        try:  # a system that does not come up is stopped, not left running past the test session
            for cmd in ([self.plan.redis] if self.plan.redis else []) + self.plan.prefill + self.plan.decode:
                self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
            self.gateway = subprocess.Popen(self.plan.gateway)
            self.procs.append(self.gateway)
            launcher.wait_ready(self.plan, self.procs, timeout=180)
        except BaseException:
            self.stop()
            raise
        self.client = openai.OpenAI(base_url=f"{self.plan.url}/v1", api_key="unused", max_retries=0, timeout=120)
        self.aclient = openai.AsyncOpenAI(base_url=f"{self.plan.url}/v1", api_key="unused", max_retries=0, timeout=300)

    def proc_at(self, address: str) -> subprocess.Popen:
        """The worker process listening at ``address``."""
        return next(p for p in self.procs if "--port" in p.args and address == f"127.0.0.1:{p.args[p.args.index('--port') + 1]}")

    def async_client(self) -> openai.AsyncOpenAI:
        """A client for the calling event loop (``aclient`` is bound to the first one that used it)."""
        return openai.AsyncOpenAI(base_url=f"{self.plan.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def worker_addrs(self, role: str) -> list[str]:
        flag = f"--{role}-addr"
        return [self.plan.gateway[i + 1] for i, a in enumerate(self.plan.gateway) if a == flag]

    def loads(self, skip: frozenset[str] = frozenset()) -> list[common_pb2.WorkerLoad]:
        """Every worker's load but those at the ``skip`` addresses."""
        out = []
        for role, stub_cls in (("prefill", prefill_pb2_grpc.PrefillStub), ("decode", decode_pb2_grpc.DecodeStub)):
            for addr in (a for a in self.worker_addrs(role) if a not in skip):
                with grpc.insecure_channel(addr) as channel:
                    out.append(stub_cls(channel).GetLoad(common_pb2.LoadRequest(), timeout=5))
        return out

    def wait_no_blocks_in_use(self, timeout: float = 20.0, skip: frozenset[str] = frozenset()) -> list[common_pb2.WorkerLoad]:
        deadline = time.monotonic() + timeout
        while True:
            loads = self.loads(skip)
            if all(l.used_blocks == 0 and l.running == 0 for l in loads) or time.monotonic() > deadline:
                return loads
            time.sleep(0.2)

    def stop(self) -> None:
        launcher.stop_all(self.procs, grace=20)


@pytest.fixture(scope="module", params=["grpc", "ucx"])
def system(demo_model, request):
    # Each policy once: every test runs under both, and test_request_priority checks each one's answer.
    s = System(demo_model, request.param, scheduling_policy="priority" if request.param == "grpc" else "fcfs",
               up_flags=("--max-logprobs", str(MAX_LOGPROBS)))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(demo_model) -> dict[str, list[int]]:
    llm = LLM(demo_model)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24))
    return {p: o.outputs[0].token_ids for p, o in zip(PROMPTS, outs)}


def test_greedy_matches_aggregated_engine_and_transformers(system, reference, demo_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model)
    hf = AutoModelForCausalLM.from_pretrained(demo_model).eval()
    for prompt in PROMPTS:
        out = system.client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=0, logprobs=0)
        ids = tok(prompt, return_tensors="pt").input_ids
        hf_ids = hf.generate(ids, do_sample=False, max_new_tokens=24)[0, ids.shape[1]:].tolist()
        expected = reference[prompt]
        assert expected == hf_ids[: len(expected)]
        assert out.choices[0].text == tok.decode(expected, skip_special_tokens=True)
    juliet = system.client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert juliet.choices[0].text.startswith(", Romeo! wherefore art thou Romeo?")


def test_logit_bias_bad_words_and_allowed_tokens_hold_on_both_workers(system, reference, demo_model):
    """The prefill worker samples the first token and the decode worker the rest: a forced
    token is every token, and banned ones (logit_bias, bad_words, tokens outside
    allowed_token_ids) give what the aggregated engine gives."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model)
    forced = reference[PROMPTS[0]][1]
    out = system.client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=4, temperature=0,
                                           logit_bias={str(forced): 100})
    assert out.choices[0].text == tok.decode([forced] * 4, skip_special_tokens=True)
    banned = {reference[PROMPTS[0]][0]: -100.0}
    want = LLM(demo_model).generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, logit_bias=banned))
    out = system.client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                           logit_bias={str(t): b for t, b in banned.items()})
    assert out.choices[0].text == want[0].outputs[0].text and want[0].outputs[0].token_ids[0] not in banned
    # vLLM's bad_words (each as it starts the text and after a space) and allowed_token_ids.
    words = [tok.encode(w, add_special_tokens=False) for w in ("Romeo", " Romeo", ",", " ,")]
    allowed = sorted(set(tok.encode(" O Romeo, thou art fair and sweet!\n", add_special_tokens=False)))
    want = LLM(demo_model).generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, bad_words_token_ids=words,
                                                               allowed_token_ids=allowed))[0].outputs[0]
    out = system.client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                           extra_body={"bad_words": ["Romeo", ","], "allowed_token_ids": allowed})
    assert out.choices[0].text == want.text != tok.decode(reference[PROMPTS[0]][:12], skip_special_tokens=True)
    assert "Romeo" not in want.text and "," not in want.text


def test_request_priority_follows_the_workers_policy(system, reference, demo_model):
    """Workers scheduling by priority serve a request's priority as any other; FCFS workers
    refuse one that is not 0 (a 400 saying how to turn it on), holding no blocks."""
    from transformers import AutoTokenizer

    want = AutoTokenizer.from_pretrained(demo_model).decode(reference[PROMPTS[1]], skip_special_tokens=True)

    def create(priority: int) -> str:
        return system.client.completions.create(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=24, temperature=0,
                                                extra_body={"priority": priority}).choices[0].text

    assert create(0) == want
    if system.scheduling_policy == "priority":
        assert create(-7) == create(3) == want
    else:
        with pytest.raises(openai.BadRequestError, match="scheduling-policy priority"):
            create(2)
    assert system.wait_no_blocks_in_use()[-1].used_blocks == 0


def test_responses_api_answers_as_chat_completions_do(system):
    """The OpenAI client's responses.create, whole and streamed, says what the chat completion
    with the same messages says."""
    messages = [{"role": "system", "content": "Speak as Juliet."}, {"role": "user", "content": "Romeo?"}]
    chat = system.client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=24, temperature=0)
    out = system.client.responses.create(model=MODEL_NAME, instructions="Speak as Juliet.", input="Romeo?",
                                         max_output_tokens=24, temperature=0)
    assert out.output_text == chat.choices[0].message.content
    assert (out.status == "incomplete") == (chat.choices[0].finish_reason == "length")
    assert out.usage.input_tokens == chat.usage.prompt_tokens and out.usage.output_tokens == chat.usage.completion_tokens
    events = list(system.client.responses.create(model=MODEL_NAME, instructions="Speak as Juliet.", input="Romeo?",
                                                 max_output_tokens=24, temperature=0, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == out.output_text
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert system.wait_no_blocks_in_use()[-1].used_blocks == 0


def test_embeddings_come_from_the_prefill_workers(system, demo_model):
    """/v1/embeddings through the OpenAI client (which asks for base64) and as floats: what the
    aggregated engine pools; the prompts' blocks are left to the prefix cache, none in use."""
    texts = [PROMPTS[0], PROMPTS[2] * 3, "x"]
    want = [out.outputs.embedding for out in LLM(demo_model).embed(texts)]
    out = system.client.embeddings.create(model=MODEL_NAME, input=texts)
    assert [d.index for d in out.data] == [0, 1, 2]
    for got, expected in zip(out.data, want):
        assert got.embedding == pytest.approx(expected, abs=1e-5)
    floats = httpx.post(f"{system.plan.url}/v1/embeddings", json={"model": MODEL_NAME, "input": texts[1]}, timeout=60).json()
    assert floats["data"][0]["embedding"] == pytest.approx(want[1], abs=1e-5)
    tokens = httpx.post(f"{system.plan.url}/tokenize", json={"model": MODEL_NAME, "prompt": texts[1]}, timeout=60).json()
    assert floats["usage"] == {"prompt_tokens": tokens["count"], "total_tokens": tokens["count"]}
    with grpc.insecure_channel(system.worker_addrs("prefill")[0]) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            prefill_pb2_grpc.PrefillStub(channel).Embed(prefill_pb2.EmbedRequest(request_id="e", prompt_token_ids=[]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty prompt" in caught.value.details()
    assert system.wait_no_blocks_in_use()[-1].used_blocks == 0


def test_score_and_rerank_are_cosines_of_the_systems_embeddings(system):
    """vLLM's /score and /rerank over the prefill workers: a pair's score is the cosine similarity
    of the two embeddings /v1/embeddings returns for its texts, and /rerank orders the documents
    by it, most similar first."""
    import torch

    query, documents = PROMPTS[0], [PROMPTS[1], PROMPTS[0] + ", Romeo!", PROMPTS[3], "Romeo", PROMPTS[2]]
    embedded = httpx.post(f"{system.plan.url}/v1/embeddings", json={"model": MODEL_NAME, "input": [query] + documents},
                          timeout=60).json()
    vectors = [torch.tensor(d["embedding"], dtype=torch.float64) for d in embedded["data"]]
    want = [torch.nn.functional.cosine_similarity(vectors[0], v, dim=0).item() for v in vectors[1:]]
    pair = httpx.post(f"{system.plan.url}/score", json={"model": MODEL_NAME, "text_1": query, "text_2": documents[1]},
                      timeout=60).json()
    assert pair["data"][0]["score"] == pytest.approx(want[1], abs=1e-6)
    scored = httpx.post(f"{system.plan.url}/v1/score", json={"model": MODEL_NAME, "text_1": query, "text_2": documents},
                        timeout=60).json()
    assert [d["score"] for d in scored["data"]] == pytest.approx(want, abs=1e-6)
    assert scored["usage"]["prompt_tokens"] == embedded["usage"]["prompt_tokens"]
    order = sorted(range(len(documents)), key=lambda i: -want[i])
    assert min(want[a] - want[b] for a, b in zip(order, order[1:])) > 1e-4     # an order that rounding cannot flip
    reranked = httpx.post(f"{system.plan.url}/rerank", json={"model": MODEL_NAME, "query": query, "documents": documents,
                                                             "top_n": 3}, timeout=60).json()
    assert [r["index"] for r in reranked["results"]] == order[:3]
    assert [r["document"]["text"] for r in reranked["results"]] == [documents[i] for i in order[:3]]
    assert [r["relevance_score"] for r in reranked["results"]] == pytest.approx([want[i] for i in order[:3]], abs=1e-6)
    assert system.wait_no_blocks_in_use()[-1].used_blocks == 0


def test_baton_up_hands_its_pooler_config_to_the_prefill_workers(demo_model):
    """``baton up --pooler-config`` MEAN, unnormalized: /v1/embeddings answers what the aggregated
    engine pools so, again when the prompt's blocks are already cached (MEAN computes every token)."""
    system = System(demo_model, "grpc", prefill=1, decode=1,
                    up_flags=("--pooler-config", '{"pooling_type": "MEAN", "normalize": false}'))
    try:
        texts = [PROMPTS[0] * 3, PROMPTS[2]]
        llm = LLM(demo_model, pooler=PoolerConfig("MEAN", normalize=False))
        want = [out.outputs.embedding for out in llm.embed(texts)]
        for _ in range(2):
            out = system.client.embeddings.create(model=MODEL_NAME, input=texts)
            for got, expected in zip(out.data, want, strict=True):
                assert got.embedding == pytest.approx(expected, abs=1e-4)
        assert sum(v * v for v in want[0]) != pytest.approx(1.0, abs=1e-3)    # not normalized
        assert system.wait_no_blocks_in_use()[-1].used_blocks == 0
    finally:
        system.stop()


def test_baton_up_moves_kv_over_nccl(demo_model):
    """``baton up --kv-transport nccl`` (gloo pair groups between CPU workers): greedy output is the
    aggregated engine's, prompts at once over pairs being set up and again over the pairs kept,
    and no block stays in use."""
    system = System(demo_model, "nccl", prefill=2, decode=1)
    try:
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        expected = [o.outputs[0].text for o in LLM(demo_model).generate(PROMPTS, params)]

        async def at_once() -> list[str]:
            async with system.async_client() as client:
                return await asyncio.gather(*(stream_completion(client, p, params, lambda: None) for p in PROMPTS))

        async def one_by_one() -> list[str]:
            async with system.async_client() as client:
                return [await stream_completion(client, p, params, lambda: None) for p in PROMPTS]

        assert asyncio.run(at_once()) == expected
        assert asyncio.run(one_by_one()) == expected
        assert system.wait_no_blocks_in_use()[-1].used_blocks == 0
    finally:
        system.stop()


def test_baton_up_with_an_fp8_kv_cache_serves_the_aggregated_fp8_engines_text_sending_a_byte_an_element(demo_model):
    """``baton up --kv-cache-dtype fp8`` (vLLM's): every worker keeps its KV in 8-bit floats, so greedy
    output through prefill, transfer and decode is the aggregated engine's with the same cache, and
    each prompt's blocks move as a byte a key or value element (a quarter of the float32 demo
    checkpoint's)."""
    system = System(demo_model, "grpc", prefill=1, decode=1, up_flags=("--kv-cache-dtype", "fp8"))
    try:
        llm = LLM(demo_model, kv_cache_dtype="fp8")
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        want = [o.outputs[0].text for o in llm.generate(PROMPTS, params)]
        got = []
        for prompt in PROMPTS:
            before = gateway_counter(system, "baton_kv_transfer_bytes_total")
            out = system.client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=0,
                                                   extra_body={"ignore_eos": True})
            blocks = -(-out.usage.prompt_tokens // llm.runner.block_size)
            assert gateway_counter(system, "baton_kv_transfer_bytes_total") - before == blocks * llm.runner.block_bytes()
            got.append(out.choices[0].text)
        assert got == want
        assert 4 * llm.runner.block_bytes() == LLM(demo_model, num_blocks=1).runner.block_bytes()
        assert system.wait_no_blocks_in_use()[-1].used_blocks == 0
    finally:
        system.stop()


def test_a_decode_worker_with_other_weight_quantization_refuses_the_prefill_workers_kv(demo_model):
    """A decode worker started with ``--quantization fp8`` beside a prefill worker without it: KV
    computed by the full-precision weights must not continue under FP8 ones, so the transfer is
    refused at its handshake, naming the field, and the request fails with that message; no block
    is left held."""
    system = System(demo_model, "grpc", prefill=1, decode=1, decode_flags=("--quantization", "fp8"))
    try:
        with pytest.raises(openai.APIStatusError, match="weight_quantization is '' here but 'fp8' at the peer") as err:
            system.client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=4, temperature=0)
        assert err.value.status_code == 503
        assert system.wait_no_blocks_in_use()[-1].used_blocks == 0
    finally:
        system.stop()


@pytest.mark.parametrize("family", ["gemma2", "qwen2-moe"])
def test_baton_up_serves_a_random_checkpoint_as_transformers_generates(demo_model, tmp_path, family):
    """Through prefill, KV transfer and decode, greedy text and each token's logprob are
    transformers' (a random checkpoint beside the demo tokenizer; it repeats itself, so the
    logprobs are what tell a window kept from one lost): Gemma 2's sliding windows (8 keys here, on
    every other layer), soft caps, GeGLU and four norms a layer; Qwen2-MoE's experts, its shared
    expert and a dense layer beside a sparse one."""
    from transformers import AutoTokenizer, Gemma2Config, Qwen2MoeConfig

    from test_model_parity import SMALL, random_checkpoint

    shape = {**SMALL, "vocab_size": 1024, "num_key_value_heads": 2, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    config = (Gemma2Config(**shape, head_dim=32, sliding_window=8, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
              if family == "gemma2" else
              Qwen2MoeConfig(**shape, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                             shared_expert_intermediate_size=48, mlp_only_layers=[1], use_sliding_window=False))
    hf = random_checkpoint(family, tmp_path, config)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(demo_model) / name, tmp_path / name)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    system = System(str(tmp_path), "grpc", prefill=1, decode=1)
    try:
        model = system.client.models.list().data[0].id
        for prompt in (PROMPTS[0], PROMPTS[1] + "\n" + PROMPTS[2]):   # 7 and 27 tokens: within a window and past it
            ids = tok(prompt, return_tensors="pt").input_ids
            with torch.inference_mode():
                gen = hf.generate(ids, do_sample=False, max_new_tokens=16, output_logits=True, return_dict_in_generate=True)
            want = gen.sequences[0, ids.shape[1]:].tolist()
            want_logprobs = [float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(gen.logits, want)]
            out = system.client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, logprobs=0)
            assert out.choices[0].text == tok.decode(want, skip_special_tokens=True)
            assert out.choices[0].logprobs.token_logprobs == pytest.approx(want_logprobs, abs=1e-4)
        assert system.wait_no_blocks_in_use()[-1].used_blocks == 0
    finally:
        system.stop()


def test_baton_up_serves_an_fp8_checkpoint_as_transformers_computes_it(demo_model, tmp_path):
    """An FP8 checkpoint (LLM Compressor's per-channel FP8-dynamic form) through prefill, KV transfer and
    decode: greedy text is transformers' with the weights dequantized and each linear layer's input
    rounded to E4M3 per token, as W8A8 computes, and each token's logprob the aggregated engine's.
    (Against transformers the logprobs drift: where Baton's and transformers' float32 sums differ in
    their last bit, an input can round to the next E4M3 value, and decode steps carry that on;
    ``test_quantization`` compares logits where none does.)"""
    from transformers import AutoTokenizer, LlamaConfig

    from test_model_parity import SMALL, random_checkpoint
    from test_quantization import compressed_tensors, fake_quantized_transformers, write_fp8_checkpoint

    config = LlamaConfig(**{**SMALL, "vocab_size": 1024}, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    hf = random_checkpoint("llama", tmp_path / "float", config)
    model_dir = tmp_path / "fp8"
    hf = fake_quantized_transformers(hf, write_fp8_checkpoint(tmp_path / "float", model_dir, compressed_tensors(), True))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(demo_model) / name, model_dir / name)
    tok = AutoTokenizer.from_pretrained(model_dir)
    llm = LLM(str(model_dir))
    system = System(str(model_dir), "grpc", prefill=1, decode=1)
    try:
        model = system.client.models.list().data[0].id
        for prompt in (PROMPTS[0], PROMPTS[1] + "\n" + PROMPTS[2]):
            ids = tok(prompt, return_tensors="pt").input_ids
            with torch.inference_mode():
                want = hf.generate(ids, do_sample=False, max_new_tokens=16)[0, ids.shape[1]:].tolist()
            engine = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, logprobs=0))[0].outputs[0]
            out = system.client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, logprobs=0)
            assert out.choices[0].text == tok.decode(want, skip_special_tokens=True) == engine.text
            assert out.choices[0].logprobs.token_logprobs == pytest.approx([t.logprob for t in engine.logprobs], abs=1e-5)
        assert system.wait_no_blocks_in_use()[-1].used_blocks == 0
    finally:
        system.stop()


def test_prompts_short_enough_are_computed_on_the_decode_worker_alone(demo_model):
    """``baton up --max-local-prefill-length 24``: the four short prompts, at once, each go to the
    decode worker alone, and their greedy output (and prompt log-probs) are the aggregated
    engine's; a prompt of 6 blocks goes to the prefill worker, and once the decode worker has
    cached its blocks (published to Redis) the same prompt is computed there, past the cached
    prefix. No block stays in use."""
    system = System(demo_model, "grpc", prefill=1, decode=1, up_flags=("--max-local-prefill-length", "24"))
    try:
        llm = LLM(demo_model)
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        expected = [o.outputs[0].text for o in llm.generate(PROMPTS, params)]

        async def at_once() -> list[str]:
            async with system.async_client() as client:
                return await asyncio.gather(*(stream_completion(client, p, params, lambda: None) for p in PROMPTS))

        assert asyncio.run(at_once()) == expected
        assert [gateway_counter(system, "baton_prefills_total", {"where": w}) for w in ("local", "remote")] == [4, 0]

        body = {"model": MODEL_NAME, "prompt": PROMPTS[1], "max_tokens": 2, "temperature": 0, "prompt_logprobs": 2}
        entries = httpx.post(f"{system.plan.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["prompt_logprobs"]
        want = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2))[0].prompt_logprobs
        assert [{int(k): v["logprob"] for k, v in e.items()} for e in entries[1:]] == [
            pytest.approx({lp.token_id: lp.logprob} | dict(lp.top), abs=1e-4) for lp in want[1:]]

        prompt = list(range(300, 396))   # 6 blocks of 16
        fingerprint = model_fingerprint(demo_model)
        keys = [block_key(fingerprint, h) for h in block_hashes(prompt, 16, fingerprint)]
        want_text = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
        usage = []
        prefill_times = lambda: [gateway_counter(system, f"baton_request_prefill_time_seconds_{s}") for s in ("count", "sum")]  # noqa: E731
        for where in ("remote", "local"):
            before, timed = gateway_counter(system, "baton_prefills_total", {"where": where}), prefill_times()
            out = system.client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=8, temperature=0)
            assert out.choices[0].text == want_text
            assert gateway_counter(system, "baton_prefills_total", {"where": where}) - before == 1
            count, total = prefill_times()
            assert count == timed[0] + 1 and total > timed[1]   # timed by the worker that prefilled it
            usage.append(out.usage.prompt_tokens_details.cached_tokens)
            with redis.Redis.from_url(system.plan.redis_url) as r:   # the decode worker's cached blocks, published
                wait_for_holders(r, keys, 2)
        assert usage[1] >= 80
        assert system.wait_no_blocks_in_use()[-1].used_blocks == 0
    finally:
        system.stop()


def test_decode_worker_tickets_name_the_transport(system):
    with grpc.insecure_channel(system.worker_addrs("decode")[0]) as channel:
        stub = decode_pb2_grpc.DecodeStub(channel)
        request = decode_pb2.ReserveRequest(request_id="ticket-probe", prompt_token_ids=list(range(500, 539)),
                                            params=common_pb2.SamplingParams(max_tokens=4))
        ticket = stub.Reserve(request, timeout=10)
        stub.Abort(common_pb2.AbortRequest(request_id="ticket-probe"), timeout=10)
    host, port = ticket.address.rsplit(":", 1)
    assert ticket.transport == system.kv_transport and host == "127.0.0.1" and int(port) > 0
    assert len(ticket.block_ids) == 3 and ticket.cached_blocks == 0  # 39 new tokens in blocks of 16
    assert (ticket.address == system.worker_addrs("decode")[0]) == (system.kv_transport == "grpc")
    assert system.wait_no_blocks_in_use()[-1].used_blocks == 0


def test_streaming_equals_non_streaming(system):
    for prompt in PROMPTS[:2]:
        full = system.client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=20, temperature=0)
        chunks = list(system.client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True}
        ))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [full.choices[0].finish_reason]
        assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_prompt_logprobs_are_the_aggregated_engines(system, demo_model):
    """vLLM's ``prompt_logprobs``, computed by a prefill worker that holds the prompt's blocks in
    its prefix cache (the plain request before left them there): every prompt token's log-prob,
    rank and top-k alternatives are the aggregated engine's, on each of the n choices; k is past
    vLLM's default limit of 20, which ``baton up --max-logprobs`` raised on every process (the
    prefill worker scores the prompt, the decode worker the output)."""
    prompt = "HAMLET:\nTo be, or not to be, that is the question: whether 'tis nobler in the mind"
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 4, "temperature": 0}
    assert httpx.post(f"{system.plan.url}/v1/completions", json=body, timeout=60).status_code == 200
    k = MAX_LOGPROBS
    out = httpx.post(f"{system.plan.url}/v1/completions", json={**body, "prompt_logprobs": k, "logprobs": k, "n": 2},
                     timeout=60).json()
    llm = LLM(demo_model, max_logprobs=MAX_LOGPROBS)
    want = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=k, logprobs=k))[0]
    assert len(want.prompt_token_ids) > 17 and len(out["choices"]) == 2
    for choice in out["choices"]:
        top = choice["logprobs"]["top_logprobs"]
        assert [len(t) for t in top] == [k] * 4
        for got, lp in zip(top, want.outputs[0].logprobs):
            assert got == pytest.approx({llm.tokenizer.decode([t]): v for t, v in lp.top}, abs=1e-4)
        entries = choice["prompt_logprobs"]
        assert len(entries) == len(want.prompt_token_ids) and entries[0] is None
        for entry, lp in zip(entries[1:], want.prompt_logprobs[1:]):
            expected = {lp.token_id: (lp.logprob, lp.rank)} | {t: (v, r) for r, (t, v) in enumerate(lp.top, 1) if t != lp.token_id}
            assert {int(key): v["rank"] for key, v in entry.items()} == {t: r for t, (_, r) in expected.items()}
            for token_id, (logprob, _) in expected.items():
                assert entry[str(token_id)]["logprob"] == pytest.approx(logprob, abs=1e-4)
                assert entry[str(token_id)]["decoded_token"] == llm.tokenizer.decode([token_id])


def test_stop_reason_names_the_stop_token_or_string_the_workers_and_gateway_stopped_on(system, demo_model):
    """vLLM's ``stop_reason`` through the real workers: the ``stop_token_ids`` token the decode
    worker stopped on (the greedy output's fourth token), the stop string the gateway matched,
    and none for a length finish."""
    llm = LLM(demo_model)
    greedy = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    token = greedy.token_ids[3]
    assert token not in greedy.token_ids[:3]
    body = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    by_token = httpx.post(f"{system.plan.url}/v1/completions", json={**body, "stop_token_ids": [token]}, timeout=60).json()
    assert [(c["finish_reason"], c["stop_reason"]) for c in by_token["choices"]] == [("stop", token)]
    assert by_token["usage"]["completion_tokens"] == 4
    word = greedy.text.split()[1]
    by_string = system.client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                                 stop=[word], extra_body={"ignore_eos": True})
    assert (by_string.choices[0].finish_reason, by_string.choices[0].model_extra["stop_reason"]) == ("stop", word)
    plain = httpx.post(f"{system.plan.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert (plain["finish_reason"], plain["stop_reason"]) == ("length", None)


def test_chat_completion(system):
    out = system.client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Speak, Romeo."}], max_tokens=16, temperature=0
    )
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content
    assert out.usage.completion_tokens > 0


def test_structured_output_matches_the_aggregated_engine(system, demo_model):
    """The prefill worker samples the first token under the grammar and the decode worker the
    rest, each with its own matcher: a JSON schema and a seeded n=3 choice give what the
    aggregated engine gives; a streamed chat answer is valid JSON; a bad regex is a 400."""
    llm = LLM(demo_model)
    person = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
              "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120}}}
    spec = StructuredOutputParams(json=json.dumps(person), disable_any_whitespace=True)
    want = llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=48, structured_output=spec))
    for prompt, expected in zip(PROMPTS, want):
        out = system.client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=48, temperature=0,
            extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": person}},
                        "structured_outputs": {"disable_any_whitespace": True}},
        )
        assert out.choices[0].text == expected.outputs[0].text and out.choices[0].finish_reason == "stop"
        assert set(json.loads(out.choices[0].text)) == {"name", "age"}
    names = ["Romeo", "Juliet", "Mercutio", "Tybalt"]
    choice = StructuredOutputParams(choice=tuple(names))
    want = llm.generate(PROMPTS[2], SamplingParams(n=3, seed=7, temperature=1.5, max_tokens=8, structured_output=choice))[0]
    out = system.client.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=8, n=3, seed=7, temperature=1.5,
                                           extra_body={"structured_outputs": {"choice": names}})
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [c.text for c in want.outputs]
    chat = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "Who art thou?"}], max_tokens=48, temperature=0,
                response_format={"type": "json_object"}, extra_body={"structured_outputs": {"disable_any_whitespace": True}})
    full = system.client.chat.completions.create(**chat)
    streamed = "".join(c.choices[0].delta.content or "" for c in system.client.chat.completions.create(**chat, stream=True) if c.choices)
    assert streamed == full.choices[0].message.content and full.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(streamed), dict)
    # vLLM's structural tag (its older form): free text until the model writes "Romeo", then the structure.
    tag = {"type": "structural_tag", "structures": [{"begin": "Romeo!", "schema": {"enum": ["Juliet", "Tybalt"]},
                                                     "end": " END"}], "triggers": ["Romeo"]}
    spec = StructuredOutputParams(structural_tag=json.dumps(tag))
    (want,) = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=16, structured_output=spec))
    want = want.outputs[0].text
    out = system.client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=16, temperature=0,
                                           extra_body={"response_format": tag})
    assert out.choices[0].text == want and want.startswith(', Romeo!"Juliet" END')
    with pytest.raises(openai.BadRequestError, match="Regex parsing error"):
        system.client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=4, extra_body={"structured_outputs": {"regex": "(a"}})
    assert system.wait_no_blocks_in_use()[-1].used_blocks == 0


def test_forced_tool_calls_match_the_aggregated_engine(system, demo_model):
    """tool_choice 'required' (one call) and a named function: the calls, streamed or not, are
    what the aggregated engine writes under the same grammar, over the prompt /tokenize gives."""
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 16}}, "required": ["city"], "additionalProperties": False}}}
    clock = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}}
    messages = [{"role": "user", "content": "What weather hath Verona?"}]
    ids = httpx.post(f"{system.plan.url}/tokenize", json={"model": MODEL_NAME, "messages": messages}, timeout=30).json()["tokens"]
    llm = LLM(demo_model)
    for tool_choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        request = dict(model=MODEL_NAME, messages=messages, tools=[weather, clock], tool_choice=tool_choice,
                       parallel_tool_calls=False, max_tokens=64, temperature=0)
        grammar = tools.grammar(ChatCompletionRequest(**request))
        want = json.loads(llm.generate(ids, SamplingParams(temperature=0, max_tokens=64, structured_output=grammar))[0].outputs[0].text)
        expected = [(c["name"], c["parameters"]) for c in want] if tool_choice == "required" else [("get_weather", want)]
        out = system.client.chat.completions.create(**request)
        assert out.choices[0].finish_reason == ("tool_calls" if tool_choice == "required" else "stop")
        assert [(c.function.name, json.loads(c.function.arguments)) for c in out.choices[0].message.tool_calls] == expected
        streamed: dict[int, list[str]] = {}
        for chunk in system.client.chat.completions.create(**request, stream=True):
            for piece in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                streamed.setdefault(piece.index, []).extend([piece.function.name or "", piece.function.arguments or ""])
        calls = [(parts[0], json.loads("".join(parts[1::2]))) for _, parts in sorted(streamed.items())]
        assert calls == expected
    assert system.wait_no_blocks_in_use()[-1].used_blocks == 0


def worker_ids(r: redis.Redis, role: str) -> set[str]:
    records = [WorkerRecord.from_json(raw) for raw in r.mget(list(r.scan_iter(f"{WORKER_PREFIX}*"))) if raw is not None]
    return {rec.worker_id for rec in records if rec.role == role}


def wait_for_holders(r: redis.Redis, keys: list[str], count: int, timeout: float = 10.0) -> list[set[str]]:
    """Workers publish their stored blocks in batches: poll until every key has ``count`` holders."""
    deadline = time.monotonic() + timeout
    while True:
        holders = [{m.decode() for m in r.smembers(k)} for k in keys]
        if all(len(h) >= count for h in holders) or time.monotonic() > deadline:
            return holders
        time.sleep(0.05)


def test_repeated_prompt_hits_the_worker_that_cached_it(system, demo_model):
    from transformers import AutoTokenizer

    prompt = "FIRST CITIZEN:\nBefore we proceed any further, hear me speak. " * 3
    first = system.client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens >= 64
    token_ids = AutoTokenizer.from_pretrained(demo_model)(prompt).input_ids
    assert len(token_ids) == first.usage.prompt_tokens
    fingerprint = model_fingerprint(demo_model)
    keys = [block_key(fingerprint, h) for h in block_hashes(token_ids, 16, fingerprint)]
    r = redis.Redis.from_url(system.plan.redis_url)
    # The prefill worker that ran it holds every full block of the prompt, and so does the decode worker.
    holders = wait_for_holders(r, keys, 2)
    for role in ("prefill", "decode"):
        ids = worker_ids(r, role)
        assert len(ids) == 2
        role_holders = [h & ids for h in holders]
        assert len(role_holders[0]) == 1 and all(h == role_holders[0] for h in role_holders), holders
    for _ in range(3):
        again = system.client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=4, temperature=0)
        cached = again.usage.prompt_tokens_details.cached_tokens
        # Only the worker that ran the prompt can serve it from its cache: the other one is cold.
        assert cached >= 48, cached
        assert again.choices[0].text == first.choices[0].text
    r.close()


def test_a_cache_salt_keeps_each_salts_cached_prefix_apart(system, demo_model):
    """A salted prompt's blocks are indexed under the salted hashes (on one prefill and one decode
    worker), which route it back to them: repeated under its salt it is served from the cache;
    under another salt, or none, it is computed anew (on either role), with the same output."""
    from transformers import AutoTokenizer

    prompt = "SECOND CITIZEN:\nWould you proceed especially against Caius Marcius? " * 3
    fingerprint, salted = model_fingerprint(demo_model), {"cache_salt": "tenant-a"}

    def complete(salt: str | None):
        return system.client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=4, temperature=0,
                                                extra_body={"cache_salt": salt})

    first = complete("tenant-a")
    assert first.usage.prompt_tokens >= 64 and first.usage.prompt_tokens_details.cached_tokens == 0
    token_ids = AutoTokenizer.from_pretrained(demo_model)(prompt).input_ids
    hashes = block_hashes(token_ids, 16, block_extra(fingerprint, None, salted["cache_salt"]))
    with redis.Redis.from_url(system.plan.redis_url) as r:
        holders = wait_for_holders(r, [block_key(fingerprint, h) for h in hashes], 2)
        for role in ("prefill", "decode"):
            assert all(len(h & worker_ids(r, role)) == 1 for h in holders), holders
        assert not any(r.exists(block_key(fingerprint, h)) for h in block_hashes(token_ids, 16, fingerprint))
    for _ in range(3):
        again = complete("tenant-a")
        assert again.usage.prompt_tokens_details.cached_tokens >= 48 and again.choices[0].text == first.choices[0].text
    for salt in ("tenant-b", None):
        other = complete(salt)
        assert other.usage.prompt_tokens_details.cached_tokens == 0 and other.choices[0].text == first.choices[0].text
    # A decode worker that ran it reserves the salted prompt's blocks from its cache under the same salt only.
    cached = {}
    for salt in ("tenant-a", "tenant-c"):
        for i, address in enumerate(system.worker_addrs("decode")):
            with grpc.insecure_channel(address) as channel:
                stub, rid = decode_pb2_grpc.DecodeStub(channel), f"salt-probe-{salt}-{i}"
                request = decode_pb2.ReserveRequest(request_id=rid, prompt_token_ids=token_ids, cache_salt=salt,
                                                    params=common_pb2.SamplingParams(max_tokens=4))
                cached[salt, i] = stub.Reserve(request, timeout=10).cached_blocks
                stub.Abort(common_pb2.AbortRequest(request_id=rid), timeout=10)
    assert max(cached["tenant-a", i] for i in range(2)) == len(token_ids) // 16
    assert [cached["tenant-c", i] for i in range(2)] == [0, 0]
    # Each prefill worker alone holds the prompt under a salt of its own: the gateway sends each
    # salt's requests there, as only the salted hashes can tell (load alone sends all to one).
    for i, address in enumerate(system.worker_addrs("prefill")):
        with grpc.insecure_channel(address) as channel:
            request = prefill_pb2.PrefillRequest(request_id=f"salt-seed-{i}", prompt_token_ids=token_ids,
                                                 params=common_pb2.SamplingParams(max_tokens=1), cache_salt=f"seed-{i}")
            stream = [prefill_pb2.PrefillInput(request=request)]
            assert len(list(prefill_pb2_grpc.PrefillStub(channel).Prefill(iter(stream), timeout=30))) == 1
        with redis.Redis.from_url(system.plan.redis_url) as r:
            seeded = block_hashes(token_ids, 16, block_extra(fingerprint, None, f"seed-{i}"))
            assert all(len(h) == 1 for h in wait_for_holders(r, [block_key(fingerprint, h) for h in seeded], 1))
    for _ in range(2):
        for i in range(2):
            assert complete(f"seed-{i}").usage.prompt_tokens_details.cached_tokens >= 48, i
    assert system.wait_no_blocks_in_use()[-1].used_blocks == 0


def test_baton_up_serves_lora_adapters_as_models(demo_model, tmp_path):
    """``baton up --lora-modules``: both roles load the adapters and the gateway lists them. A request
    naming one writes what the aggregated engine writes under it; its prompt's blocks are indexed
    under the adapter's hashes, which route it back to the prefill worker holding them, and no
    other adapter (nor the base model) reuses them. A model the gateway knows but the workers do
    not load (a misconfigured deployment) is a 404, as is one nobody knows."""
    from transformers import AutoTokenizer

    adapters = {"one": make_adapter(demo_model, tmp_path / "one", std=0.05),
                "two": make_adapter(demo_model, tmp_path / "two", rank=4, targets=("q_proj", "down_proj"), seed=1)}
    modules = [f"{name}={path}" for name, path in adapters.items()]
    system = System(demo_model, "grpc", prefill=2, decode=1, up_flags=("--lora-modules", *modules, "--max-loras", "2"),
                    gateway_flags=("--lora-modules", f"ghost={tmp_path}"))
    try:
        models = system.client.models.list().data
        assert [(m.id, getattr(m, "parent", None)) for m in models] == [
            (MODEL_NAME, None), ("one", MODEL_NAME), ("two", MODEL_NAME), ("ghost", MODEL_NAME)]
        llm = LLM(demo_model, lora_modules={name: str(path) for name, path in adapters.items()}, max_loras=2)
        prompt = "FIRST CITIZEN:\nBefore we proceed any further, hear me speak. " * 2
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        want = {lora: llm.generate(prompt, params, lora=lora)[0].outputs[0].text for lora in ("one", "two", None)}
        assert len(set(want.values())) == 3
        for lora in ("one", "two", None):
            out = system.client.completions.create(model=lora or MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0,
                                                   extra_body={"ignore_eos": True})
            assert out.choices[0].text == want[lora]
            assert out.usage.prompt_tokens_details.cached_tokens == 0       # no adapter reuses another's blocks
        token_ids = AutoTokenizer.from_pretrained(demo_model)(prompt).input_ids
        hashes = block_hashes(token_ids, 16, block_extra(model_fingerprint(demo_model), "one"))
        r = redis.Redis.from_url(system.plan.redis_url)
        holders = wait_for_holders(r, [block_key(model_fingerprint(demo_model), h) for h in hashes], 2)
        assert all(len(h & worker_ids(r, "prefill")) == 1 for h in holders), holders
        r.close()
        for _ in range(2):
            again = system.client.completions.create(model="one", prompt=prompt, max_tokens=16, temperature=0,
                                                     extra_body={"ignore_eos": True})
            assert again.choices[0].text == want["one"]
            assert again.usage.prompt_tokens_details.cached_tokens >= 32
        for model in ("ghost", "nope"):
            with pytest.raises(openai.NotFoundError) as err:
                system.client.completions.create(model=model, prompt=prompt, max_tokens=4)
            assert err.value.code == "model_not_found"
        assert system.wait_no_blocks_in_use()[-1].used_blocks == 0
    finally:
        system.stop()


def test_baton_up_loads_and_unloads_lora_adapters_while_serving(demo_model, tmp_path):
    """``baton up --allow-runtime-lora-updating``: an adapter loaded through the gateway is listed and
    writes what the engine writes with it loaded at start; one the workers cannot apply is a 400
    naming why; a decode worker restarted meanwhile is sent it before it serves again; unloaded,
    its name is a 404; other weights loaded under the name later reuse none of the old blocks."""
    one = make_adapter(demo_model, tmp_path / "one", std=0.05)
    two = make_adapter(demo_model, tmp_path / "two", rank=4, targets=("q_proj", "down_proj"), seed=1)
    big = make_adapter(demo_model, tmp_path / "big", rank=32)
    prompt = "FIRST CITIZEN:\nBefore we proceed any further, hear me speak. " * 2
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    llm = LLM(demo_model, lora_modules={"one": str(one), "two": str(two)}, max_loras=2)
    want = {lora: llm.generate(prompt, params, lora=lora)[0].outputs[0].text for lora in ("one", "two", None)}
    assert len(set(want.values())) == 3
    system = System(demo_model, "grpc", prefill=1, decode=1, up_flags=("--allow-runtime-lora-updating",))
    url = system.plan.url

    def update(route: str, **body: str) -> httpx.Response:
        return httpx.post(f"{url}/v1/{route}_lora_adapter", json=body, timeout=60)

    def complete(model: str):
        return system.client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0,
                                                extra_body={"ignore_eos": True})

    try:
        loaded = update("load", lora_name="sql", lora_path=str(one))
        assert (loaded.status_code, loaded.text) == (200, "Success: LoRA adapter 'sql' added successfully.")
        assert [(m.id, getattr(m, "parent", None)) for m in system.client.models.list().data] == [
            (MODEL_NAME, None), ("sql", MODEL_NAME)]
        assert complete("sql").choices[0].text == want["one"]
        refused = update("load", lora_name="big", lora_path=str(big))
        assert refused.status_code == 400 and "rank 32 is above max_lora_rank=16" in refused.json()["error"]["message"]
        assert update("load", lora_name="sql", lora_path=str(two)).status_code == 400       # loaded already

        decode = system.proc_at(system.worker_addrs("decode")[0])
        decode.terminate()
        decode.wait(timeout=60)
        deadline = time.monotonic() + 20
        while httpx.get(f"{url}/ready", timeout=5).json()["workers"]["decode"]:
            assert time.monotonic() < deadline, "the gateway did not notice the decode worker stop"
            time.sleep(0.2)
        system.procs[system.procs.index(decode)] = subprocess.Popen(decode.args, stdout=subprocess.DEVNULL)
        launcher.wait_ready(system.plan, system.procs, timeout=180)
        assert complete("sql").choices[0].text == want["one"]          # not a 404: it got the adapter first

        removed = update("unload", lora_name="sql")
        assert (removed.status_code, removed.text) == (200, "Success: LoRA adapter 'sql' removed successfully.")
        with pytest.raises(openai.NotFoundError) as err:
            complete("sql")
        assert err.value.code == "model_not_found"
        assert update("unload", lora_name="sql").status_code == 404
        assert [m.id for m in system.client.models.list().data] == [MODEL_NAME]

        assert update("load", lora_name="sql", lora_path=str(two)).status_code == 200
        again = complete("sql")
        assert again.choices[0].text == want["two"]
        assert again.usage.prompt_tokens_details.cached_tokens == 0    # none of the blocks computed under "one"
        assert complete(MODEL_NAME).choices[0].text == want[None]
        assert system.wait_no_blocks_in_use()[-1].used_blocks == 0
    finally:
        system.stop()


def test_a_second_gateway_serves_the_adapters_loaded_through_the_first(demo_model, tmp_path):
    """Two gateways on one Redis and the same workers (a gateway restarted is the second one): an
    adapter loaded through the first is listed and served by the second, which started after it,
    to the engine's text; unloaded through the second, the first stops listing it."""
    adapter = make_adapter(demo_model, tmp_path / "one", std=0.05)
    prompt = "FIRST CITIZEN:\nBefore we proceed any further, hear me speak. " * 2
    llm = LLM(demo_model, lora_modules={"one": str(adapter)})
    want = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), lora="one")[0].outputs[0].text
    system = System(demo_model, "grpc", prefill=1, decode=1, up_flags=("--allow-runtime-lora-updating",))
    second_port = launcher.free_port()
    cmd = list(system.plan.gateway)
    cmd[cmd.index("--port") + 1] = str(second_port)
    second_url = f"http://127.0.0.1:{second_port}"

    def listed(url: str) -> list[str]:
        return [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]]

    try:
        loaded = httpx.post(f"{system.plan.url}/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": str(adapter)},
                            timeout=60)
        assert loaded.status_code == 200, loaded.text
        system.procs.append(subprocess.Popen(cmd))
        launcher.wait_ready(replace(system.plan, url=second_url), system.procs, timeout=120)
        assert listed(second_url) == [MODEL_NAME, "sql"]
        body = {"model": "sql", "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        deadline = time.monotonic() + 10
        while (out := httpx.post(f"{second_url}/v1/completions", json=body, timeout=60)).status_code != 200:
            assert time.monotonic() < deadline, out.text      # until its first poll has found the workers holding it
            time.sleep(0.2)
        assert out.json()["choices"][0]["text"] == want
        assert httpx.post(f"{second_url}/v1/unload_lora_adapter", json={"lora_name": "sql"}, timeout=60).status_code == 200
        while "sql" in listed(system.plan.url):
            assert time.monotonic() < deadline + 10, "the first gateway still lists the unloaded adapter"
            time.sleep(0.2)
    finally:
        system.stop()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_baton_up_without_redis_computes_prompts_on_either_worker_and_loads_adapters(demo_model, tmp_path, device):
    """``baton up --no-redis`` (no Redis anywhere: routing by load alone) on ``device``: a prompt short
    enough for ``--max-local-prefill-length`` is computed on the decode worker, a longer one on the
    prefill worker, each to the aggregated engine's text; an adapter loaded at runtime writes what
    the engine writes with it loaded at start, on either path; ``/reset_prefix_cache`` answers and
    changes no text. On a GPU this is the serving paths' run on CUDA."""
    adapter = make_adapter(demo_model, tmp_path / "one", std=0.05)
    short, long = "JULIET:\nO Romeo", "FIRST CITIZEN:\nBefore we proceed any further, hear me speak. " * 2
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    llm = LLM(demo_model, device=device, lora_modules={"one": str(adapter)})
    want = {(p, lora): llm.generate(p, params, lora=lora)[0].outputs[0].text for p in (short, long) for lora in (None, "one")}
    del llm
    system = System(demo_model, "grpc", prefill=1, decode=1, up_flags=(
        "--no-redis", "--device", device, "--max-local-prefill-length", "24", "--allow-runtime-lora-updating", "--dev-mode"))
    url = system.plan.url

    def complete(prompt: str, model: str = MODEL_NAME) -> str:
        return system.client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0,
                                                extra_body={"ignore_eos": True}).choices[0].text

    def prefills() -> dict[str, float]:
        return {where: gateway_counter(system, "baton_prefills_total", {"where": where}) for where in ("local", "remote")}

    try:
        assert system.plan.redis is None and "--redis-url" not in system.plan.gateway
        assert complete(short) == want[(short, None)] and prefills() == {"local": 1, "remote": 0}
        assert complete(long) == want[(long, None)] and prefills() == {"local": 1, "remote": 1}
        loaded = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "one", "lora_path": str(adapter)}, timeout=60)
        assert loaded.status_code == 200, loaded.text
        assert [complete(p, "one") for p in (short, long)] == [want[(short, "one")], want[(long, "one")]]
        assert prefills() == {"local": 2, "remote": 2}
        assert httpx.post(f"{url}/reset_prefix_cache", timeout=60).status_code == 200
        assert [complete(p) for p in (short, long)] == [want[(short, None)], want[(long, None)]]
        assert system.wait_no_blocks_in_use()[-1].used_blocks == 0
    finally:
        system.stop()


def test_baton_up_without_prefix_caching_computes_every_prompt_in_full(demo_model):
    """``baton up --no-enable-prefix-caching`` (vLLM's switch): a prompt sent again is computed again
    (no cached tokens), to the aggregated engine's text; n > 1 and a prompt held by no cache
    still work, and every block is freed."""
    prompt = "FIRST CITIZEN:\nBefore we proceed any further, hear me speak. " * 2
    llm = LLM(demo_model)
    want = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].outputs[0].text
    system = System(demo_model, "grpc", prefill=1, decode=1, up_flags=("--no-redis", "--no-enable-prefix-caching"))
    try:
        for _ in range(2):
            out = system.client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0,
                                                   extra_body={"ignore_eos": True})
            assert out.choices[0].text == want and out.usage.prompt_tokens_details.cached_tokens == 0
        samples = system.client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=8, n=2, temperature=0,
                                                   extra_body={"ignore_eos": True})
        assert [c.text for c in samples.choices] == [want[: len(c.text)] for c in samples.choices]
        assert samples.usage.completion_tokens == 16
        assert system.wait_no_blocks_in_use()[-1].used_blocks == 0
    finally:
        system.stop()


def test_baton_up_resets_the_prefix_cache_in_dev_mode(demo_model):
    """``baton up --dev-mode``: a prompt sent again is served from the cache; after vLLM's
    ``POST /reset_prefix_cache`` (an empty 200) no worker holds a cached block, the Redis index
    lists none of the prompt's blocks, and the prompt is computed afresh, to the same text."""
    from transformers import AutoTokenizer

    prompt = "FIRST CITIZEN:\nBefore we proceed any further, hear me speak. " * 3
    fingerprint = model_fingerprint(demo_model)
    token_ids = AutoTokenizer.from_pretrained(demo_model)(prompt).input_ids
    keys = [block_key(fingerprint, h) for h in block_hashes(token_ids, 16, fingerprint)]
    system = System(demo_model, "grpc", prefill=1, decode=1, up_flags=("--dev-mode",))
    r = redis.Redis.from_url(system.plan.redis_url)

    def complete():
        return system.client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0)

    try:
        first = complete()
        assert all(len(h) == 2 for h in wait_for_holders(r, keys, 2))   # the prefill and the decode worker
        warm = complete()
        assert warm.usage.prompt_tokens_details.cached_tokens >= 48
        reset = httpx.post(f"{system.plan.url}/reset_prefix_cache", timeout=60)
        assert (reset.status_code, reset.content) == (200, b"")
        deadline = time.monotonic() + 10
        while any(r.exists(k) for k in keys) or any(load.cached_blocks for load in system.loads()):
            assert time.monotonic() < deadline, ([r.smembers(k) for k in keys], system.loads())
            time.sleep(0.05)
        cold = complete()
        assert cold.usage.prompt_tokens_details.cached_tokens == 0
        assert cold.choices[0].text == warm.choices[0].text == first.choices[0].text
        assert system.wait_no_blocks_in_use()[-1].used_blocks == 0
    finally:
        r.close()
        system.stop()


def gateway_counter(system, name: str, labels: dict[str, str] | None = None) -> float:
    """A sample of the gateway's metrics (0 for a labelled one not counted yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{system.plan.url}/metrics", timeout=5).text
    samples = (s for f in text_string_to_metric_families(text) for s in f.samples)
    return next((s.value for s in samples if s.name == name and s.labels == (labels or {})), 0.0)


def test_a_prompt_the_decode_worker_holds_sends_only_its_new_blocks(system, demo_model):
    """40 tokens are 3 blocks of 16; the second time, the decode worker already holds the
    two full ones, so only the last block of each layer moves."""
    prompt = list(range(300, 340))
    fingerprint = model_fingerprint(demo_model)
    keys = [block_key(fingerprint, h) for h in block_hashes(prompt, 16, fingerprint)]
    sent, texts = [], []
    for _ in range(2):
        before = gateway_counter(system, "baton_kv_transfer_bytes_total")
        out = system.client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=8, temperature=0)
        sent.append(gateway_counter(system, "baton_kv_transfer_bytes_total") - before)
        texts.append(out.choices[0].text)
        # Routing sees the decode worker's blocks once published, and its room (the other decode
        # worker's, equal when both are idle) once polled again.
        with redis.Redis.from_url(system.plan.redis_url) as r:
            wait_for_holders(r, keys, 2)
        time.sleep(1.0)
    assert sent[0] > 0 and sent[1] == sent[0] / 3
    assert texts[1] == texts[0]
    assert system.wait_no_blocks_in_use()[-1].used_blocks == 0


def test_n_samples_compute_and_send_the_prompt_once(system, demo_model):
    """n=4 over a 70-token prompt (four full blocks and a partial one): the later samples run
    beside the first, so the prompt's full blocks move once and each later sample sends only
    its partial block; the samples are the aggregated engine's (seeds seed + i)."""
    sent = []
    for prompt, n in ((list(range(700, 770)), 1), (list(range(600, 670)), 4)):
        before = gateway_counter(system, "baton_kv_transfer_bytes_total")
        out = system.client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, n=n, seed=5, temperature=1.0)
        sent.append(gateway_counter(system, "baton_kv_transfer_bytes_total") - before)
    want = LLM(demo_model).generate([prompt], SamplingParams(n=4, seed=5, temperature=1.0, max_tokens=12))[0]
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [c.text for c in want.outputs]
    block = sent[0] / 5
    assert sent[1] == (5 + 3) * block, sent                # not 4 x 5 blocks
    assert system.wait_no_blocks_in_use()[-1].used_blocks == 0


def test_beam_search_through_the_workers_is_the_aggregated_engines(system, demo_model):
    """vLLM's use_beam_search: every step's beams run on the prefill and decode workers as
    single-token requests (those past the first computed on the decode workers, which hold all but a
    block of them), and the choices are the aggregated engine's best beams. Scored by log-prob alone
    (length_penalty 0), one of the JULIET prompt's best ends in an EOS token."""
    want = LLM(demo_model).beam_search(PROMPTS[:2], BeamSearchParams(beam_width=3, max_tokens=8, length_penalty=0.0))
    assert "stop" in [s.finish_reason for s in want[0].sequences]
    local = gateway_counter(system, "baton_prefills_total", {"where": "local"})
    for prompt, expected in zip(PROMPTS[:2], want):
        out = system.client.completions.create(model=MODEL_NAME, prompt=prompt, n=3, max_tokens=8,
                                               extra_body={"use_beam_search": True, "length_penalty": 0.0})
        assert [c.text for c in out.choices] == [s.text for s in expected.sequences]
        assert [c.finish_reason for c in out.choices] == [s.finish_reason for s in expected.sequences]
    assert gateway_counter(system, "baton_prefills_total", {"where": "local"}) > local
    loads = system.wait_no_blocks_in_use()
    assert all(l.used_blocks == 0 and l.running == 0 for l in loads), loads


def test_32_concurrent_streams_sharing_a_request_id_complete_without_leaks(system):
    """Every stream names itself ``X-Request-Id: shared``, as a client's retries or a proxy may;
    the workers hold them apart."""
    async def one(i: int) -> str:
        stream = await system.aclient.completions.create(
            model=MODEL_NAME, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=16, temperature=0.8, seed=i, stream=True,
            extra_headers={"X-Request-Id": "shared"},
        )
        text, finish = "", None
        async for chunk in stream:
            assert chunk.id == "cmpl-shared"
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return finish

    async def run_all():
        return await asyncio.gather(*(one(i) for i in range(32)))

    finishes = asyncio.run(run_all())
    assert all(f in ("stop", "length") for f in finishes), finishes
    loads = system.wait_no_blocks_in_use()
    assert all(l.used_blocks == 0 and l.running == 0 for l in loads), loads


def test_client_disconnect_aborts_on_both_workers(system):
    stream = system.client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=1500, temperature=0.9, stream=True, extra_body={"ignore_eos": True},
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    loads = system.wait_no_blocks_in_use()
    assert all(l.used_blocks == 0 and l.running == 0 for l in loads), loads


def test_workers_serve_prometheus_metrics(system):
    from prometheus_client.parser import text_string_to_metric_families

    params = SamplingParams(temperature=0, max_tokens=8)

    async def at_once() -> list[str]:   # in flight together: routing spreads them over both decode workers
        async with system.async_client() as client:
            return await asyncio.gather(*(stream_completion(client, p, params, lambda: None) for p in PROMPTS))

    asyncio.run(at_once())
    system.wait_no_blocks_in_use()
    steps = {}
    for role in ("prefill", "decode"):
        for addr in system.worker_addrs(role):
            text = httpx.get(system.plan.metrics[(role, addr)], timeout=5).text
            samples = {(s.name, s.labels.get("state")): s.value
                       for family in text_string_to_metric_families(text) for s in family.samples}
            assert samples[("baton_worker_requests", "running")] == samples[("baton_worker_requests", "waiting")] == 0
            assert samples[("baton_worker_kv_blocks", "used")] == 0 and samples[("baton_worker_kv_usage_ratio", None)] == 0
            assert samples[("baton_worker_kv_blocks", "free")] + samples[("baton_worker_kv_blocks", "cached")] > 0
            n = samples[("baton_worker_engine_steps_total", None)]
            assert samples[("baton_worker_engine_step_seconds_count", None)] == n
            assert (samples[("baton_worker_tokens_total", None)] > 0) == (n > 0)
            counted = samples[("baton_worker_prompt_tokens_total" if role == "prefill" else "baton_worker_generation_tokens_total", None)]
            assert (counted > 0) == (n > 0)
            assert samples[("baton_worker_prefix_cache_hits_total", None)] <= samples[("baton_worker_prefix_cache_queries_total", None)]
            steps.setdefault(role, []).append(n)
    assert sum(steps["prefill"]) > 0 and all(n > 0 for n in steps["decode"])


@pytest.mark.parametrize("disabled", [False, True], ids=["logged", "disabled"])
def test_a_worker_logs_what_its_engine_did_every_interval_unless_told_not_to(demo_model, disabled):
    """vLLM's periodic engine line (every BATON_LOG_STATS_INTERVAL seconds, 10 by default) from a
    prefill worker that computed two embeddings of one prompt; none with --disable-log-stats."""
    port = launcher.free_port()
    cmd = [sys.executable, "-P", "-m", "baton.services.prefill", "--model", demo_model, "--port", str(port),
           *(["--disable-log-stats"] if disabled else [])]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "BATON_LOG_STATS_INTERVAL": "0.5"})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=120)
            for i in range(2):
                prefill_pb2_grpc.PrefillStub(channel).Embed(
                    prefill_pb2.EmbedRequest(request_id=f"e{i}", prompt_token_ids=list(range(1, 41))), timeout=60)
        time.sleep(1.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        log = proc.communicate(timeout=60)[1]
    # The start: what the worker runs and the KV cache it sized (256 MiB by default: 2,730 float32
    # blocks of the demo checkpoint, 96 KiB each over its six layers).
    assert re.search(r"prefill worker \S+ serving on \S+: LlamaForCausalLM in float32; KV cache of 2730 blocks "
                     r"of 16 tokens in float32 \(0\.25 GiB\)", log), log
    lines = [line for line in log.splitlines() if "prompt throughput" in line]
    if disabled:
        assert lines == []
        return
    assert 1 <= len(lines) <= 2, log   # the intervals the embeddings ran in; none of the idle ones after
    assert "prefill worker" in lines[0] and "prefix cache hit rate" in lines[0]
    assert float(lines[0].split("prompt throughput ")[1].split(" ")[0]) > 0


async def stream_completion(client: openai.AsyncOpenAI, prompt: str, params: SamplingParams, on_chunk: Callable[[], None]) -> str:
    """The text of a streamed completion with ``params`` (``on_chunk`` runs after each chunk), or
    the finish reason it wrongly ended with."""
    extra = {"ignore_eos": params.ignore_eos, "repetition_penalty": params.repetition_penalty}
    if params.structured_output is not None:
        extra["structured_outputs"] = {"regex": params.structured_output.regex}
    stream = await client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=params.max_tokens, temperature=params.temperature, seed=params.seed,
        frequency_penalty=params.frequency_penalty, stream=True, extra_body=extra,
    )
    text, finish = [], None
    async for chunk in stream:
        text.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason
        on_chunk()
    return "".join(text) if finish == "length" else f"finish_reason {finish}"


def test_workers_killed_mid_burst_resume_every_request(system, demo_model):
    """A prefill worker dies as the first of 24 streams gets its first token, and a decode
    worker once six streams are five tokens in. Every request still ends as one process
    would have generated it, greedy or seeded with penalties, a third of them under a grammar
    (its matcher advanced over the tokens streamed before): those that lost a worker before
    their first token were retried, those that had streamed tokens resumed after them on the
    survivors. None hangs, the survivors hold no KV block, and serving goes on. (It kills
    workers: keep it last but for SIGTERM.)"""
    prefill_addr, decode_addr = system.worker_addrs("prefill")[0], system.worker_addrs("decode")[0]
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(24)]
    prose = StructuredOutputParams(regex=r"[A-Za-z ,.;:!?'\n-]{300,400}")   # longer than 48 tokens: no early EOS
    params = [SamplingParams(temperature=0, max_tokens=48, ignore_eos=True) if i % 2 else
              SamplingParams(temperature=0.8, max_tokens=48, ignore_eos=True, seed=i, frequency_penalty=0.5,
                             repetition_penalty=1.2) for i in range(24)]
    params = [replace(p, structured_output=prose) if i % 3 == 0 else p for i, p in enumerate(params)]
    expected = [o.outputs[0].text for o in LLM(demo_model).generate(prompts, params)]
    streamed = [0] * 24
    first_token, five_in = asyncio.Event(), asyncio.Event()

    def count(i: int) -> None:
        streamed[i] += 1
        first_token.set()
        if sum(n >= 5 for n in streamed) >= 6:
            five_in.set()

    async def burst() -> list[str | BaseException]:
        async with system.async_client() as client:
            requests = [asyncio.create_task(stream_completion(client, prompts[i], params[i], lambda i=i: count(i)))
                        for i in range(24)]
            await asyncio.wait_for(first_token.wait(), 60)
            system.proc_at(prefill_addr).kill()
            await asyncio.wait_for(five_in.wait(), 60)
            system.proc_at(decode_addr).kill()
            return await asyncio.wait_for(asyncio.gather(*requests, return_exceptions=True), 120)

    resumed_before = gateway_counter(system, "baton_request_retries_total", {"resumed": "true"})
    results = asyncio.run(burst())
    assert results == expected
    assert gateway_counter(system, "baton_request_retries_total", {"resumed": "true"}) > resumed_before
    loads = system.wait_no_blocks_in_use(skip=frozenset({prefill_addr, decode_addr}))
    assert all(l.used_blocks == 0 and l.running == 0 for l in loads), loads
    after = system.client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert after.choices[0].text.startswith(", Romeo! wherefore art thou Romeo?")


def test_speculative_decode_workers_stream_what_one_token_a_step_gives(demo_model):
    """Decode workers speculating by n-gram lookup (``baton up --speculative-config``) stream
    exactly what the aggregated engine writes one token a step, greedy and seeded, and count
    the drafts they accepted in their metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    spec = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'
    line = "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name.\n\n"
    prompts = [line * 3, line * 2 + "JULIET:\nO Romeo,"]
    llm = LLM(demo_model)
    system = System(demo_model, "grpc", prefill=1, decode=1, decode_flags=("--no-async-scheduling", "--speculative-config", spec))
    try:
        for params, extra in [(SamplingParams(temperature=0, max_tokens=96, ignore_eos=True), {"ignore_eos": True}),
                              (SamplingParams(temperature=0.9, seed=4, max_tokens=64), {"seed": 4})]:
            want = [o.outputs[0].text for o in llm.generate(prompts, params)]
            for prompt, expected in zip(prompts, want):
                out = system.client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=params.max_tokens,
                                                       temperature=params.temperature, extra_body=extra)
                assert out.choices[0].text == expected
                chunks = system.client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=params.max_tokens,
                                                          temperature=params.temperature, extra_body=extra, stream=True)
                assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
        assert system.wait_no_blocks_in_use()[-1].used_blocks == 0
        (decode_addr,) = system.worker_addrs("decode")
        text = httpx.get(system.plan.metrics[("decode", decode_addr)], timeout=5).text
        spec_tokens = {s.labels["kind"]: s.value for family in text_string_to_metric_families(text)
                       for s in family.samples if s.name == "baton_worker_spec_decode_tokens_total"}
        assert spec_tokens["proposed"] >= spec_tokens["accepted"] > 0
    finally:
        system.stop()


def test_a_stream_interval_sends_tokens_in_fours_but_the_first(demo_model):
    """``baton up --stream-interval 4`` (vLLM's flag): a streamed completion of 13 tokens comes as
    its first token, then chunks of four (three; fewer, fuller ones where the stream fell behind
    and sent what had queued up as one), whether its prompt went to the prefill worker or, short
    enough, to the decode worker alone; the text is the aggregated engine's. With a stop string,
    no token is held back: more chunks than four-token ones would make."""
    system = System(demo_model, "grpc", prefill=1, decode=1,
                    up_flags=("--stream-interval", "4", "--max-local-prefill-length", "8"))
    try:
        params = SamplingParams(temperature=0, max_tokens=13, ignore_eos=True)
        prompts = [PROMPTS[1] * 3, PROMPTS[0]]   # 30 tokens and more, computed on the prefill worker; 6, locally
        expected = [o.outputs[0].text for o in LLM(demo_model).generate(prompts, params)]
        for prompt, want in zip(prompts, expected):
            chunks = list(system.client.completions.create(
                model=MODEL_NAME, prompt=prompt, max_tokens=13, temperature=0, logprobs=0, stream=True,
                extra_body={"ignore_eos": True}))
            sizes = [n for n in (len(c.choices[0].logprobs.tokens) for c in chunks if c.choices and c.choices[0].logprobs) if n]
            assert sizes[0] == 1 and all(n >= 4 for n in sizes[1:-1]) and sum(sizes) == 13
            assert "".join(c.choices[0].text for c in chunks) == want
            # Stop strings are checked at the gateway as each token comes: no token is held back for them.
            # (A salt keeps the prompt from the decode worker's prefix cache: it goes where the first went.)
            chunks = list(system.client.completions.create(
                model=MODEL_NAME, prompt=prompt, max_tokens=13, temperature=0, logprobs=0, stream=True, stop=["\x00"],
                extra_body={"ignore_eos": True, "cache_salt": "stop"}))
            sizes = [n for n in (len(c.choices[0].logprobs.tokens) for c in chunks if c.choices and c.choices[0].logprobs) if n]
            assert len(sizes) > 4 and sum(sizes) == 13 and "".join(c.choices[0].text for c in chunks) == want
        assert [gateway_counter(system, "baton_prefills_total", {"where": w}) for w in ("local", "remote")] == [2, 2]
    finally:
        system.stop()


def test_a_decode_worker_shutting_down_leaves_its_requests_to_resume(demo_model):
    """SIGTERM to one of two decode workers (grace 1 s) while eight streams are a few tokens
    in: when the grace ends, gRPC cancels the streams it still holds UNAVAILABLE, and every
    request finishes on the other one exactly as one process generates it. The worker exits
    cleanly."""
    system = System(demo_model, "grpc", prefill=1, decode=2, decode_flags=("--shutdown-grace", "1"))
    try:
        decode_addr = system.worker_addrs("decode")[0]
        victim = system.proc_at(decode_addr)
        prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(8)]
        params = SamplingParams(temperature=0, max_tokens=160, ignore_eos=True)
        expected = [o.outputs[0].text for o in LLM(demo_model).generate(prompts, params)]
        streamed = [0] * 8
        three_in = asyncio.Event()

        def count(i: int) -> None:
            streamed[i] += 1
            if min(streamed) >= 3:
                three_in.set()

        async def burst() -> list[str | BaseException]:
            async with system.async_client() as client:
                requests = [asyncio.create_task(stream_completion(client, prompts[i], params, lambda i=i: count(i)))
                            for i in range(8)]
                await asyncio.wait_for(three_in.wait(), 60)
                victim.send_signal(signal.SIGTERM)
                return await asyncio.wait_for(asyncio.gather(*requests, return_exceptions=True), 120)

        resumed_before = gateway_counter(system, "baton_request_retries_total", {"resumed": "true"})
        assert asyncio.run(burst()) == expected
        assert gateway_counter(system, "baton_request_retries_total", {"resumed": "true"}) > resumed_before
        assert victim.wait(timeout=30) == 0
        loads = system.wait_no_blocks_in_use(skip=frozenset({decode_addr}))
        assert all(l.used_blocks == 0 and l.running == 0 for l in loads), loads
    finally:
        system.stop()


def test_sigterm_drains_then_exits(system):
    stream = system.client.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=64, temperature=0, stream=True)
    first = next(iter(stream))
    system.gateway.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    status = None
    while time.monotonic() < deadline:
        try:
            status = httpx.get(f"{system.plan.url}/ready", timeout=2).status_code
        except httpx.HTTPError:
            status = None
        if status == 503:
            break
        time.sleep(0.05)
    assert status == 503
    rest = list(stream)
    assert rest and rest[-1].choices[0].finish_reason in ("stop", "length")
    assert first.choices[0].text is not None
    assert system.gateway.wait(timeout=30) == 0
