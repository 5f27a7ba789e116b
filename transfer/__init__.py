"""transfer: moves KV cache between workers. Sub-packages, each depending only on those below
it in this list (import-linter enforces it):

- endpoint/  the two ends: `ZmqKvSender` (prefill) and `ZmqKvReceiver` (decode) on a ZMQ
             DEALER/ROUTER pair that carries headers, acks and errors; each end drives one or
             more payload paths through the interfaces of payload/ and never branches on which.
- frames/, stream/, nccl/
             the payload paths, independent of each other: ZMQ DATA frames on the pair's own
             socket (every receiver takes them), writev/readv on a plain data connection per
             pair, and a 2-rank NCCL communicator per pair (nccl/transport.py describes it).
- payload/   the seam: `PayloadSender` / `PeerChannel` (send.py), `PayloadReceiver` /
             `ReceiverDesk` / `InboundTransfer` (receive.py), and `Tracer` (trace.py), optional
             timing marks for benchmarks.
- convert/   cache geometry (cache.py: `PagedKvCache`), value conversion (quant.py, plan.py:
             compatibility and the per-token value path, TP head slices), packing scattered
             blocks into few buffers (pack.py, iov.py, block_copy.py), writing a message into a
             paged cache or fresh tensors (writer.py, canonical.py), in-process conversion
             (local.py), GPU architecture profiles (profiles.py).
- wire/      the self-describing KV message: `TransferHeader` (versioned msgpack header + raw
             buffers, validated against receiver-set limits before a byte is read), layouts
             (layouts.py), the typed errors that also travel on the wire (errors.py) and the
             ZMQ message kinds (framing.py).

Never touches: block allocation (the engine owns blocks; this package reads/writes only the
block ids it is given), scheduling, models, HTTP, the control plane (protocol/).

The serving layer's API:
- prefill: `ZmqKvSender(endpoint, config).send(cache, block_table, token_start, token_end,
  request_id=..., meta=...) -> SendResult` (raises typed TransferErrors);
- decode: `ZmqKvReceiver(cache, config, on_complete=..., on_release=...)` with
  `expect(request_id, block_table)`, `cancel(request_id)`, `poll(timeout)` or `start()`;
- NCCL: the same two classes with `nccl=NcclSenderPlugin(device)` / `NcclReceiverPlugin(device)`;
- in process: `convert.local.convert_kv`, `convert.local.write_kv`,
  `convert.canonical.decode_to_tensors`.
Ownership rules are written at the top of endpoint/sender.py and endpoint/receiver.py.
"""
