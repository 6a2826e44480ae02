"""Embeddings on the demo checkpoint: the engine's last-token pooling equals transformers' final
hidden state of the prompt's last token, L2-normalized, whether the prompt is computed in one
step or in chunks, beside generation, or over blocks its prefix cache holds; mean and first-token
(CLS) pooling, normalized or not, equal the mean and the first of transformers' final hidden
states, computed in one step or in chunks, with their prefix cached, or after a preemption; the
pooling is the checkpoint's sentence-transformers pooling unless a worker's --pooler-config says
otherwise. ``LLM.embed`` and ``LLM.score`` answer in vLLM's output types."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from baton.engine.engine_core import EngineCore
from baton.engine.llm import LLM
from baton.engine.outputs import EmbeddingRequestOutput, ScoringRequestOutput
from baton.engine.pooling import POOLING_TYPES, PoolerConfig
from baton.engine.sampling_params import SamplingParams
from baton.engine.sequence import Sequence
from baton.services.worker import build_worker, warm_up, worker_arg_parser

pytestmark = pytest.mark.model

PROMPTS = ["JULIET:\nO Romeo", "ROMEO:\nBut, soft! what light through yonder window breaks?", "HAMLET:\n"]


@pytest.fixture(scope="module")
def prompt_ids(demo_model) -> list[list[int]]:
    """PROMPTS' token ids, then the same without their leading BOS token: so that the prompts'
    first tokens differ too, and CLS pooling tells them apart."""
    tok = AutoTokenizer.from_pretrained(demo_model)
    ids = [tok(p).input_ids for p in PROMPTS]
    return ids + [p[1:] for p in ids]


@pytest.fixture(scope="module")
def hidden_states(demo_model, prompt_ids) -> list[torch.Tensor]:
    """Each prompt's final hidden states ``[tokens, hidden_size]``, as transformers computes them."""
    model = AutoModelForCausalLM.from_pretrained(demo_model).eval()
    with torch.no_grad():
        return [model(torch.tensor([p]), output_hidden_states=True).hidden_states[-1][0] for p in prompt_ids]


@pytest.fixture(scope="module")
def reference(hidden_states) -> list[torch.Tensor]:
    """PROMPTS' last-token pooling, normalized (the default)."""
    return [pooled(hidden, PoolerConfig()) for hidden in hidden_states[: len(PROMPTS)]]


def pooled(hidden: torch.Tensor, pooler: PoolerConfig) -> torch.Tensor:
    """``pooler``'s embedding of a prompt whose final hidden states are ``hidden``."""
    vector = {"LAST": hidden[-1], "MEAN": hidden.mean(dim=0), "CLS": hidden[0]}[pooler.pooling_type]
    return torch.nn.functional.normalize(vector, dim=0) if pooler.normalize else vector


def vectors(outputs: list[EmbeddingRequestOutput]) -> list[list[float]]:
    """``LLM.embed``'s embeddings."""
    return [out.outputs.embedding for out in outputs]


def scores(outputs: list[ScoringRequestOutput]) -> list[float]:
    """``LLM.score``'s scores."""
    return [out.outputs.score for out in outputs]


def embed(core: EngineCore, prompts: list[list[int]], tag: str) -> list[Sequence]:
    """Embed ``prompts`` together; their finished sequences."""
    seqs = [core.add_embedding_request(f"{tag}{i}", p) for i, p in enumerate(prompts)]
    while core.has_unfinished():
        core.step()
    return seqs


@pytest.mark.parametrize("engine_kwargs", [{}, {"max_num_batched_tokens": 5, "block_size": 4}], ids=["whole", "chunked"])
def test_embeddings_match_transformers_last_hidden_state(demo_model, reference, engine_kwargs) -> None:
    llm = LLM(demo_model, **engine_kwargs)
    got = vectors(llm.embed(PROMPTS))
    for ours, theirs in zip(got, reference):
        assert len(ours) == theirs.shape[0]
        torch.testing.assert_close(torch.tensor(ours), theirs, rtol=0, atol=1e-5)
        assert sum(v * v for v in ours) == pytest.approx(1.0, abs=1e-5)
    assert llm.core.stats().used_blocks == 0


