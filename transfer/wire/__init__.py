"""transfer.wire: what a KV message is on the wire, and what can go wrong with one.

Owns the versioned transfer header (header.py: `TransferHeader`, `TensorEntry`,
`ReceiverLimits`, `decode_header` validating every field before anything is allocated) and the
typed errors with their stable wire codes (errors.py). Never touches tensors' bytes or sockets.
"""
