"""NCCL payloads for the KV data plane: header over ZMQ, bytes over a 2-rank communicator.

One `NcclLink` (a 2-rank communicator, its own CUDA stream, a watchdog) per (prefill, decode)
pair. The prefill side (rank 0) creates the unique id and sends it over the pair's ZMQ
connection (NCCL_HELLO, which also says eager/blocking); both sides create the communicator on
a helper thread (blocking kind, the default) and connect it with one warm-up transfer, or
initialise non-blocking and poll; either way every wait has a deadline.

A transfer (see wire/framing.py), eager (default): the sender sends SIZES over ZMQ (the byte
count of every payload buffer), gathers buffer 0 (one Triton kernel per buffer, block_copy.py,
on its second stream) and enqueues its ncclSend, sends the HEADER (transport "nccl"), then
gathers and enqueues the rest, each send after its own gather, without waiting: NCCL holds the
sends on the GPU until the receiver posts → the receiver, on SIZES (checked against its limits),
allocates the receive buffers and posts one ncclRecv per buffer at once (`post_sizes`); on the
HEADER it checks that the sizes match (`prepare`; else the link is dropped: the pair would be
out of step), looks up the reservation, builds the writer and writes each buffer into its
cache (one scatter kernel per buffer) as soon as it has arrived (`begin`); once every write is
queued it sends a 16-byte status word on the link behind them (OK) and the ack over ZMQ; the
sender returns when it has both (its wait is on the GPU: no ZMQ hop after the last write).
Nothing received is interpreted or written before the header is validated. A receiver that
refuses the header (no reservation, incompatible spec, undecodable) still takes the payload
into the posted buffers and drops it (`refuse`), sends the REFUSED status word, and answers
ERROR: the sender's sends settle, the link stays in step, and the sender raises the
receiver's typed error. If nothing was posted at all (SIZES refused), the
sends stay stuck: after a grace period the sender aborts the communicator and builds a new one
on its next transfer. A receiver that finds the pair out of step (sizes differ from the
header, receives still posted for a transfer that never came) drops its link and marks its
error `link_dropped`, so the sender drops its own and says hello again. A sender created with
`eager=False` sends no SIZES, waits for READY from the receiver (posted on the header) before
its first send, and gets no status word.

Every wait has a deadline. The watchdog thread aborts the communicator (`ncclCommAbort`) when
a deadline passes while a call is stuck; the transfer then fails with `TransferTimeout`, the
link is dropped and rebuilt on the next transfer. Ownership is as for ZMQ (endpoint/sender.py,
endpoint/receiver.py): source blocks are read until `send` returns; destination blocks belong to
the receiver's reservation.

Code: the link (communicator, streams, watchdog) in nccl/link.py, the two ends in
nccl/sender.py and nccl/receiver.py (a `PayloadSender` and a `PayloadReceiver`, payload/);
this module names the protocol and the public API. Benchmarks pass a `Tracer`
(payload/trace.py) to either plugin for timing marks; serving passes none and pays nothing.

Use: `ZmqKvSender(endpoint, nccl=NcclSenderPlugin(device))` and
`ZmqKvReceiver(cache, config, ..., nccl=NcclReceiverPlugin(device))`. Without CUDA or
without libnccl, constructing a plugin raises `TransportUnavailable` with what to do.
"""

from transfer.nccl.link import NcclLink, Watchdog
from transfer.nccl.receiver import NcclReceiverPlugin
from transfer.nccl.sender import NcclSenderPlugin

__all__ = ["NcclLink", "NcclReceiverPlugin", "NcclSenderPlugin", "Watchdog"]