def test_embeddings_beside_generation_and_over_the_prefix_cache(demo_model, reference) -> None:
    llm = LLM(demo_model, block_size=4)
    params = SamplingParams(temperature=0, max_tokens=12)
    alone = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    ids = [llm.tokenizer(p).input_ids for p in PROMPTS]
    gens = [llm.core.add_request(f"g{i}", p, params)[0] for i, p in enumerate(ids)]
    embs = [llm.core.add_embedding_request(f"e{i}", p) for i, p in enumerate(ids)]
    while llm.core.has_unfinished():
        llm.core.step()
    assert [g.output_token_ids for g in gens] == alone
    for seq, theirs in zip(embs, reference):
        torch.testing.assert_close(torch.tensor(seq.embedding), theirs, rtol=0, atol=1e-5)
        assert seq.finish_reason == "stop" and seq.output_token_ids == [] and seq.num_cached_tokens > 0
    with pytest.raises(ValueError, match="token ids"):
        llm.core.add_embedding_request("bad", [1, 10**6])
    assert llm.core.stats().used_blocks == 0


def test_a_base_models_checkpoint_serves_embeddings_only(demo_model, reference, tmp_path) -> None:
    """A checkpoint saved from the base model (``LlamaModel``: no LM head, no ``model.`` prefix),
    as embedding models are published, loads and embeds as its causal-LM twin; generating is
    refused with a message that says why, and a worker warms up on it."""
    from transformers import AutoModel

    AutoModel.from_pretrained(demo_model).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(demo_model) / name).exists():
            (tmp_path / name).write_bytes((Path(demo_model) / name).read_bytes())
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaModel"]
    llm = LLM(str(tmp_path))
    for ours, theirs in zip(vectors(llm.embed(PROMPTS)), reference):
        torch.testing.assert_close(torch.tensor(ours), theirs, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="embeddings only"):
        llm.generate(PROMPTS[0], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="embeddings only"):
        llm.core.reserve("r", [1, 2, 3], SamplingParams(max_tokens=2))
    warm_up(llm.core, llm.config.block_size)       # a worker's start: it warms up on embeddings
    assert llm.core.stats().used_blocks == 0


POOLERS = [PoolerConfig("MEAN"), PoolerConfig("MEAN", normalize=False), PoolerConfig("CLS"),
           PoolerConfig("CLS", normalize=False), PoolerConfig("LAST", normalize=False)]


@pytest.mark.parametrize("pooler", POOLERS, ids=lambda p: f"{p.pooling_type}-{'normalized' if p.normalize else 'raw'}")
@pytest.mark.parametrize("engine_kwargs", [{}, {"max_num_batched_tokens": 5, "block_size": 4}], ids=["whole", "chunked"])
def test_each_pooling_type_matches_transformers(demo_model, prompt_ids, hidden_states, pooler, engine_kwargs) -> None:
    llm = LLM(demo_model, pooler=pooler, **engine_kwargs)
    for ours, hidden in zip(vectors(llm.embed(prompt_ids)), hidden_states, strict=True):
        torch.testing.assert_close(torch.tensor(ours), pooled(hidden, pooler), rtol=1e-5, atol=1e-5)
    assert llm.core.stats().used_blocks == 0


