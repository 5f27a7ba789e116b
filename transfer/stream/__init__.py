"""transfer.stream: the stream payload path (the ZMQ transport's default).

A plain TCP or Unix-socket data connection per sender/receiver pair, set up over the pair's ZMQ
socket with a random token; the sender writes with `sendmsg` straight from cache blocks
(sender.py: `StreamLink`), the receiver reads with `recvmsg` straight into the reserved blocks
when no conversion is needed (receiver.py: `StreamInbox`; job.py, plan.py). Headers, acks and
errors stay on the ZMQ socket (endpoint/).
"""
