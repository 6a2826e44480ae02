"""Sampler: greedy, seeded reproducibility independent of the batch, filters,
penalties, and log-probabilities against log_softmax."""

from __future__ import annotations

import pytest
import torch

from baton.engine.sampler import Sampler, prompt_logprobs, sample_seed
from baton.engine.sampling_params import SamplingParams
from baton.engine.sequence import Sequence

pytestmark = pytest.mark.unit

V = 64


def seq(seed: int = 0, prompt: list[int] | None = None, outputs: list[int] | None = None, **params) -> Sequence:
    s = Sequence(seq_id=f"s{seed}", prompt_token_ids=prompt or [1, 2, 3], params=SamplingParams(**params), seed=seed)
    s.output_token_ids = list(outputs or [])
    return s


def test_greedy_is_argmax_with_raw_logprobs() -> None:
    logits = torch.randn(8, V)
    seqs = [seq(i, temperature=0.0, logprobs=3 if i % 2 else None) for i in range(8)]
    out = Sampler()(logits, seqs)
    raw = torch.log_softmax(logits, dim=-1)
    assert [t.token_id for t in out] == logits.argmax(-1).tolist()
    for i, t in enumerate(out):
        assert t.logprob == pytest.approx(raw[i, t.token_id].item(), abs=1e-6)
        if i % 2:
            values, ids = raw[i].topk(3)
            assert [tid for tid, _ in t.top] == ids.tolist()
            assert [lp for _, lp in t.top] == pytest.approx(values.tolist(), abs=1e-6)
        else:
            assert t.top == []


def test_seeded_sampling_reproducible_and_batch_independent() -> None:
    logits = torch.randn(9, V)
    target = seq(1234, temperature=0.8, top_p=0.95, outputs=[5, 6])
    alone = Sampler()(logits[:1], [target])[0]
    others = [seq(i, temperature=1.0 if i % 2 else 0.0) for i in range(8)]
    batch = Sampler()(torch.cat([logits[1:5], logits[:1], logits[5:]]), others[:4] + [target] + others[4:])
    assert batch[4].token_id == alone.token_id
    assert Sampler()(logits[:1], [target])[0].token_id == alone.token_id
    # Different seeds / output positions give a different draw stream.
    draws = {Sampler()(logits[:1], [seq(s, temperature=5.0)])[0].token_id for s in range(40)}
    assert len(draws) > 5
    assert sample_seed(1234, 2) != sample_seed(1234, 3) and sample_seed(1234, 2) == sample_seed(1234, 2)


def test_sampling_follows_the_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    expected = torch.softmax(logits[0], -1)
    counts = torch.zeros(4)
    for s in range(3000):
        counts[Sampler()(logits, [seq(s)])[0].token_id] += 1
    assert torch.allclose(counts / counts.sum(), expected, atol=0.03)


def test_top_k_one_is_greedy() -> None:
    logits = torch.randn(6, V)
    out = Sampler()(logits, [seq(i, temperature=1.5, top_k=1) for i in range(6)])
    assert [t.token_id for t in out] == logits.argmax(-1).tolist()


def test_top_p_and_min_p_exclude_tokens() -> None:
    # probs ~ [0.64, 0.24, 0.09, 0.03]: top_p=0.7 keeps {0, 1}; min_p=0.2 keeps {0, 1}.
    logits = torch.log(torch.tensor([[0.64, 0.24, 0.09, 0.03]]))
    for params in ({"top_p": 0.7}, {"min_p": 0.2}, {"top_k": 2}):
        chosen = {Sampler()(logits, [seq(s, **params)])[0].token_id for s in range(300)}
        assert chosen == {0, 1}, params
    chosen = {Sampler()(logits, [seq(s, top_p=0.5)])[0].token_id for s in range(100)}
    assert chosen == {0}


