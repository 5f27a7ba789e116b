"""worker: the process shell both worker roles share.

Owns: the worker's configuration (config.py: `WorkerConfig`, and `KvTransportConfig`, defined
once and embedded whole by `pdserve serve`'s ServeConfig), the CLI generated from config
dataclasses (args.py), the poll loop with Hello and heartbeats (base.py: `WorkerBase`), and the
process entry point (main.py, run by `python -m prefill ...` and `python -m decode ...`), and
rank 0's line to a tensor-parallel worker's follower ranks (tp_link.py).
Never touches: a role's logic (prefill/, decode/ subclass `WorkerBase`), HTTP, launching
processes (deploy/).
"""
