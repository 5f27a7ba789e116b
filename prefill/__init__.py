"""prefill: the prefill role.

Owns: the prefill worker (worker.py: batches and chunks prompts, reuses cached prefixes,
samples the first token) and its KV endpoint (kv_outbox.py: one sending lane per decode worker;
this worker's blocks are read until the transfer's result comes back, then freed or kept in the
prefix cache). Never touches: HTTP, the decode worker's blocks (only the transfer layer writes
them, into the reservation the decode worker made), launching.
"""
