"""decode: the decode role.

Owns: the decode worker (worker.py: reserves blocks before any prefill starts, adopts arrived
KV, runs the continuous batch, streams token ids) and its KV endpoint (kv_inbox.py: the
transfer layer's receiver bound to this worker's cache; tensor parallel: tp_rank.py, a receiver
on each follower rank for its heads, and tp_inbox.py, rank 0's view of them all as one inbox: a
request lands once every rank has its heads). Each reservation ends exactly once:
arrival, abort, timeout or failed transfer, and every path frees its blocks.
Never touches: HTTP, detokenization (the proxy's), the prefill worker's blocks.
"""
