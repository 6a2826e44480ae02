"""Block pool: exact block ids, ref counts, prefix hits (confirmed by token ids),
LRU eviction, events, and the pool invariant under random operations."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from baton.engine import block_manager as bm_module
from baton.engine.block_manager import BlockManager, BlockRemoved, BlockStored
from baton.engine.hashing import block_hashes
from baton.engine.sampling_params import SamplingParams
from baton.engine.sequence import Sequence

pytestmark = pytest.mark.unit

BS = 4


def make_seq(seq_id: str, tokens: list[int], **params) -> Sequence:
    return Sequence(seq_id=seq_id, prompt_token_ids=list(tokens), params=SamplingParams(**params))


def compute(bm: BlockManager, seq: Sequence, num_tokens: int) -> None:
    """What the engine does after a forward pass over ``num_tokens`` tokens."""
    seq.num_computed_tokens += num_tokens
    bm.cache_full_blocks(seq, seq.num_computed_tokens)


def check_invariant(bm: BlockManager) -> None:
    refs = [b.ref_count for b in bm.blocks]
    assert all(r >= 0 for r in refs)
    in_use = sum(1 for r in refs if r > 0)
    assert bm.num_used_blocks == in_use
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_total_blocks
    free_ids = list(bm._free) + list(bm._evictable)
    assert len(set(free_ids)) == len(free_ids)
    assert all(refs[i] == 0 for i in free_ids)


def test_scripted_block_ids_and_refcounts() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS, hash_extra="m")
    a = make_seq("a", list(range(10)))                    # 2 full blocks + 2 tokens
    assert bm.allocate(a, 10)
    assert a.block_table == [0, 1, 2]
    assert (a.num_computed_tokens, a.num_cached_tokens) == (0, 0)
    compute(bm, a, 10)
    assert bm.num_cached_blocks == 2
    assert bm.drain_events() == [BlockStored(block_hashes(list(range(10)), BS, "m"))]
    assert bm.drain_events() == []

    b = make_seq("b", list(range(9)))                     # shares a's 2 full blocks
    assert bm.cached_prefix_tokens(b) == 8
    assert bm.allocate(b, 1)
    assert b.block_table == [0, 1, 3]
    assert (b.num_computed_tokens, b.num_cached_tokens) == (8, 8)
    assert [bm.blocks[i].ref_count for i in range(4)] == [2, 2, 1, 1]
    assert bm.num_used_blocks == 4 and bm.num_free_blocks == 4

    a.output_token_ids = [10, 11]                        # a decodes into its 3rd block
    assert bm.append_slots(a, 2)
    assert a.block_table == [0, 1, 2]
    compute(bm, a, 2)
    assert bm.num_cached_blocks == 3
    assert bm.append_slots(a, 1) and a.block_table == [0, 1, 2, 4]

    bm.free(a)
    assert [bm.blocks[i].ref_count for i in range(5)] == [1, 1, 0, 1, 0]
    bm.free(b)
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 8
    assert bm.num_cached_blocks == 3                      # still cached, now evictable
    assert bm.num_evictable_blocks == 3
    check_invariant(bm)


def test_last_prompt_block_is_never_reused() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq("a", list(range(8)))
    assert bm.allocate(a, 8)
    compute(bm, a, 8)
    same = make_seq("same", list(range(8)))               # identical, block-aligned prompt
    assert bm.cached_prefix_tokens(same) == 4             # the last block is recomputed
    assert bm.allocate(same, 4)
    assert same.num_computed_tokens == 4
    assert same.block_table[0] == a.block_table[0] and same.block_table[1] != a.block_table[1]


def test_hash_collision_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bm_module.hashing, "block_hashes", lambda tokens, bs, extra, parent=None: [7] * (len(tokens) // bs))
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq("a", [1, 2, 3, 4, 5])
    assert bm.allocate(a, 5)
    compute(bm, a, 5)
    forged = make_seq("forged", [9, 9, 9, 9, 5])          # same (forged) hash, other tokens
    assert bm._by_hash.get(7) == a.block_table[0]
    assert bm.cached_prefix_tokens(forged) == 0
    assert bm.allocate(forged, 5)
    assert forged.num_computed_tokens == 0
    assert a.block_table[0] not in forged.block_table
    genuine = make_seq("genuine", [1, 2, 3, 4, 6])
    assert bm.cached_prefix_tokens(genuine) == 4


def test_parent_hash_is_confirmed(monkeypatch: pytest.MonkeyPatch) -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    a = make_seq("a", [1, 2, 3, 4, 0])
    assert bm.allocate(a, 5)
    compute(bm, a, 5)
    # Forge: the second block's hash is found, but its stored parent differs.
    real = block_hashes([1, 2, 3, 4], 2, "")
    monkeypatch.setattr(bm_module.hashing, "block_hashes", lambda *args, **kw: [123, real[1]])
    b = make_seq("b", [5, 6, 3, 4, 0])
    bm._by_hash[123] = a.block_table[0]
    bm.blocks[a.block_table[0]].token_ids = (5, 6)
    assert bm.cached_prefix_tokens(b) == 2                # first block "hits", second refused


def test_lru_eviction_order_and_events() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq("a", list(range(9)))                     # blocks 0,1 full; 2 partial
    assert bm.allocate(a, 9)
    compute(bm, a, 9)
    b = make_seq("b", list(range(100, 105)))             # block 3 full
    assert bm.allocate(b, 5) is False                     # needs 2, only 1 free
    assert b.block_table == [] and bm.num_used_blocks == 3
    bm.free(a)                                            # 2 -> free; 1, 0 -> evictable (tail first)
    hashes_a = block_hashes(list(range(9)), BS, "")
    bm.drain_events()
    assert list(bm._evictable) == [1, 0]
    assert bm.allocate(b, 5)
    assert b.block_table == [3, 2]                        # never-used first, no eviction yet
    assert bm.drain_events() == []
    c = make_seq("c", list(range(200, 203)))
    assert bm.allocate(c, 3)
    assert c.block_table == [1]                           # LRU: a's tail block goes first
    assert bm.drain_events() == [BlockRemoved([hashes_a[1]])]
    assert bm.cached_prefix_tokens(make_seq("a2", list(range(9)))) == 4


def test_hit_on_evictable_block_counts_against_free() -> None:
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = make_seq("a", list(range(5)))
    assert bm.allocate(a, 5)
    compute(bm, a, 5)
    bm.free(a)                                            # block 0 evictable, 1 free, 2 free
    b = make_seq("b", list(range(12)) + [99])            # hit block 0, needs 3 more -> 4 total
    assert bm.allocate(b, 9) is False
    assert bm.num_evictable_blocks == 1 and bm.blocks[0].ref_count == 0
    c = make_seq("c", list(range(11)))                     # hit block 0 + 2 new = 3 total
    assert bm.allocate(c, 7)
    assert c.block_table[0] == 0 and c.num_cached_tokens == 4
    check_invariant(bm)


def test_duplicate_content_is_not_registered_twice() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a, b = make_seq("a", list(range(5))), make_seq("b", list(range(5)))
    assert bm.allocate(a, 5) and bm.allocate(b, 5)        # both computed in the same step
    compute(bm, a, 5)
    compute(bm, b, 5)
    assert bm.num_cached_blocks == 1
    assert [type(e) for e in bm.drain_events()] == [BlockStored]
    bm.free(a)
    bm.free(b)
    assert bm.num_evictable_blocks == 1 and bm.num_free_blocks == 8


def test_prefix_caching_disabled_and_prompt_logprobs() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = make_seq("a", list(range(9)))
    assert bm.allocate(a, 9)
    compute(bm, a, 9)
    assert bm.num_cached_blocks == 0 and bm.drain_events() == []
    bm2 = BlockManager(num_blocks=8, block_size=BS)
    a2 = make_seq("a", list(range(9)))
    assert bm2.allocate(a2, 9)
    compute(bm2, a2, 9)
    wants_logprobs = make_seq("b", list(range(9)), prompt_logprobs=1)
    assert bm2.cached_prefix_tokens(wants_logprobs) == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "append", "compute", "free", "reset"]), st.integers(0, 5), st.integers(1, 9)), max_size=60))
def test_random_operations_keep_invariants(ops: list[tuple[str, int, int]]) -> None:
    bm = BlockManager(num_blocks=10, block_size=BS)
    seqs = [make_seq(f"s{i}", [i % 2] * (3 + i) + list(range(i))) for i in range(6)]
    for op, index, amount in ops:
        seq = seqs[index]
        if op == "alloc" and not seq.block_table:
            n = min(amount, seq.num_tokens)
            ok = bm.allocate(seq, max(1, n - bm.cached_prefix_tokens(seq)))
            assert ok or seq.block_table == []
        elif op == "append" and seq.block_table:
            before = list(seq.block_table)
            if bm.append_slots(seq, amount):
                assert len(seq.block_table) * BS >= seq.num_computed_tokens + amount
            else:
                assert seq.block_table == before
        elif op == "compute" and seq.block_table:
            room = len(seq.block_table) * BS - seq.num_computed_tokens
            seq.output_token_ids += [amount] * max(0, seq.num_computed_tokens + room - seq.num_tokens)
            compute(bm, seq, room)
        elif op == "free":
            bm.free(seq)
            seq.num_computed_tokens = 0
        elif op == "reset":
            bm.reset_prefix_cache()
            assert bm.num_cached_blocks == bm.num_evictable_blocks == 0
        check_invariant(bm)
        held = [b for s in seqs for b in s.block_table]
        for block_id in set(held):
            assert bm.blocks[block_id].ref_count == held.count(block_id)
        tables = [s.block_table for s in seqs if s.block_table]
        for table in tables:
            assert len(set(table)) == len(table)


def test_pool_and_scheduler_import_no_torch() -> None:
    code = "import sys, baton.engine.block_manager, baton.engine.scheduler; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_forget_lora_uncaches_the_adapters_blocks_held_or_not() -> None:
    """Unloading adapter "x": its cached-free blocks become free, a block still held (a finished
    prefill awaiting its release) is freed without a hash when released; the index hears of both;
    the base model's and another adapter's blocks stay cached."""
    bm = BlockManager(num_blocks=16, block_size=BS, hash_extra="m")
    tokens = list(range(9))
    seqs = {name: Sequence(seq_id=name or "base", prompt_token_ids=tokens, params=SamplingParams(), lora=name)
            for name in ("x", "y", None)}
    held = Sequence(seq_id="held", prompt_token_ids=list(range(60, 73)), params=SamplingParams(), lora="x")
    for seq in [*seqs.values(), held]:
        assert bm.allocate(seq, seq.num_tokens)
        compute(bm, seq, seq.num_tokens)
    for seq in seqs.values():
        bm.free(seq)
    stored = [h for e in bm.drain_events() if isinstance(e, BlockStored) for h in e.block_hashes]
    x_hashes = {h for h in stored if bm.blocks[bm._by_hash[h]].lora == "x"}
    assert len(x_hashes) == 5                      # "x"'s two full blocks, then the held sequence's three
    assert bm.num_evictable_blocks == 6
    bm.forget_lora("x")
    assert bm.num_evictable_blocks == 4            # "y"'s and the base model's
    assert bm.drain_events() == [BlockRemoved(sorted(x_hashes, key=stored.index))]
    check_invariant(bm)
    for name in ("x", "y", None):
        again = make_seq(f"again-{name}", tokens)
        again.lora = name
        assert bm.cached_prefix_tokens(again) == (0 if name == "x" else 8)
    free = bm.num_free_blocks
    bm.free(held)                                  # its four blocks, none cached any more
    assert bm.num_free_blocks == free + 4 and bm.num_evictable_blocks == 4
    check_invariant(bm)


def test_reset_prefix_cache_frees_unreferenced_blocks_and_uncaches_held_ones() -> None:
    """Cached blocks nobody holds become free; cached blocks running sequences hold (one shared by
    two) keep their references and content but no later request finds them, and once released they
    are free, not cached-free; the index hears of every one."""
    bm = BlockManager(num_blocks=16, block_size=BS, hash_extra="m")
    done = make_seq("done", list(range(9)))               # two full blocks, then freed: cached-free
    running = make_seq("running", list(range(40, 53)))    # three full blocks, still held
    for seq in (done, running):
        assert bm.allocate(seq, seq.num_tokens)
        compute(bm, seq, seq.num_tokens)
    bm.free(done)
    sharer = make_seq("sharer", list(range(40, 49)))      # shares the running sequence's first two blocks
    assert bm.allocate(sharer, 1) and sharer.num_cached_tokens == 8
    stored = [h for e in bm.drain_events() for h in e.block_hashes]
    held_tables = {s.seq_id: list(s.block_table) for s in (running, sharer)}
    held_refs = {b: bm.blocks[b].ref_count for b in running.block_table}
    assert bm.num_cached_blocks == 5 and bm.num_evictable_blocks == 2

    reset = bm.reset_prefix_cache()
    assert (reset.freed_blocks, reset.held_blocks) == (2, 3)
    assert bm.drain_events() == [BlockRemoved(stored)]
    assert bm.num_cached_blocks == 0 and bm.num_evictable_blocks == 0
    assert bm.num_used_blocks == 5 and bm.num_free_blocks == 11
    assert {s.seq_id: s.block_table for s in (running, sharer)} == held_tables
    assert {b: bm.blocks[b].ref_count for b in running.block_table} == held_refs
    check_invariant(bm)
    for i, tokens in enumerate((list(range(9)), list(range(40, 53)))):
        assert bm.cached_prefix_tokens(make_seq(f"probe-{i}", tokens)) == 0
    later = make_seq("later", list(range(40, 53)))
    assert bm.allocate(later, later.num_tokens) and not set(later.block_table) & set(running.block_table)
    compute(bm, later, later.num_tokens)                  # recomputed: cached again, in new blocks
    assert bm.drain_events() == [BlockStored(stored[2:])]
    compute(bm, running, 0)
    assert bm.drain_events() == []                        # the held blocks stay uncached
    for seq in (running, sharer, later):
        bm.free(seq)
    assert bm.num_evictable_blocks == 3 and bm.num_free_blocks == 16
    check_invariant(bm)
