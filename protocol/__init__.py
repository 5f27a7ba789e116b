"""protocol: the control plane between the proxy and the workers.

Owns: the codec (codec.py: typed dataclasses <-> versioned msgpack, every field checked before a
message is built, never pickle), the typed ZMQ queues (channel.py: one socket carries one
message family), and the three message families, one module each:
- decode_ctrl.py   proxy -> decode worker (Reserve, PrefillLocally, Abort, AbortAll, Shutdown)
- prefill_ctrl.py  proxy -> prefill worker (Prefill, Abort, AbortAll, Shutdown)
- lifecycle_ctrl.py Abort, AbortAll and Shutdown, in both ctrl families
- worker_events.py workers -> proxy (Hello, Heartbeat, Reserved, Rejected, Tokens, PrefillDone,
                   RequestFailed)
and the typed failure codes those carry (errors.py: `ErrorCode`, which says what is retryable);
bounds.py (ranges and lengths of fields, some named after the receiver's limits: max-model-len,
vocabulary), rejections.py (what each plane refused) and log_limit.py (rate-limited logging).
Fields are typed all the way down: the engine's `SamplingParams`, `KvSpec`, `TokenLogprob` and
`FinishReason` travel as themselves, never as dicts or JSON strings.
Never touches: torch, models, KV bytes (those travel on the transfer layer's own sockets), HTTP.
Imports only the torch-free parts below it.
"""
