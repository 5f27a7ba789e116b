"""transfer.convert: from one cache's blocks to another cache's blocks, in process.

Owns the paged cache (cache.py: `PagedKvCache`, geometry from wire/layouts.py), value
conversion (quant.py; plan.py decides whether a source spec can become a destination spec and
how, or raises `IncompatibleKv` naming both), packing blocks into payload buffers (pack.py,
iov.py, block_copy.py), writing buffers into a paged cache or fresh tensors (writer.py,
canonical.py), the in-process codec (local.py) and GPU architecture profiles (profiles.py).
Never touches sockets or allocates/frees cache blocks.
"""