@pytest.mark.parametrize("pooling_type", POOLING_TYPES)
def test_mean_and_cls_compute_the_whole_prompt_though_its_prefix_is_cached(demo_model, prompt_ids, hidden_states,
                                                                          pooling_type) -> None:
    """A cached prefix keeps KV, not the hidden states MEAN and CLS read: they compute every
    prompt token again (LAST reuses the prefix), and what they compute is cached for others."""
    pooler = PoolerConfig(pooling_type)
    llm = LLM(demo_model, block_size=4, pooler=pooler)
    embed(llm.core, prompt_ids, "first")
    for seq, hidden in zip(embed(llm.core, prompt_ids, "again"), hidden_states, strict=True):
        torch.testing.assert_close(torch.tensor(seq.embedding), pooled(hidden, pooler), rtol=1e-5, atol=1e-5)
        assert (seq.num_cached_tokens > 0) == (pooling_type == "LAST")
    generated = llm.generate(prompt_ids, SamplingParams(temperature=0, max_tokens=1))
    assert all(out.num_cached_tokens > 0 for out in generated)


def test_a_preempted_mean_pooling_sequence_sums_its_prompt_once(demo_model, prompt_ids, hidden_states) -> None:
    """A generation's growth preempts an embedding request halfway through its prompt; it
    computes the prompt again from the start, and its sum starts over."""
    pooler = PoolerConfig("MEAN")
    llm = LLM(demo_model, block_size=4, num_blocks=8, max_num_batched_tokens=5, pooler=pooler)
    preempted = []
    schedule = llm.core.scheduler.schedule

    def recording_schedule():
        out = schedule()
        preempted.extend(seq.seq_id for seq in out.preempted)
        return out

    llm.core.scheduler.schedule = recording_schedule
    llm.core.add_request("g", prompt_ids[0], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    (seq,) = embed(llm.core, [prompt_ids[1]], "e")
    assert "e0" in preempted and seq.finish_reason == "stop"
    torch.testing.assert_close(torch.tensor(seq.embedding), pooled(hidden_states[1], pooler), rtol=1e-5, atol=1e-5)


@pytest.fixture
def mean_pooling_checkpoint(demo_model, tmp_path) -> str:
    """The demo checkpoint as a sentence-transformers model that pools by the mean and does
    not normalize (a Pooling module, no Normalize module)."""
    for path in Path(demo_model).iterdir():
        (tmp_path / path.name).symlink_to(path)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True,
                                                                    "pooling_mode_lasttoken": False}))
    return str(tmp_path)


def test_without_a_pooler_config_the_checkpoint_says_how_to_pool(mean_pooling_checkpoint, prompt_ids, hidden_states) -> None:
    llm = LLM(mean_pooling_checkpoint)
    for ours, hidden in zip(vectors(llm.embed(prompt_ids)), hidden_states, strict=True):
        torch.testing.assert_close(torch.tensor(ours), pooled(hidden, PoolerConfig("MEAN", normalize=False)),
                                   rtol=1e-5, atol=1e-5)


def test_a_prefill_workers_pooler_config_overrides_the_checkpoints(mean_pooling_checkpoint, prompt_ids,
                                                                   hidden_states) -> None:
    flags = ["--model", mean_pooling_checkpoint, "--num-blocks", "64", "--pooler-config", '{"pooling_type": "CLS"}']
    ctx = build_worker(worker_arg_parser("prefill", 0).parse_args(flags), "prefill", keep_finished_blocks=True)
    for seq, hidden in zip(embed(ctx.core, prompt_ids, "e"), hidden_states, strict=True):
        torch.testing.assert_close(torch.tensor(seq.embedding), pooled(hidden, PoolerConfig("CLS")), rtol=1e-5, atol=1e-5)


def test_a_decode_worker_does_not_read_the_checkpoints_pooling(mean_pooling_checkpoint, prompt_ids) -> None:
    """A pooling mode Baton does not have fails a prefill worker at start, not a decode worker,
    which never pools."""
    config = Path(mean_pooling_checkpoint) / "1_Pooling" / "config.json"
    config.write_text(json.dumps({"pooling_mode_max_tokens": True}))
    flags = ["--model", mean_pooling_checkpoint, "--num-blocks", "64"]
    with pytest.raises(ValueError, match="pooling_mode_max_tokens is not supported"):
        build_worker(worker_arg_parser("prefill", 0).parse_args(flags), "prefill", keep_finished_blocks=True)
    ctx = build_worker(worker_arg_parser("decode", 0).parse_args(flags), "decode", keep_finished_blocks=False)
    assert ctx.core.reserve("r", prompt_ids[0], SamplingParams(max_tokens=4)) is not None


