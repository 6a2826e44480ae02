"""The paged KV block pool with prefix caching. Pure Python: no torch.

Every block is in exactly one of three states:

- **free**: never used, or released without a hash; handed out first.
- **cached-free**: unreferenced but still holds a full, hashed block of KV; kept in
  LRU order and evicted only when a fresh block is needed and none is free.
- **in use**: referenced by one or more sequences (``ref_count > 0``). A prefix hit
  shares the block (the count goes up); it is never written again.

So ``num_free_blocks`` (free + cached-free) + ``num_used_blocks`` == ``num_total_blocks``.
All block ids ``0 .. num_blocks - 1`` are ordinary blocks (none is reserved).

The prefix cache maps a chained block hash (``baton.engine.hashing``) to a block
id. A hit is used only when the block's stored token ids and parent hash match
the request's; a hash collision costs a recomputation, never wrong KV. A sequence's
hashes carry its LoRA adapter and cache salt (``hashing.block_extra``): no block is shared across
adapters or salts. A block remembers the adapter it was computed under, so that unloading an
adapter (``forget_lora``) uncaches its blocks: other weights loaded later under the same name
hash the same, and must not find them. ``reset_prefix_cache`` (vLLM's) uncaches every block: the
next requests start cold. Uncaching a block that sequences hold only drops its hash: its KV and its
references stay, no later request finds it, and once released it is free, not cached-free. The pool
never talks to Redis: it queues ``BlockStored`` / ``BlockRemoved`` events that an
index publisher drains with ``drain_events()``.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from baton.engine import hashing
from baton.engine.sequence import Sequence


@dataclass
class BlockStored:
    block_hashes: list[int]


@dataclass
class BlockRemoved:
    block_hashes: list[int]


BlockEvent = BlockStored | BlockRemoved


@dataclass
class PrefixCacheReset:
    """What ``reset_prefix_cache`` did: cached blocks no sequence held, now free; cached blocks
    sequences hold, uncached and left to them."""

    freed_blocks: int
    held_blocks: int


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    parent_hash: int | None = None
    token_ids: tuple[int, ...] = ()
    lora: str | None = None        # the LoRA adapter its KV was computed under (while cached)


@dataclass
class _SeqState:
    hashes: list[int] = field(default_factory=list)   # chained hashes of the seq's full blocks
    num_registered: int = 0                           # leading blocks already known to the cache


class BlockManager:
    """Hands out KV blocks to sequences and keeps the prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, hash_extra: str = "", enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.block_size = block_size
        self.hash_extra = hash_extra
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()   # oldest first
        self._by_hash: dict[int, int] = {}
        self._seqs: dict[str, _SeqState] = {}
        self._events: list[BlockEvent] = []
        self.prefix_queried_tokens = 0   # prompt tokens first allocations looked up in the cache
        self.prefix_hit_tokens = 0       # and of those, found

    # -- counters ---------------------------------------------------------
    @property
    def num_total_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now: never used plus cached-free."""
        return len(self._free) + len(self._evictable)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_total_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a registered hash, referenced or not."""
        return len(self._by_hash)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def drain_events(self) -> list[BlockEvent]:
        events, self._events = self._events, []
        return events

    # -- prefix lookup ----------------------------------------------------
    def _state(self, seq: Sequence) -> _SeqState:
        state = self._seqs.setdefault(seq.seq_id, _SeqState())
        bs, done = self.block_size, len(state.hashes)
        if (done + 1) * bs <= seq.num_tokens:
            parent = state.hashes[-1] if state.hashes else None
            extra = hashing.block_extra(self.hash_extra, seq.lora, seq.cache_salt)
            state.hashes += hashing.block_hashes(seq.token_ids[done * bs :], bs, extra, parent)
        return state

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Block ids of the longest confirmed cached prefix. The block holding the
        last token is never reused: at least one token must be computed."""
        if not self.enable_prefix_caching or not seq.reuses_prefix:
            return []
        state, bs, tokens = self._state(seq), self.block_size, seq.token_ids
        hits: list[int] = []
        for i in range((seq.num_tokens - 1) // bs):
            block_id = self._by_hash.get(state.hashes[i])
            if block_id is None:
                break
            block = self.blocks[block_id]
            parent = state.hashes[i - 1] if i else None
            if block.parent_hash != parent or block.token_ids != tuple(tokens[i * bs : (i + 1) * bs]):
                break
            hits.append(block_id)
        return hits

    def cached_prefix_tokens(self, seq: Sequence) -> int:
        """How many leading tokens of ``seq`` a first ``allocate`` would reuse."""
        return len(self._prefix_hits(seq)) * self.block_size

    # -- allocation ---------------------------------------------------------
    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """First allocation of ``seq``: reuse its cached prefix, then add blocks for
        ``num_tokens`` more tokens. Sets ``num_computed_tokens`` / ``num_cached_tokens``.
        Returns False, changing nothing, when the pool is short."""
        if seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} already holds blocks")
        hits = self._prefix_hits(seq)
        num_cached = len(hits) * self.block_size
        num_new = self.blocks_needed(num_cached + num_tokens) - len(hits)
        hits_evictable = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if num_new > self.num_free_blocks - hits_evictable:
            return False
        for block_id in hits:
            self._ref(block_id)
        seq.block_table = hits + self._take(num_new)
        seq.num_computed_tokens = num_cached
        seq.num_cached_tokens = min(num_cached, seq.num_prompt_tokens)
        self._state(seq).num_registered = len(hits)
        self.prefix_queried_tokens += seq.num_prompt_tokens
        self.prefix_hit_tokens += seq.num_cached_tokens
        return True

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow the block table to hold ``num_computed_tokens + num_new_tokens``
        tokens. Returns False, changing nothing, when the pool is short."""
        num_new = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if num_new > self.num_free_blocks:
            return False
        if num_new > 0:
            seq.block_table += self._take(num_new)
        return True

    def cache_full_blocks(self, seq: Sequence, num_computed_tokens: int) -> None:
        """Register the newly computed full blocks of ``seq`` in the prefix cache.
        A block whose hash another block already holds stays unregistered."""
        bs = self.block_size
        known = self._seqs.get(seq.seq_id)
        if not self.enable_prefix_caching or (known is not None and num_computed_tokens // bs <= known.num_registered):
            return                                    # no new full block (most decode steps)
        state = self._state(seq)
        num_full = min(num_computed_tokens // bs, len(seq.block_table), len(state.hashes))
        stored: list[int] = []
        tokens = seq.token_ids
        for i in range(state.num_registered, num_full):
            block = self.blocks[seq.block_table[i]]
            block_hash = state.hashes[i]
            if block.block_hash is not None or block_hash in self._by_hash:
                continue
            block.block_hash = block_hash
            block.parent_hash = state.hashes[i - 1] if i else None
            block.token_ids = tuple(tokens[i * bs : (i + 1) * bs])
            block.lora = seq.lora
            self._by_hash[block_hash] = block.block_id
            stored.append(block_hash)
        state.num_registered = max(state.num_registered, num_full)
        if stored:
            self._events.append(BlockStored(stored))

    def free(self, seq: Sequence) -> None:
        """Give back every block of ``seq`` (tail first, so its tail is evicted first)
        and forget its hashes. Safe on a sequence that holds nothing."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is None:
                    self._free.append(block_id)
                else:
                    self._evictable[block_id] = None
        seq.block_table = []
        self._seqs.pop(seq.seq_id, None)

    def forget_lora(self, lora: str) -> None:
        """Uncache every block computed under LoRA adapter ``lora`` (it is being unloaded); those no
        sequence holds become free, those still held (a finished prefill awaiting ``release``) are
        freed without a hash. Queues their removal from the index."""
        self._uncache_where(lambda block: block.lora == lora)

    def reset_prefix_cache(self) -> PrefixCacheReset:
        """Uncache every block, so that no later request reuses one: those no sequence holds become
        free; those sequences hold (running, reserved for KV on its way, or a finished prefill
        awaiting ``release``) keep their KV and references, and are freed without a hash when
        released. Queues their removal from the index."""
        return self._uncache_where(lambda block: True)

    # -- internals ----------------------------------------------------------
    def _uncache_where(self, chosen: Callable[[Block], bool]) -> PrefixCacheReset:
        """Uncache the cached blocks ``chosen`` picks (see ``reset_prefix_cache``)."""
        removed: list[int] = []
        held = 0
        for block in self.blocks:
            if block.block_hash is not None and chosen(block):
                removed.append(self._uncache(block))
                if block.ref_count == 0:
                    del self._evictable[block.block_id]
                    self._free.append(block.block_id)
                else:
                    held += 1
        if removed:
            self._events.append(BlockRemoved(removed))
        return PrefixCacheReset(freed_blocks=len(removed) - held, held_blocks=held)

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._evictable[block_id]
        block.ref_count += 1

    def _take(self, count: int) -> list[int]:
        taken: list[int] = []
        removed: list[int] = []
        for _ in range(count):
            if self._free:
                block_id = self._free.popleft()
            else:
                block_id, _ = self._evictable.popitem(last=False)
                removed.append(self._uncache(self.blocks[block_id]))
            self.blocks[block_id].ref_count = 1
            taken.append(block_id)
        if removed:
            self._events.append(BlockRemoved(removed))
        return taken

    def _uncache(self, block: Block) -> int:
        block_hash = block.block_hash
        assert block_hash is not None
        del self._by_hash[block_hash]
        block.block_hash, block.parent_hash, block.token_ids, block.lora = None, None, (), None
        return block_hash
