"""Sampler: greedy, seeded reproducibility independent of the batch, filters,
penalties, and log-probabilities against log_softmax."""

from __future__ import annotations

import pytest
import torch

from baton.engine.sampler import MIN_TEMPERATURE, Sampler, banned_tokens, prompt_logprobs, sample_seed
from baton.engine.sampling_params import SamplingParams
from baton.engine.sequence import Sequence
from baton.kernels.sampling import ref_exponential_race

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


def test_half_precision_logits_sample_as_their_float32_copy() -> None:
    """The engine hands the sampler logits in the model's dtype; every setting must give the
    tokens and log-probs of the same values widened to float32."""
    logits = (4 * torch.randn(6, V)).to(torch.bfloat16)
    logits[1, 7] = logits[1, 3] = logits[1].max() + 1   # a tie above every other logit: the lowest index wins either way
    seqs = [
        seq(0, temperature=0.0, logprobs=2), seq(1, temperature=0.0), seq(2, temperature=0.8, top_k=5, logprobs=1),
        seq(3, temperature=1.0, top_p=0.9), seq(4, temperature=0.0, repetition_penalty=1.3), seq(5, temperature=0.7, min_p=0.1),
    ]
    half, wide = Sampler()(logits, seqs), Sampler()(logits.float(), seqs)
    assert [t.token_id for t in half] == [t.token_id for t in wide]
    assert half[1].token_id == 3
    assert [t.logprob for t in half] == [t.logprob for t in wide]
    assert [t.top for t in half] == [t.top for t in wide]


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
    Sampler()._process(row, s)
    assert row.tolist() == [1.0, -4.0, 1.0, 0.5]
    assert Sampler()(logits, [s])[0].token_id in (0, 2)       # tie at 1.0: argmax picks the first
    s2 = seq(prompt=[0], temperature=0.0, repetition_penalty=3.0)
    assert Sampler()(logits, [s2])[0].token_id == 2


def test_presence_and_frequency_penalties_openai_semantics() -> None:
    logits = torch.zeros(1, 5)
    s = seq(prompt=[4, 4, 4], outputs=[1, 1, 2], temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25)
    row = logits[0].clone()
    Sampler()._process(row, s)
    assert row.tolist() == pytest.approx([0.0, -1.0, -0.75, 0.0, 0.0])   # prompt tokens not penalized
    assert Sampler()(torch.tensor([[1.0, 1.2, 0.0, 0.0, 0.0]]), [s])[0].token_id == 0


def test_logit_bias_openai_semantics() -> None:
    logits = torch.randn(4, V)
    best = logits.argmax(-1)
    forced = seq(0, temperature=0.0, logit_bias={7: 100.0}, logprobs=1)
    banned = seq(1, temperature=0.0, logit_bias={int(best[1]): -100.0})
    sampled = seq(2, temperature=1.0, logit_bias={9: 100.0})
    beyond = seq(3, temperature=0.0, logit_bias={V + 5: 100.0})   # beyond the vocabulary: ignored
    out = Sampler()(logits, [forced, banned, sampled, beyond])
    assert [t.token_id for t in out] == [7, int(logits[1].topk(2).indices[1]), 9, int(best[3])]
    raw = torch.log_softmax(logits, dim=-1)
    assert out[0].logprob == pytest.approx(raw[0, 7].item(), abs=1e-6)   # reported from the raw distribution
    for bad in ({3: 100.5}, {-1: 1.0}):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bad)


def test_allowed_token_ids_mask_everything_else() -> None:
    logits = torch.randn(3, V)
    allowed = [5, 17, 40]
    greedy = seq(0, temperature=0.0, allowed_token_ids=allowed)
    sampled = [seq(i, temperature=2.0, allowed_token_ids=allowed) for i in range(1, 3)]
    out = Sampler()(logits, [greedy, *sampled])
    assert out[0].token_id == allowed[int(logits[0, allowed].argmax())]
    assert all(t.token_id in allowed for t in out)
    assert {Sampler()(logits[1:2], [seq(i, temperature=5.0, allowed_token_ids=allowed)])[0].token_id for i in range(40)} == set(allowed)
    for bad in ([], [-1, 3]):
        with pytest.raises(ValueError, match="allowed_token_ids"):
            SamplingParams(allowed_token_ids=bad)