def test_embed_answers_as_vllms_llm_embed_does(demo_model, prompt_ids) -> None:
    """An ``EmbeddingRequestOutput`` for each prompt (text, token ids, or vLLM's dict forms), in
    prompt order: a request id of its own, the prompt's token ids, finished, and as
    ``outputs.embedding`` what the engine pools for it; ``num_cached_tokens`` counts the prefix
    cache's hits (LAST pooling reuses it)."""
    llm = LLM(demo_model, num_blocks=64, block_size=4)
    prompts = [PROMPTS[0], {"prompt": PROMPTS[1]}, {"prompt_token_ids": prompt_ids[2]}, prompt_ids[3]]
    outs = llm.embed(prompts, use_tqdm=True)
    assert all(isinstance(out, EmbeddingRequestOutput) and out.finished for out in outs)
    assert len({out.request_id for out in outs}) == len(prompts)
    assert [out.prompt_token_ids for out in outs] == prompt_ids[:4]
    pooled_by_engine = embed(LLM(demo_model, num_blocks=64, block_size=4).core, prompt_ids[:4], "e")
    assert vectors(outs) == [seq.embedding for seq in pooled_by_engine]
    assert {out.outputs.hidden_size for out in outs} == {llm.runner.model_config.hidden_size}
    assert [out.num_cached_tokens for out in outs] == [0] * 4
    (again,) = llm.embed(PROMPTS[0])
    assert again.num_cached_tokens > 0 and again.request_id not in {out.request_id for out in outs}
    assert again.outputs.embedding == pytest.approx(outs[0].outputs.embedding, abs=1e-6)


def test_score_is_the_cosine_of_the_embeddings_paired_as_vllm_pairs_them(demo_model) -> None:
    """``LLM.score`` (vLLM's): 1:N and N:N pairs, scored as the gateway's /score scores them; a
    ``ScoringRequestOutput`` for each pair, whose tokens are the pair's joined by the pad token
    and whose request id joins the two embeddings', as vLLM's embedding-model path answers."""
    from baton.services.gateway.scoring import similarities

    llm = LLM(demo_model, num_blocks=64)
    query, docs = "O Romeo", ["But, soft!", "Romeo, Romeo!", "To be"]
    outs = llm.score(query, docs)
    assert scores(outs) == pytest.approx(similarities(vectors(llm.embed([query, *docs])), 1), abs=1e-9)
    assert all(isinstance(out, ScoringRequestOutput) and out.finished for out in outs)
    ids = [llm.tokenizer(text).input_ids for text in (query, *docs)]
    assert llm.tokenizer.pad_token_id is not None
    assert [out.prompt_token_ids for out in outs] == [ids[0] + [llm.tokenizer.pad_token_id] + d for d in ids[1:]]
    query_id = outs[0].request_id.split("_")[0]
    assert [out.request_id.split("_")[0] for out in outs] == [query_id] * 3 and len({out.request_id for out in outs}) == 3
    by_dicts = llm.score({"prompt": query}, [{"prompt_token_ids": d} for d in ids[1:]])
    assert scores(by_dicts) == pytest.approx(scores(outs), abs=1e-9)
    assert scores(llm.score(docs, docs[::-1])) == pytest.approx(similarities(vectors(llm.embed(docs + docs[::-1])), 3),
                                                                abs=1e-9)
    assert scores(llm.score(docs, docs)) == pytest.approx([1.0] * 3)
    with pytest.raises(ValueError, match="1 text_1 with N text_2, or N with N: got 2 and 3"):
        llm.score(docs[:2], docs)
