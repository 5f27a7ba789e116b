"""decode: the decode role.

Owns: the decode worker (worker.py: reserves blocks before any prefill starts, adopts arrived
KV, runs the continuous batch, streams token ids) and its KV endpoint (kv_inbox.py: the
transfer layer's receiver bound to this worker's cache). Each reservation ends exactly once:
arrival, abort, timeout or failed transfer, and every path frees its blocks.
Never touches: HTTP, detokenization (the proxy's), the prefill worker's blocks.
"""
