"""EngineCore with a deterministic fake runner that also models the KV cache:
it checks that every token a chunk attends to is really in the sequence's blocks
(so prefix reuse, chunking and preemption can never read wrong KV)."""

from __future__ import annotations

import random
from pathlib import Path
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from baton.engine.block_manager import BlockRemoved, BlockStored
from baton.engine.config import EngineConfig
from baton.engine.engine_core import EngineCore
from baton.engine.model_runner import FedTokens
from baton.engine.sampling_params import SamplingParams
from baton.engine.sequence import ScheduledChunk, Sequence, SequenceStatus, TokenLogprob

pytestmark = pytest.mark.unit

VOCAB = 32
EOS = 0


def next_token(token: int) -> int:
    """The fake model's greedy continuation: never EOS unless the last token is 31."""
    return 0 if token == VOCAB - 1 else (token * 5 + 3) % (VOCAB - 1) + 1


def logits_after(token: int) -> torch.Tensor:
    row = torch.linspace(0.0, 1.0, VOCAB)
    row[next_token(token)] = 10.0
    return row


@dataclass
class FakeOutput:
    logits: torch.Tensor
    prompt_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    pooled: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class FakeRunner:
    num_blocks: int
    block_size: int
    max_model_len: int = 512
    vocab_size: int = VOCAB
    generates: bool = True
    slots: dict[tuple[int, int], int] = field(default_factory=dict)   # (block, offset) -> token id
    steps: list[list[tuple[str, int, int]]] = field(default_factory=list)
    fed_chunks: int = 0                                                # chunks whose token came from the "device"

    def _slot(self, table: list[int], position: int) -> tuple[int, int]:
        return table[position // self.block_size], position % self.block_size

    def execute(
        self,
        chunks: list[ScheduledChunk],
        on_layer_done: Callable[[int], None] | None = None,
        fed: FedTokens | None = None,
    ) -> FakeOutput:
        written: set[tuple[int, int]] = set()
        rows, prompt_logits = [], {}
        for i, chunk in enumerate(chunks):
            seq, start, end = chunk.seq, chunk.start, chunk.start + chunk.num_new_tokens
            tokens = seq.token_ids
            if fed is not None and fed.rows[i] >= 0:   # the pending token, read "on the device"
                assert (seq.num_pending_tokens, chunk.num_new_tokens, start) == (1, 1, len(tokens))
                tokens = tokens + [int(fed.tokens[fed.rows[i]])]
                self.fed_chunks += 1
            assert len(tokens) == seq.num_tokens, "a pending token the step does not get"
            assert len(seq.block_table) * self.block_size >= end, "chunk has no room in its blocks"
            for p in range(start):
                assert self.slots.get(self._slot(seq.block_table, p)) == tokens[p], f"stale KV at {p}"
            for p in range(start, end):
                slot = self._slot(seq.block_table, p)
                assert slot not in written, "two chunks wrote one slot"
                written.add(slot)
                self.slots[slot] = tokens[p]
            if chunk.samples:
                rows.append(logits_after(tokens[end - 1]))
            if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens:
                prompt_logits[seq.seq_id] = torch.stack([logits_after(t) for t in seq.token_ids[start:end]])
        if on_layer_done is not None:
            for layer in range(2):
                on_layer_done(layer)
        self.steps.append([(c.seq.seq_id, c.start, c.num_new_tokens) for c in chunks])
        empty = torch.empty(0, VOCAB)
        return FakeOutput(torch.stack(rows) if rows else empty, prompt_logits)


def make_engine(num_blocks: int = 64, block_size: int = 4, keep: bool = False, **config) -> EngineCore:
    runner = FakeRunner(num_blocks=num_blocks, block_size=block_size)
    cfg = EngineConfig(block_size=block_size, **config)
    return EngineCore(runner, cfg, eos_token_ids=[EOS], hash_extra="fake", keep_finished_blocks=keep)


def expected_output(prompt: list[int], max_tokens: int) -> tuple[list[int], str]:
    out, last = [], prompt[-1]
    while len(out) < max_tokens:
        last = next_token(last)
        out.append(last)
        if last == EOS:
            return out, "stop"
    return out, "length"


def run_to_end(engine: EngineCore, limit: int = 2000) -> None:
    for _ in range(limit):
        if not engine.has_unfinished():
            return
        engine.step()
    raise AssertionError("engine did not finish")


GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def async_scheduling(request: pytest.FixtureRequest) -> bool:
    """Run a test with each step's tokens read back at once, and with one step in flight."""
    return request.param


def test_single_request_matches_the_fake_model(async_scheduling: bool) -> None:
    engine = make_engine(async_scheduling=async_scheduling)
    (seq,) = engine.add_request("r", [3, 1, 4, 1, 5, 9], GREEDY)
    assert seq.seq_id == "r"
    run_to_end(engine)
    assert (seq.output_token_ids, seq.finish_reason) == expected_output([3, 1, 4, 1, 5, 9], 6)
    assert engine.stats().used_blocks == 0 and engine.requests == {}


def test_stats_count_prompt_and_generated_tokens_and_prefix_cache_hits(async_scheduling: bool) -> None:
    engine = make_engine(async_scheduling=async_scheduling)
    prompt = [(7 * i) % (VOCAB - 2) + 1 for i in range(3 * engine.config.block_size + 2)]
    (first,) = engine.add_request("a", prompt, GREEDY)
    run_to_end(engine)
    (again,) = engine.add_request("b", prompt, GREEDY)
    run_to_end(engine)
    stats = engine.stats()
    assert again.num_cached_tokens == 3 * engine.config.block_size
    assert stats.prompt_tokens == 2 * len(prompt) - again.num_cached_tokens
    assert stats.generated_tokens == len(first.output_token_ids) + len(again.output_token_ids) > 0
    assert (stats.prefix_queried_tokens, stats.prefix_hit_tokens) == (2 * len(prompt), again.num_cached_tokens)


def test_requests_join_and_leave_every_step(async_scheduling: bool) -> None:
    rng = random.Random(0)
    engine = make_engine(num_blocks=40, max_num_batched_tokens=24, max_num_seqs=5, async_scheduling=async_scheduling)
    seqs, finished = [], set()
    for step in range(400):
        if step < 60:
            prompt = [rng.randrange(1, VOCAB - 1) for _ in range(rng.randrange(1, 20))]
            params = SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 12))
            seqs += engine.add_request(f"r{step}", prompt, params)
        for s in engine.step():
            if s.is_finished:
                finished.add(s.seq_id)
        if not engine.has_unfinished():
            break
    assert len(finished) == len(seqs) == 60
    for s in seqs:
        assert (s.output_token_ids, s.finish_reason) == expected_output(s.prompt_token_ids, s.params.max_tokens)
    assert max(sum(n for _, _, n in step) for step in engine.runner.steps) <= 24
    assert max(len(step) for step in engine.runner.steps) <= 5
    stats = engine.stats()
    assert (stats.used_blocks, stats.running, stats.waiting) == (0, 0, 0)
    assert (engine.runner.fed_chunks > 0) == async_scheduling


