"""BlockPool: KV block ids with reference counts, a free list and a prefix-cache index.

Invariants (checked by `check_integrity`, property-tested):
- every block is either referenced (ref > 0) or on the free list, never both;
- a reference count never goes below zero: a decref of a free block raises
  `BlockAccountingError` *before* changing anything;
- a free block may still hold cached content (it keeps its hash) until it is handed out again,
  at which point its hash is forgotten. Free blocks are handed out least recently freed first.

Single-threaded: the owner (a scheduler or worker loop) serialises calls.
"""

from __future__ import annotations

from collections import OrderedDict

from engine.errors import BlockAccountingError, OutOfBlocks


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._hash_of: list[int | None] = [None] * num_blocks
        self._block_of_hash: dict[int, int] = {}

    # ---- queries ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def lookup(self, block_hash: int) -> int | None:
        """The block holding content with this hash, referenced or cached-free, if any."""
        return self._block_of_hash.get(block_hash)

    # ---- changes ---------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """Take n fresh blocks (ref = 1). Raises OutOfBlocks without taking any."""
        if n > len(self._free):
            raise OutOfBlocks(n, len(self._free))
        blocks = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            self._forget_hash(block)
            self._ref[block] = 1
            blocks.append(block)
        return blocks

    def share(self, block: int) -> None:
        """Add a reference to a block found by `lookup` (revives it if it was cached-free)."""
        self._check_id(block)
        if self._ref[block] == 0:
            del self._free[block]
        self._ref[block] += 1

    def incref(self, block: int) -> None:
        self._check_id(block)
        if self._ref[block] <= 0:
            raise BlockAccountingError(f"incref of free block {block}")
        self._ref[block] += 1

    def decref_all(self, blocks: list[int]) -> None:
        """Drop one reference from each block; validated as a whole before any change."""
        pending: dict[int, int] = {}
        for b in blocks:
            self._check_id(b)
            pending[b] = pending.get(b, 0) + 1
            if pending[b] > self._ref[b]:
                raise BlockAccountingError(
                    f"block {b} released {pending[b]} times but has {self._ref[b]} references")
        for b in blocks:
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free[b] = None

    def set_hash(self, block: int, block_hash: int) -> None:
        """Record that a referenced, full block holds content with this hash."""
        self._check_id(block)
        if self._ref[block] <= 0:
            raise BlockAccountingError(f"set_hash on free block {block}")
        if self._hash_of[block] == block_hash:
            return
        self._forget_hash(block)
        if block_hash not in self._block_of_hash:  # first holder wins; duplicates stay private
            self._hash_of[block] = block_hash
            self._block_of_hash[block_hash] = block

    # ---- integrity -------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise BlockAccountingError if any invariant is broken (run when idle or in tests)."""
        for b in range(self.num_blocks):
            is_free = b in self._free
            if self._ref[b] < 0 or (self._ref[b] == 0) != is_free:
                raise BlockAccountingError(f"block {b}: ref {self._ref[b]}, free={is_free}")
        for h, b in self._block_of_hash.items():
            if self._hash_of[b] != h:
                raise BlockAccountingError(f"hash index points at block {b} that forgot it")

    def _forget_hash(self, block: int) -> None:
        h = self._hash_of[block]
        if h is not None:
            self._hash_of[block] = None
            if self._block_of_hash.get(h) == block:
                del self._block_of_hash[h]

    def _check_id(self, block: int) -> None:
        if not 0 <= block < self.num_blocks:
            raise BlockAccountingError(f"block id {block} outside pool of {self.num_blocks}")
