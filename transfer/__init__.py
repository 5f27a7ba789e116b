"""transfer: moves KV cache between workers — wire format, validation, conversion, transports.

Owns: the self-describing KV message (header.py: versioned msgpack header + raw buffers,
validated against receiver-set limits before a byte is read), cache geometry (layouts.py,
cache.py), value conversion (quant.py, convert.py), packing scattered blocks into few buffers
(pack.py), writing messages into a paged cache or fresh tensors (writer.py, canonical.py),
the ZMQ transports — header on ZMQ, payload as ZMQ frames or (default) by writev/readv on a
stream data connection (zmq_*.py, stream_*.py, iov.py) — and NCCL (nccl_*.py), GPU
architecture profiles (profiles.py)
and typed errors (errors.py). Never touches: block allocation (the engine owns blocks; this
package only reads/writes the block ids it is given), scheduling, models, HTTP.

The serving layer's API:
- prefill: `ZmqKvSender(endpoint).send(cache, block_table, token_start, token_end,
  request_id=..., meta=...) -> SendResult` (raises typed TransferErrors);
- decode: `ZmqKvReceiver(cache, config, on_complete=..., on_release=...)` with
  `expect(request_id, block_table)`, `cancel(request_id)`, `poll(timeout)` or `start()`;
- NCCL: the same two classes with `nccl=NcclSenderPlugin(device)` / `NcclReceiverPlugin(device)`;
- in process: `local.convert_kv`, `local.write_kv`, `canonical.decode_to_tensors`.
Ownership rules are written at the top of zmq_sender.py and zmq_receiver.py.
ctrl_channel.py / ctrl_codec.py carry the control plane's typed messages (separate sockets).
"""