def test_async_scheduling_under_random_pressure_matches_the_model() -> None:
    """Tight pools, small budgets and mixed lengths with one step in flight: outputs
    stay the model's, every block comes back, and the odd paths are taken (a token
    read back after its sequence was preempted ends it while it waits)."""
    ended_while_waiting = 0
    for trial in range(60):
        rng = random.Random(trial)
        engine = make_engine(num_blocks=rng.randrange(8, 16), max_num_batched_tokens=rng.choice([8, 16, 64]),
                             max_num_seqs=rng.randrange(2, 6), async_scheduling=True)
        finish = engine.scheduler.finish

        def counting_finish(seq: Sequence, reason: str, finish=finish) -> None:
            nonlocal ended_while_waiting
            ended_while_waiting += seq.status is SequenceStatus.WAITING
            finish(seq, reason)

        engine.scheduler.finish = counting_finish
        seqs = []
        for i in range(rng.randrange(3, 9)):
            prompt = [rng.randrange(1, VOCAB - 1) for _ in range(rng.randrange(1, 12))]
            params = SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 12), ignore_eos=rng.random() < 0.5)
            seqs += engine.add_request(f"r{i}", prompt, params)
        run_to_end(engine)
        for s in seqs:
            if s.params.ignore_eos:
                assert (len(s.output_token_ids), s.finish_reason) == (s.params.max_tokens, "length")
            else:
                assert (s.output_token_ids, s.finish_reason) == expected_output(s.prompt_token_ids, s.params.max_tokens)
            assert s.num_pending_tokens == 0
        assert engine.stats().used_blocks == 0
    assert ended_while_waiting > 0


