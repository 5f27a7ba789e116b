"""KvCacheManager: per-sequence block tables on top of a BlockPool, with exact prefix reuse.

Check-then-act: callers ask `can_allocate` / `can_grow` and then `allocate` / `grow`; every
mutating call validates before it changes anything, so a failing call leaves no half-done
allocation. Ownership: a sequence's blocks are owned by this manager from `allocate` until
`free`; `free` is idempotent per sequence (its block table is emptied).

Prefix cache: each *full* block is keyed by a chained xxhash of all token ids up to its end
(block i's key covers tokens [0, (i+1) * block_size)), so a hit is exact.
"""

from __future__ import annotations

from engine.block_hashes import block_hashes
from engine.block_pool import BlockPool
from engine.errors import BlockAccountingError, OutOfBlocks
from engine.sequence import Sequence


class KvCacheManager:
    def __init__(self, num_blocks: int, block_size: int,
                 enable_prefix_caching: bool = True) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- admission --------------------------------------------------------------------------
    def _prefix_hits(self, seq: Sequence, use_prefix_cache: bool = True) -> list[int]:
        """Cached blocks that cover the start of the prompt (at least one token left to compute)."""
        if not (self.enable_prefix_caching and use_prefix_cache) \
                or seq.params.prompt_logprobs is not None:  # needs every prompt position
            return []
        max_blocks = (seq.num_prompt_tokens - 1) // self.block_size
        hits = []
        for h in block_hashes(seq.token_ids, self.block_size, max_blocks):
            block = self.pool.lookup(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_allocate(self, seq: Sequence, num_tokens: int | None = None,
                     use_prefix_cache: bool = True) -> bool:
        n = seq.num_tokens if num_tokens is None else num_tokens
        hits = self._prefix_hits(seq, use_prefix_cache)
        revived = sum(1 for b in hits if self.pool.ref_count(b) == 0)
        return self.blocks_for(n) - len(hits) <= self.pool.num_free - revived

    def allocate(self, seq: Sequence, num_tokens: int | None = None,
                 use_prefix_cache: bool = True) -> int:
        """Give a new sequence blocks for `num_tokens` (default: all its tokens).

        Reuses cached prefix blocks (unless `use_prefix_cache` is False: blocks another process
        will write into must be private); sets `num_cached_tokens` and `num_computed_tokens` to the
        reused length and returns it. Raises OutOfBlocks (nothing taken) when it does not fit.
        """
        if seq.block_table:
            raise BlockAccountingError(f"sequence {seq.seq_id} already holds blocks")
        n = seq.num_tokens if num_tokens is None else num_tokens
        if n < seq.num_prompt_tokens:
            raise BlockAccountingError(f"cannot reserve {n} tokens for a prompt of "
                                       f"{seq.num_prompt_tokens}")
        if not self.can_allocate(seq, n, use_prefix_cache):
            raise OutOfBlocks(self.blocks_for(n), self.pool.num_free)
        hits = self._prefix_hits(seq, use_prefix_cache)
        for b in hits:
            self.pool.share(b)
        seq.block_table = hits + self.pool.allocate(self.blocks_for(n) - len(hits))
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size
        return seq.num_cached_tokens

    # ---- growth -----------------------------------------------------------------------------
    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(seq.block_table) <= self.pool.num_free

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Make the block table cover `num_tokens` tokens (no-op when it already does)."""
        extra = self.blocks_for(num_tokens) - len(seq.block_table)
        if extra > 0:
            seq.block_table.extend(self.pool.allocate(extra))

    def commit_computed(self, seq: Sequence) -> None:
        """Publish the full, computed blocks of a sequence to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens, seq.num_tokens) // self.block_size
        for block, h in zip(seq.block_table[:num_full],
                            block_hashes(seq.token_ids, self.block_size, num_full), strict=True):
            self.pool.set_hash(block, h)

    # ---- release ----------------------------------------------------------------------------
    def truncate(self, seq: Sequence, new_len: int) -> None:
        """Drop tokens after `new_len` and the blocks no longer needed.

        Refuses (typed error, no change) to truncate past the sequence's length or its prompt.
        """
        if not seq.num_prompt_tokens <= new_len <= seq.num_tokens:
            raise BlockAccountingError(
                f"sequence {seq.seq_id} has length {seq.num_tokens} "
                f"(prompt {seq.num_prompt_tokens}); cannot truncate to {new_len}")
        keep = self.blocks_for(new_len)
        self.pool.decref_all(seq.block_table[keep:][::-1])
        del seq.block_table[keep:]
        del seq.token_ids[new_len:]
        seq.num_computed_tokens = min(seq.num_computed_tokens, new_len)

    def fork(self, parent: Sequence, child: Sequence) -> list[tuple[int, int]]:
        """Share the parent's full blocks with the child; copy its partial last block.

        Returns (src_block, dst_block) pairs whose cache contents the caller must copy.
        """
        if child.block_table:
            raise BlockAccountingError(f"fork target {child.seq_id} already holds blocks")
        num_full = parent.num_computed_tokens // self.block_size
        shared = parent.block_table[:num_full]
        partial = parent.block_table[num_full:self.blocks_for(parent.num_computed_tokens)]
        if len(partial) > self.pool.num_free:
            raise OutOfBlocks(len(partial), self.pool.num_free)
        for b in shared:
            self.pool.incref(b)
        copies = list(zip(partial, self.pool.allocate(len(partial)), strict=True))
        child.block_table = shared + [dst for _, dst in copies]
        child.num_computed_tokens = parent.num_computed_tokens
        return copies

    def free(self, seq: Sequence) -> None:
        """Release every block of the sequence (tail first, so prefixes stay cached longest)."""
        self.pool.decref_all(seq.block_table[::-1])
        seq.block_table = []
        seq.num_computed_tokens = 0
