"""transfer.endpoint: the two ends of a KV transfer on a ZMQ DEALER -> ROUTER pair.

sender.py (`ZmqKvSender`, prefill) and receiver.py (`ZmqKvReceiver`, decode; records.py holds
its reservations and transfers in flight) exchange the frames listed in protocol.py: header,
payload as ZMQ frames or through stream/ or nccl/, ack or typed error. Ownership of the blocks
on each side is written at the top of sender.py and receiver.py.
"""