def test_repetition_penalty_hf_semantics() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    s = seq(prompt=[0], outputs=[1], temperature=0.0, repetition_penalty=2.0)
    row = logits[0].clone()
    Sampler()._apply_penalties(row, s)
    assert row.tolist() == [1.0, -4.0, 1.0, 0.5]
    assert Sampler()(logits, [s])[0].token_id in (0, 2)       # tie at 1.0: argmax picks the first
    s2 = seq(prompt=[0], temperature=0.0, repetition_penalty=3.0)
    assert Sampler()(logits, [s2])[0].token_id == 2


def test_presence_and_frequency_penalties_openai_semantics() -> None:
    logits = torch.zeros(1, 5)
    s = seq(prompt=[4, 4, 4], outputs=[1, 1, 2], temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25)
    row = logits[0].clone()
    Sampler()._apply_penalties(row, s)
    assert row.tolist() == pytest.approx([0.0, -1.0, -0.75, 0.0, 0.0])   # prompt tokens not penalized
    assert Sampler()(torch.tensor([[1.0, 1.2, 0.0, 0.0, 0.0]]), [s])[0].token_id == 0


def test_min_tokens_masks_stop_tokens() -> None:
    logits = torch.tensor([[0.0, 9.0, 5.0, 1.0]])
    sampler = Sampler(eos_token_ids=[1])
    early = seq(outputs=[3], temperature=0.0, min_tokens=2, stop_token_ids=[2])
    assert sampler(logits, [early])[0].token_id == 3
    late = seq(outputs=[3, 3], temperature=0.0, min_tokens=2, stop_token_ids=[2])
    assert sampler(logits, [late])[0].token_id == 1
    ignoring = seq(outputs=[3], temperature=0.0, min_tokens=2, ignore_eos=True)
    assert sampler(logits, [ignoring])[0].token_id == 1


def test_logprobs_use_raw_distribution_when_sampling() -> None:
    logits = torch.randn(3, V)
    seqs = [seq(i, temperature=0.3, top_k=5, repetition_penalty=1.3, logprobs=2) for i in range(3)]
    out = Sampler()(logits, seqs)
    raw = torch.log_softmax(logits, -1)
    for i, t in enumerate(out):
        penalized = logits[i].clone()
        seen = torch.tensor(sorted(set(seqs[i].token_ids)))
        penalized[seen] = torch.where(penalized[seen] > 0, penalized[seen] / 1.3, penalized[seen] * 1.3)
        assert t.token_id in penalized.topk(5).indices.tolist()
        assert t.logprob == pytest.approx(raw[i, t.token_id].item(), abs=1e-6)
        assert [tid for tid, _ in t.top] == raw[i].topk(2).indices.tolist()


def test_prompt_logprobs() -> None:
    logits = torch.randn(5, V)
    targets = torch.randint(0, V, (5,)).tolist()
    out = prompt_logprobs(logits, targets, 4)
    raw = torch.log_softmax(logits, -1)
    for j, t in enumerate(out):
        assert t.token_id == targets[j]
        assert t.logprob == pytest.approx(raw[j, targets[j]].item(), abs=1e-6)
        assert [tid for tid, _ in t.top] == raw[j].topk(4).indices.tolist()
    with pytest.raises(ValueError, match="do not match"):
        prompt_logprobs(logits, targets[:3], 1)


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="do not match"):
        Sampler()(torch.randn(2, V), [seq()])


def test_mixed_settings_in_one_batch_filter_per_row() -> None:
    base = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    logits = base.repeat(4, 1)
    settings = [{"top_k": 2}, {"top_p": 0.4}, {"min_p": 0.25}, {"temperature": 0.0}]
    seen: list[set[int]] = [set() for _ in settings]
    for s in range(100):
        out = Sampler()(logits, [seq(s * 4 + i, **kw) for i, kw in enumerate(settings)])
        for i, t in enumerate(out):
            seen[i].add(t.token_id)
    assert seen == [{0, 1}, {0}, {0, 1, 2}, {0}]