def test_bad_words_mask_their_last_token_after_the_rest() -> None:
    """A one-token word is always masked; a longer one's last token only where the prompt and
    output so far end with the rest of it."""
    assert banned_tokens([1, 2, 3], [[9], [3, 4], [2, 3, 5], [1, 3, 6], [0, 1, 2, 3, 7]]) == [9, 4, 5]
    assert banned_tokens([], [[1, 2], [4]]) == [4]
    logits = torch.zeros(1, V)
    logits[0, 8], logits[0, 9] = 2.0, 1.0
    after = seq(prompt=[1, 2], outputs=[7], temperature=0.0, bad_words_token_ids=[[7, 8]])
    elsewhere = seq(prompt=[1, 2], outputs=[6], temperature=0.0, bad_words_token_ids=[[7, 8]])
    across = seq(prompt=[1, 7], temperature=0.0, bad_words_token_ids=[[7, 8]])   # the rest in the prompt
    assert [t.token_id for t in Sampler()(logits.repeat(3, 1), [after, elsewhere, across])] == [9, 8, 9]
    with pytest.raises(ValueError, match="bad_words_token_ids"):
        SamplingParams(bad_words_token_ids=[[3], []])
    with pytest.raises(ValueError, match="nothing would be left"):
        SamplingParams(allowed_token_ids=[3, 4], bad_words_token_ids=[[4], [3], [5, 3]])
    SamplingParams(allowed_token_ids=[3, 4], bad_words_token_ids=[[4], [5, 3]])


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
    logits[4, 3] = logits[4, 9] = logits[4].max() + 1      # a tie for the first place: both rank 2
    targets = torch.randint(0, V, (5,)).tolist()
    targets[4] = 9
    out = prompt_logprobs(logits, targets, 4)
    raw = torch.log_softmax(logits, -1)
    for j, t in enumerate(out):
        assert t.token_id == targets[j]
        assert t.logprob == pytest.approx(raw[j, targets[j]].item(), abs=1e-6)
        assert [tid for tid, _ in t.top] == raw[j].topk(4).indices.tolist()
        assert t.rank == sum(v >= logits[j, targets[j]].item() for v in logits[j].tolist())
    assert out[4].rank == 2
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


def full_sort_probs(scaled: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """One row's filtered probabilities the straightforward way: a full sort."""
    sorted_logits, order = scaled.sort(descending=True)
    if 0 < top_k < scaled.numel():
        scaled = scaled.masked_fill(scaled < sorted_logits[top_k - 1], float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs = probs[order]
        outside = (sorted_probs.cumsum(0) - sorted_probs) >= top_p
        outside[0] = False
        probs[order[outside]] = 0.0
    if min_p > 0:
        probs[probs < min_p * probs.max()] = 0.0
    return probs


def full_sort_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    temps = torch.tensor([max(s.params.temperature, MIN_TEMPERATURE) for s in seqs])
    scaled = logits / temps.unsqueeze(1)
    probs = torch.stack([full_sort_probs(scaled[i], s.params.top_k, s.params.top_p, s.params.min_p) for i, s in enumerate(seqs)])
    seeds = torch.tensor([sample_seed(s.seed, len(s.output_token_ids)) for s in seqs])
    return ref_exponential_race(probs, seeds).tolist()


def test_top_k_paths_match_a_full_sort() -> None:
    """Batches where every row has a top-k (``topk``, no full sort), with and without
    top-p, plus unfiltered rows, draw what a full-sort filter draws."""
    settings = [
        {"top_k": 5}, {"top_k": 40, "temperature": 0.7}, {"top_k": 1}, {"top_k": 300},
        {"top_k": 12, "top_p": 0.8}, {"top_k": 60, "top_p": 0.5, "temperature": 1.3}, {"top_k": 3, "top_p": 0.3},
        {"top_k": 25, "top_p": 0.9, "min_p": 0.05}, {"temperature": 0.9}, {"min_p": 0.1},
    ]
    for round_ in range(20):
        logits = 3 * torch.randn(len(settings), 300)
        seqs = [seq(round_ * 100 + i, **kw) for i, kw in enumerate(settings)]
        assert [t.token_id for t in Sampler()(logits, seqs)] == full_sort_tokens(logits, seqs)


def test_top_k_keeps_ties_and_top_p_covers_them() -> None:
    """Ties with the k-th logit stay (as with a full sort); when top-p also applies,
    the tied tokens beyond the ``topk`` candidates still go through the nucleus."""
    base = torch.full((V,), -5.0)
    base[torch.tensor([7, 30, 2, 50, 41, 9])] = torch.tensor([5.0, 4.0, 3.0, 3.0, 3.0, 3.0])
    # Nucleus: p(7) + p(30) = 0.717 >= 0.7, so the tied 3.0s fall outside. The largest
    # k is 4, so both top-p rows keep tied tokens beyond the 4 candidates.
    settings = [{"top_k": 3}, {"top_k": 3, "top_p": 0.7}, {"top_k": 4, "top_p": 0.7}]
    logits = base.repeat(len(settings), 1)
    seen: list[set[int]] = [set() for _ in settings]
    for s in range(300):
        seqs = [seq(s * 3 + i, **kw) for i, kw in enumerate(settings)]
        out = [t.token_id for t in Sampler()(logits, seqs)]
        assert out == full_sort_tokens(logits, seqs)
        for i, token in enumerate(out):
            seen[i].add(token)
    assert seen == [{7, 30, 2, 50, 41, 9}, {7, 30}, {7, 30}]


def test_token_does_not_depend_on_the_filter_path_of_the_batch() -> None:
    """A row draws the same token whether its batch takes ``topk`` (whatever its
    largest k) or the full sort (a top-p row without top-k)."""
    logits = 3 * torch.randn(4, V)
    target = seq(77, top_k=8, top_p=0.9, temperature=0.8, outputs=[3])
    alone = Sampler()(logits[:1], [target])[0].token_id
    batches = [
        [seq(1, top_k=50), seq(2, temperature=0.0), seq(3, top_k=2, top_p=0.5)],
        [seq(4, top_p=0.6), seq(5), seq(6, top_k=3)],
    ]
    for others in batches:
        assert Sampler()(logits, [target, *others])[0].token_id == alone
