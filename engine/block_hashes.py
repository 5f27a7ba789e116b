"""Prefix hashes of token blocks, the same in every process: the engine's prefix cache keys its
blocks by them and the proxy's prefix-aware router predicts cache hits with them.

Imports neither torch nor anything of the engine's runtime, so the proxy can use it.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import xxhash


def block_hashes(token_ids: Sequence[int], block_size: int,
                 num_blocks: int | None = None) -> list[int]:
    """Chained xxh64 of the first `num_blocks` full blocks: hash i covers tokens [0, (i+1)*bs).

    Deterministic across processes (the proxy's prefix-aware router uses the same function).
    """
    full = len(token_ids) // block_size
    n = full if num_blocks is None else min(num_blocks, full)
    hashes, prev = [], 0
    for i in range(n):
        block = token_ids[i * block_size:(i + 1) * block_size]
        prev = xxhash.xxh64_intdigest(struct.pack(f"<Q{block_size}I", prev, *block))
        hashes.append(prev)
    return hashes
