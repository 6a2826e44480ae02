"""Embeddings on the demo checkpoint: the engine's last-token pooling equals transformers' final
hidden state of the prompt's last token, L2-normalized, whether the prompt is computed in one
step or in chunks, beside generation, or over blocks its prefix cache holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from baton.engine.llm import LLM
from baton.engine.sampling_params import SamplingParams
from baton.services.worker import warm_up

pytestmark = pytest.mark.model

PROMPTS = ["JULIET:\nO Romeo", "ROMEO:\nBut, soft! what light through yonder window breaks?", "HAMLET:\n"]


@pytest.fixture(scope="module")
def reference(demo_model) -> list[torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model).eval()
    with torch.no_grad():
        return [torch.nn.functional.normalize(
            model(tok(p, return_tensors="pt").input_ids, output_hidden_states=True).hidden_states[-1][0, -1], dim=0)
            for p in PROMPTS]


@pytest.mark.parametrize("engine_kwargs", [{}, {"max_num_batched_tokens": 5, "block_size": 4}], ids=["whole", "chunked"])
def test_embeddings_match_transformers_last_hidden_state(demo_model, reference, engine_kwargs) -> None:
    llm = LLM(demo_model, **engine_kwargs)
    got = llm.embed(PROMPTS)
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
    for ours, theirs in zip(llm.embed(PROMPTS), reference):
        torch.testing.assert_close(torch.tensor(ours), theirs, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="embeddings only"):
        llm.generate(PROMPTS[0], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="embeddings only"):
        llm.core.reserve("r", [1, 2, 3], SamplingParams(max_tokens=2))
    warm_up(llm.core, llm.config.block_size)       # a worker's start: it warms up on embeddings
    assert llm.core.stats().used_blocks == 0