def test_preemption_under_block_pressure_completes_everything(async_scheduling: bool) -> None:
    engine = make_engine(num_blocks=12, block_size=4, max_num_batched_tokens=64, async_scheduling=async_scheduling)
    prompts = [[(i * 7 + j) % 29 + 1 for j in range(10)] for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    seqs = [engine.add_request(f"r{i}", p, params)[0] for i, p in enumerate(prompts)]
    run_to_end(engine)
    restarts = [(sid, start) for step in engine.runner.steps for sid, start, _ in step if start == 0]
    assert len(restarts) > len(seqs), "the pool should have forced preemption and recomputation"
    # each recomputation from token 0 follows a preemption (others resume from cached blocks)
    assert engine.stats().preemptions >= len(restarts) - len(seqs) > 0
    for s in seqs:
        assert len(s.output_token_ids) == 14 and s.finish_reason == "length"
        out, last = [], s.prompt_token_ids[-1]
        for _ in range(14):
            last = next_token(last)
            out.append(last)
        assert s.output_token_ids == out
    assert engine.stats().used_blocks == 0


def test_n_children_share_prompt_blocks(async_scheduling: bool) -> None:
    engine = make_engine(num_blocks=64, block_size=4, async_scheduling=async_scheduling)
    prompt = list(range(1, 15))                     # 3 full blocks + 2 tokens
    params = SamplingParams(temperature=1.0, n=3, seed=7, max_tokens=4, ignore_eos=True)
    seqs = engine.add_request("r", prompt, params)
    assert [s.seq_id for s in seqs] == ["r-0", "r-1", "r-2"]
    assert [s.seed for s in seqs] == [7, 8, 9]
    engine.step()                                   # child 0's prompt; children added after
    assert engine.scheduler.running == [seqs[0]]
    engine.step()
    assert seqs[1].num_cached_tokens == seqs[2].num_cached_tokens == 12
    assert seqs[1].block_table[:3] == seqs[0].block_table[:3] == seqs[2].block_table[:3]
    assert [engine.block_manager.blocks[b].ref_count for b in seqs[0].block_table[:3]] == [3, 3, 3]
    run_to_end(engine)
    assert all(len(s.output_token_ids) == 4 for s in seqs)
    assert engine.stats().used_blocks == 0 and engine.requests == {}


def test_abort_frees_blocks_everywhere(async_scheduling: bool) -> None:
    engine = make_engine(async_scheduling=async_scheduling)
    engine.add_request("a", list(range(1, 30)), SamplingParams(max_tokens=20, ignore_eos=True))
    kids = engine.add_request("b", list(range(1, 9)), SamplingParams(n=2, max_tokens=20))
    engine.step()
    assert engine.stats().used_blocks > 0
    assert [s.finish_reason for s in engine.abort("b")] == ["abort", "abort"]
    assert all(s.is_finished for s in kids)
    engine.abort("a")
    assert engine.stats().used_blocks == 0 and not engine.has_unfinished()
    assert engine.abort("unknown") == []


def test_validation_errors() -> None:
    engine = make_engine(num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add_request("e", [], GREEDY)
    with pytest.raises(ValueError, match="exceeds max_model_len 512"):
        engine.add_request("l", [1] * 500, SamplingParams(max_tokens=13))
    with pytest.raises(ValueError, match="needs up to 5 KV blocks .* only 4"):
        engine.add_request("big", [1] * 10, SamplingParams(max_tokens=10))
    engine.add_request("ok", [1, 2], GREEDY)
    with pytest.raises(ValueError, match="already exists"):
        engine.add_request("ok", [1, 2], GREEDY)


def test_stop_conditions(async_scheduling: bool) -> None:
    engine = make_engine(async_scheduling=async_scheduling)
    (eos,) = engine.add_request("eos", [VOCAB - 1], SamplingParams(temperature=0.0, max_tokens=5))
    (ign,) = engine.add_request("ign", [VOCAB - 1], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    (mn,) = engine.add_request("min", [VOCAB - 1], SamplingParams(temperature=0.0, max_tokens=3, min_tokens=2))
    stop_at = next_token(next_token(5))
    (st,) = engine.add_request("st", [5], SamplingParams(temperature=0.0, max_tokens=9, stop_token_ids=[stop_at]))
    run_to_end(engine)
    assert (eos.output_token_ids, eos.finish_reason) == ([EOS], "stop")
    assert ign.output_token_ids[0] == EOS and (len(ign.output_token_ids), ign.finish_reason) == (3, "length")
    assert EOS not in mn.output_token_ids[:2] and len(mn.output_token_ids) >= 2
    assert st.output_token_ids == [next_token(5), stop_at] and st.finish_reason == "stop"


def test_prompt_logprobs_across_chunks(async_scheduling: bool) -> None:
    engine = make_engine(max_num_batched_tokens=4, async_scheduling=async_scheduling)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    (seq,) = engine.add_request("p", prompt, SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1, logprobs=1))
    run_to_end(engine)
    assert [t.token_id for t in seq.prompt_logprobs] == prompt[1:]
    for prev, t in zip(prompt, seq.prompt_logprobs):
        expected = torch.log_softmax(logits_after(prev), -1)
        assert t.logprob == pytest.approx(expected[t.token_id].item(), abs=1e-5)
        assert t.top[0][0] == next_token(prev)
    assert len(seq.output_logprobs) == 2 and seq.output_logprobs[0].top[0][0] == seq.output_token_ids[0]


def test_logprobs_asked_for_are_limited_by_max_logprobs() -> None:
    engine = make_engine()   # vLLM's default limit, 20, under this vocabulary of 32
    for params in (SamplingParams(logprobs=21), SamplingParams(prompt_logprobs=21)):
        with pytest.raises(ValueError, match="logprobs of 21, which is greater than max allowed: 20"):
            engine.add_request("over", [3, 1, 4], params)
    assert not engine.has_unfinished()
    engine = make_engine(max_logprobs=-1)   # the whole vocabulary
    with pytest.raises(ValueError, match="greater than max allowed: 32"):
        engine.add_request("over", [3, 1, 4], SamplingParams(logprobs=VOCAB + 1))
    (seq,) = engine.add_request("all", [3, 1, 4], SamplingParams(temperature=0.0, max_tokens=1, logprobs=VOCAB,
                                                                  prompt_logprobs=VOCAB))
    run_to_end(engine)
    assert len(seq.output_logprobs[0].top) == VOCAB and len(seq.prompt_logprobs[0].top) == VOCAB
    with pytest.raises(ValueError, match="max_logprobs"):
        EngineConfig(max_logprobs=-2)


def test_the_engine_seed_draws_unseeded_requests_seeds() -> None:
    """vLLM's ``seed``: engines seeded alike give the same unseeded requests the same sampling
    seeds in the same order (each request its own, n samples seed + i); a request's own seed is
    kept; another engine seed draws others. A negative one is refused."""
    def seeds(engine_seed: int) -> list[int]:
        engine = make_engine(seed=engine_seed)
        drawn = [seq.seed for i in range(3) for seq in engine.add_request(f"r{i}", [3, 1, 4], SamplingParams(n=2))]
        return drawn + [seq.seed for seq in engine.add_request("own", [3, 1, 4], SamplingParams(seed=5))]
    first = seeds(7)
    assert seeds(7) == first and first[-1] == 5
    assert len(set(first[:-1:2])) == 3 and all(b == a + 1 for a, b in zip(first[:-1:2], first[1:-1:2]))
    assert seeds(8)[:-1] != first[:-1]
    with pytest.raises(ValueError, match="seed must be non-negative, got -1"):
        EngineConfig(seed=-1)


def test_reserve_activate_decode_role(async_scheduling: bool) -> None:
    engine = make_engine(num_blocks=8, block_size=4, async_scheduling=async_scheduling)
    prompt = [7] * 9
    seq = engine.reserve("d", prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert seq is not None and len(seq.block_table) == 3
    assert not engine.has_unfinished() and engine.step() == []
    for p, token in enumerate(prompt):                # the KV "arrives"
        engine.runner.slots[engine.runner._slot(seq.block_table, p)] = token
    engine.activate("d", TokenLogprob(token_id=11, logprob=-0.5))
    assert seq.output_token_ids == [11] and seq.num_computed_tokens == 9
    run_to_end(engine)
    assert seq.output_token_ids == [11, next_token(11), next_token(next_token(11)), next_token(next_token(next_token(11)))]
    assert engine.stats().used_blocks == 0
    # First token may already stop the request.
    done = engine.reserve("d2", [1, 2], SamplingParams(max_tokens=1))
    assert engine.activate("d2", TokenLogprob(token_id=5, logprob=0.0)).finish_reason == "length"
    assert done.is_finished and engine.stats().used_blocks == 0
    assert engine.reserve("big", [1] * 28, SamplingParams(max_tokens=4)) is not None
    assert engine.reserve("none", [1] * 8, SamplingParams(max_tokens=1)) is None
    with pytest.raises(KeyError):
        engine.activate("none", TokenLogprob(token_id=1, logprob=0.0))


def test_decode_role_reuses_the_prefix_it_holds(async_scheduling: bool) -> None:
    """A reservation takes the cached blocks of an earlier prompt's prefix; only the
    rest of its KV arrives (the fake runner checks every slot a step reads)."""
    engine = make_engine(num_blocks=16, block_size=4, async_scheduling=async_scheduling)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)

    def serve(rid: str, prompt: list[int], expect_cached: int) -> list[int]:
        seq = engine.reserve(rid, prompt, params)
        assert seq.num_cached_tokens == expect_cached and seq.num_computed_tokens == expect_cached
        for p in range(expect_cached, len(prompt)):   # only the rest of the KV "arrives"
            engine.runner.slots[engine.runner._slot(seq.block_table, p)] = prompt[p]
        table = list(seq.block_table)
        first = next_token(prompt[-1])
        engine.activate(rid, TokenLogprob(token_id=first, logprob=0.0))
        run_to_end(engine)
        assert seq.output_token_ids == [first, next_token(first), next_token(next_token(first))]
        return table

    first = list(range(1, 11))                        # blocks [1-4] [5-8] [9 10]
    a = serve("a", first, 0)
    b = serve("b", first[:8] + [20, 21, 22], 8)       # shares the two full blocks
    assert b[:2] == a[:2] and b[2] not in a
    c = serve("c", first, 8)                          # the same prompt: the last block still arrives
    assert c[:2] == a[:2]
    assert engine.stats().used_blocks == 0


def test_prefill_role_keeps_blocks_until_release() -> None:
    engine = make_engine(keep=True)
    (seq,) = engine.add_request("p", list(range(1, 11)), SamplingParams(temperature=0.0, max_tokens=1))
    layers: list[int] = []
    changed = engine.step(on_layer_done=lambda layer, chunks: layers.append(layer))
    assert changed == [seq] and seq.finish_reason == "length" and layers == [0, 1]
    assert engine.stats().used_blocks == 3
    stored = [h for e in engine.drain_block_events() if isinstance(e, BlockStored) for h in e.block_hashes]
    assert len(stored) == 2
    engine.release("p")
    assert engine.stats().used_blocks == 0 and engine.stats().cached_blocks == 2
    with pytest.raises(KeyError):
        engine.release("p")


def test_a_prefix_cache_reset_leaves_running_requests_whole_and_the_next_ones_cold(async_scheduling: bool) -> None:
    """Between steps: the blocks of a finished request are freed, and those a running request shares
    with it are uncached but keep their KV (the fake runner checks every slot each step reads, while
    new requests take the freed blocks); a request with the same prompt afterwards computes it all."""
    engine = make_engine(num_blocks=12, block_size=4, async_scheduling=async_scheduling)
    prompt = list(range(1, 11))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    (done,) = engine.add_request("done", prompt, params)
    run_to_end(engine)
    (running,) = engine.add_request("running", prompt + [12], params)
    for _ in range(3):
        engine.step()
    assert running.num_cached_tokens == 8 and not running.is_finished
    stored = [h for e in engine.drain_block_events() if isinstance(e, BlockStored) for h in e.block_hashes]
    held = sum(1 for b in running.block_table if engine.block_manager.blocks[b].block_hash is not None)
    assert held >= 2                                  # the two it shares with the finished one, and its own
    reset = engine.reset_prefix_cache()
    assert (reset.held_blocks, reset.freed_blocks) == (held, len(stored) - held)
    assert engine.drain_block_events() == [BlockRemoved(stored)]
    assert engine.stats().cached_blocks == 0
    (again,) = engine.add_request("again", prompt, params)
    others = [engine.add_request(f"o{i}", [20 + i] * 6, params)[0] for i in range(2)]
    run_to_end(engine)
    assert again.num_cached_tokens == 0
    for seq in (done, running, again, *others):
        assert seq.output_token_ids == expected_output(seq.prompt_token_ids, 8)[0]
    assert engine.stats().used_blocks == 0


def test_a_prefix_cache_reset_leaves_a_finished_prefills_blocks_until_release() -> None:
    engine = make_engine(keep=True)
    (seq,) = engine.add_request("p", list(range(1, 11)), SamplingParams(temperature=0.0, max_tokens=1))
    engine.step()
    table = list(seq.block_table)
    assert engine.reset_prefix_cache().held_blocks == 2
    assert seq.block_table == table and engine.stats().used_blocks == 3 and engine.stats().cached_blocks == 0
    engine.release("p")
    stats = engine.stats()
    assert (stats.used_blocks, stats.cached_blocks, stats.free_blocks) == (0, 0, stats.total_blocks)


MODEL_DIR = Path("/work/shared/models/shakespeare-llama-5m")


@pytest.mark.model
@pytest.mark.skipif(not MODEL_DIR.exists(), reason="needs the demo checkpoint")
def test_real_model_greedy_parity_with_prefix_cache_chunking_and_preemption(async_scheduling: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from baton.engine.hashing import model_fingerprint
    from baton.engine.model_runner import ModelRunner

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    hf = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    texts = ["JULIET:\nO Romeo, Romeo", "JULIET:\nO Romeo, Romeo! wherefore", "ROMEO:\nBut soft"]
    prompts = [tokenizer(t).input_ids for t in texts]
    config = EngineConfig(block_size=4, num_blocks=14, max_num_batched_tokens=8, max_num_seqs=4, async_scheduling=async_scheduling)
    runner = ModelRunner(str(MODEL_DIR), config)
    engine = EngineCore(runner, config, eos_token_ids=[], hash_extra=model_fingerprint(MODEL_DIR))
    recomputed: list[str] = []
    execute = runner.execute

    def recording_execute(chunks: list[ScheduledChunk], on_layer_done: Callable[[int], None] | None = None, fed: FedTokens | None = None):
        recomputed.extend(c.seq.seq_id for c in chunks if c.seq.output_token_ids and c.start < c.seq.num_tokens - 1)
        return execute(chunks, on_layer_done, fed)

    runner.execute = recording_execute
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    first = engine.add_request("warm", prompts[0], params)[0]
    run_to_end(engine)
    seqs = [first] + [engine.add_request(f"r{i}", p, params)[0] for i, p in enumerate(prompts)]
    run_to_end(engine)
    assert seqs[1].num_cached_tokens > 0 and seqs[2].num_cached_tokens > 0
    assert recomputed, "the small pool should have forced a preemption"
    for seq, prompt in zip(seqs, [prompts[0], *prompts]):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(12):
                ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert seq.output_token_ids == ids[0, len(prompt) :].tolist()
    assert engine.stats().used_blocks == 0


def test_the_request_table_holds_children_back_until_the_first_prompt_is_computed():
    from baton.engine.request_table import RequestTable

    table = RequestTable()
    first, *children = seqs = [Sequence(f"r-{i}", [1, 2, 3], SamplingParams(n=3), lora="a") for i in range(3)]
    table.add("r", seqs, held_back=True)
    table.add("s", [Sequence("s", [4], SamplingParams())])
    assert "r" in table and table.taken(["r-1", "x", "s"]) == ["r-1", "s"] and table.request_of("r-2") == "r"
    assert (table.num_held_back(), table.unfinished_under("a"), table.release_children()) == (2, 3, [])
    first.num_computed_tokens = 3
    assert table.release_children() == children and table.num_held_back() == 0
    for seq in seqs[:2]:
        seq.status = SequenceStatus.FINISHED
        table.forget_if_done(seq)
    assert "r" in table and table.unfinished_under("a") == 1    # one sequence still runs
    children[1].status = SequenceStatus.FINISHED
    table.forget_if_done(children[1])
    assert "r" not in table and table.request_of("r-0") is None and table.forget("r") == []
