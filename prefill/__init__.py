"""prefill: the prefill role.

Owns: the prefill worker (worker.py: batches and chunks prompts, reuses cached prefixes,
samples the first token) and its KV endpoint (kv_outbox.py: one sending lane per decode worker;
this worker's blocks are read until the transfer's result comes back, then freed or kept in the
prefix cache; tensor parallel, either side: tp_sends.py, one rank's routes of a request,
tp_rank.py, a sender on each follower rank, and tp_outbox.py, rank 0's, which frees the blocks
only once every rank's sends ended). Never touches: HTTP, the decode worker's blocks (only the
transfer layer writes them, into the reservation the decode worker made), launching.
"""
