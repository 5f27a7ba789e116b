"""engine: the model runtime, with no network.

Owns: configuration, weights (GGUF, safetensors), tokenizer and chat template, the Llama-family
model, the paged KV cache (block pool, allocator, prefix hashes in the torch-free
block_hashes.py), attention, sampling, the scheduler and the memory plan (`KvSpec` says what
the cache looks like). Never touches: sockets, processes, other workers.
"""
