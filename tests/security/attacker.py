"""The attacker of the security suite: a plain ZMQ PUSH socket that sends frames of its choice
to an internal socket of a running deployment, and the frames it sends.

Today any local process can connect to the internal planes; once they are authenticated (issue
#14 item 1), `push` connects as an insider holding the deployment's keys (a compromised
component), so the same tests keep proving that the guards behind authentication hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import zmq

from protocol.codec import CTRL_VERSION


def push(address: str, frames: list[bytes], linger_ms: int = 3000) -> None:
    """Send `frames` to `address` (tcp://host:port), each a message of its own; returns once
    ZMQ has handed them to the peer (or after `linger_ms`)."""
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, linger_ms)
        sock.connect(address)
        for f in frames:
            sock.send(f)
        sock.close(linger=linger_ms)
    finally:
        ctx.term()


def forge(type_name: str, fields: dict[str, Any]) -> bytes:
    """A control frame in the wire's envelope, fields as given (no codec check on this side)."""
    return msgpack.packb({"t": type_name, "v": CTRL_VERSION, "d": fields}, use_bin_type=True)


def params(**overrides: Any) -> dict[str, Any]:
    """A SamplingParams as it travels (all fields)."""
    return {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None,
            "stop_token_ids": [], "ignore_eos": True, "logprobs": None, "min_tokens": 0,
            **overrides}


def reserve(request_id: str, prompt_ids: list[Any], **param_overrides: Any) -> bytes:
    return forge("Reserve", {"request_id": request_id, "prompt_ids": prompt_ids,
                             "params": params(**param_overrides), "remote_prefill": True,
                             "queue_timeout_s": 30.0, "prefill_chunk": 0})


def bomb(num_bytes: int = 16 << 20) -> bytes:
    """`num_bytes` of msgpack: one array of empty arrays (each one byte on the wire, a Python
    list of ~56 bytes once decoded: ~1 GB for 16 MiB)."""
    n = num_bytes - 5
    return b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n


def events_address_of(pid: int) -> str:
    """The proxy's event socket, as any local user reads it off a worker's command line."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return args[args.index(b"--events-address") + 1].decode()
