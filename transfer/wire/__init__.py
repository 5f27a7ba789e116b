"""transfer.wire: what a KV message is on the wire, and what can go wrong with one.

Owns the versioned transfer header (header.py: `TransferHeader`, `TensorEntry`,
`ReceiverLimits`, `decode_header` validating every field before anything is allocated), cache
geometry per layout (layouts.py), the typed errors with their stable wire codes (errors.py)
and the ZMQ message kinds of the data plane with their small control bodies (framing.py).
Never touches tensors' bytes or sockets.
"""
