"""transfer.payload: the seam between the two endpoints and the payload paths.

A payload path (frames/, stream/, nccl/) moves the bytes of a KV message; the endpoints
(endpoint/) carry its header, acks and errors on the pair's ZMQ socket and book its outcome.
They meet only through the interfaces here, each in its own module:
- send.py: `PayloadSender` (what a path does on the prefill side) and `PeerChannel` (what it
  may do on the pair's ZMQ connection: send frames, poll and wait for replies);
- receive.py: `PayloadReceiver` (what a path does on the decode side), `ReceiverDesk` (what it
  may ask of its receiver: run a step of a transfer, reply, ack early) and `InboundTransfer`
  (one accepted transfer, the record both sides of that seam share);
- trace.py: `Tracer`, optional timing marks for benchmarks (`NO_TRACE` by default: no cost).

Never touches sockets, tensors' bytes or blocks itself: interfaces and records only.
"""
