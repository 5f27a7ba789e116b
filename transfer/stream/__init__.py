"""transfer.stream: the stream payload path (the ZMQ transport's default; header `transport`
"stream").

A plain TCP or Unix-socket data connection per sender/receiver pair, set up over the pair's ZMQ
socket with a random token; the sender writes with `sendmsg` straight from cache blocks
(sender.py: `StreamSender`), the receiver reads with `recvmsg` straight into the reserved blocks
when no conversion is needed (receiver.py: `StreamReceiver`; job.py, plan.py). Both implement
the interfaces of payload/; headers, acks and errors stay on the ZMQ socket (endpoint/).
"""
