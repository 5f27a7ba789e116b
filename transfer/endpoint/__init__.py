"""transfer.endpoint: the two ends of a KV transfer on a ZMQ DEALER -> ROUTER pair.

sender.py (`ZmqKvSender`, prefill) owns the DEALER connection (channel.py: `DealerChannel`)
and one payload path, chosen when it is built; receiver.py (`ZmqKvReceiver`, decode) owns the
ROUTER socket, routes every message to the payload path it belongs to, and leaves outcomes to
its books (books.py: `TransferBooks`; records.py: its config and reservations). The payload
paths (frames/, stream/, nccl/) are reached only through the interfaces of payload/; the
frames on the wire are listed in wire/framing.py. Ownership of the blocks on each side is
written at the top of sender.py and receiver.py.
"""
