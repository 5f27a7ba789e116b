"""Typed errors of the transfer layer, each with a stable number that also travels on the wire.

Every failure a receiver or sender can meet is one of these; a Python `ValueError: not enough
values to unpack` escaping from this package is a bug. A receiver reports an error to the
sender as `{code, name, message, request_id}` (`to_wire`); the sender rebuilds the same class
(`from_wire`) with `is_remote=True`, so the prefill side can branch on the type.

Numbers: 10xx header/wire, 11xx compatibility and values, 12xx limits and integrity,
13xx transport and lifecycle.

`retryable` is the one statement of which transfer failures another sender may get past (the
serving layer codes a failed prefill from it: protocol/errors.py). True only where the failure
belongs to this transfer's path — a timeout, a lost peer, bytes corrupted on the way; False
where every sender would meet it again: the two caches (incompatible, values out of range), the
receiver's limits, a malformed header or frame, the reservation gone (unexpected, cancelled), a
caller's bug, a transport this deployment cannot run.
"""

from __future__ import annotations

from typing import Any, ClassVar


class TransferError(Exception):
    """Base class. `code` identifies the class on the wire; `retryable`: another sender may
    succeed where this transfer failed (see the module docstring)."""

    code: ClassVar[int] = 1000
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, request_id: str | None = None, is_remote: bool = False):
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.is_remote = is_remote
        # the receiver closed its payload link with this sender (an NCCL communicator out of
        # step, say): the sender must set up a new one before its next transfer
        self.link_dropped = False

    def __str__(self) -> str:
        prefix = f"[{type(self).__name__} {self.code}]"
        where = " (reported by the peer)" if self.is_remote else ""
        rid = f" request {self.request_id}:" if self.request_id else ""
        return f"{prefix}{rid} {self.message}{where}"

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "code": self.code,
            "name": type(self).__name__,
            "message": self.message[:4096],
            "request_id": self.request_id,
        }
        if self.link_dropped:
            wire["link_dropped"] = True
        return wire

    @staticmethod
    def from_wire(d: Any) -> TransferError:
        """Rebuild a peer's error; anything unreadable becomes a plain remote `TransferError`."""
        if not isinstance(d, dict):
            return TransferError(f"unreadable error reply {d!r:.200}", is_remote=True)
        code, message = d.get("code"), d.get("message")
        rid = d.get("request_id") if isinstance(d.get("request_id"), str) else None
        cls = error_class(code) if isinstance(code, int) else TransferError
        text = message if isinstance(message, str) else repr(message)
        err = TransferError.__new__(cls)
        TransferError.__init__(err, text, request_id=rid, is_remote=True)
        err.link_dropped = d.get("link_dropped") is True
        return err


# ---- header and wire (10xx) -------------------------------------------------------------------
class MalformedHeader(TransferError):
    """The header is not a well-formed, self-consistent v1 header (types, shapes, coverage)."""

    code = 1001


class UnsupportedVersion(MalformedHeader):
    code = 1002


class MalformedFrame(TransferError):
    """Payload frames disagree with the header (count, size, order, unknown transfer)."""

    code = 1003


# ---- compatibility and values (11xx) ----------------------------------------------------------
class IncompatibleKv(TransferError):
    """The sender's cache cannot be converted into the receiver's. Names both specs."""

    code = 1101
    reason: str = ""  # class defaults: a rebuilt remote error has only code and message

    def __init__(self, reason: str, src: Any = None, dst: Any = None, **kw: Any):
        parts = [reason]
        if src is not None:
            parts.append(f"source {src.describe() if hasattr(src, 'describe') else src}")
        if dst is not None:
            parts.append(f"destination {dst.describe() if hasattr(dst, 'describe') else dst}")
        super().__init__("; ".join(parts), **kw)
        self.reason = reason


class ValueOutOfRange(TransferError):
    """Finite source values the destination dtype cannot hold (they would become inf/NaN or be
    clipped)."""

    code = 1102
    dtype: str = ""
    num_values: int = 0
    max_abs: float = 0.0
    limit: float = 0.0

    def __init__(self, dtype: str, num_values: int, max_abs: float, limit: float, **kw: Any):
        super().__init__(
            f"{num_values} value(s) up to |{max_abs:g}| exceed {dtype}'s range ±{limit:g}; "
            "choose OverflowPolicy.CLAMP to clamp and report instead, or a wider destination dtype",
            **kw,
        )
        self.dtype, self.num_values, self.max_abs, self.limit = dtype, num_values, max_abs, limit


class CacheMismatch(TransferError):
    """Local cache tensors do not match the KvSpec they are declared with (a caller bug)."""

    code = 1103


class InvalidRequest(TransferError):
    """A local call with impossible arguments (token range beyond the block table, ...)."""

    code = 1104


# ---- limits and integrity (12xx) --------------------------------------------------------------
class LimitExceeded(TransferError):
    """The message asks for more than this receiver allows; nothing was allocated for it."""

    code = 1201
    what: str = ""
    value: int = 0
    limit: int = 0

    def __init__(self, what: str, value: int, limit: int, **kw: Any):
        super().__init__(f"{what} {value} exceeds this receiver's limit {limit}", **kw)
        self.what, self.value, self.limit = what, value, limit


class TooManyPeers(LimitExceeded):
    """A worker already has as many KV peers (NCCL links, send lanes) as it allows."""

    code = 1203


class ChecksumMismatch(TransferError):
    code = 1202
    retryable = True


# ---- transport and lifecycle (13xx) -----------------------------------------------------------
class TransferTimeout(TransferError):
    code = 1301
    retryable = True


class PeerLost(TransferError):
    """The peer disconnected or went silent mid-transfer."""

    code = 1302
    retryable = True


class UnexpectedTransfer(TransferError):
    """No reservation (`expect`) exists for this request id on the receiver."""

    code = 1303


class TransferCancelled(TransferError):
    code = 1304


class ReservationMismatch(UnexpectedTransfer):
    """The header's reservation token (`rtok`) is not the one of the reservation it names: the
    sender was not sent there by the proxy. Nothing is written; the reservation stays."""

    code = 1306


class TransportUnavailable(TransferError):
    """The chosen transport cannot run here (e.g. NCCL without CUDA or without libnccl)."""

    code = 1305


def _all_subclasses(cls: type[TransferError]) -> list[type[TransferError]]:
    out: list[type[TransferError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


def error_class(code: int) -> type[TransferError]:
    """The class with this wire code (TransferError for unknown codes)."""
    for cls in _all_subclasses(TransferError):
        if cls.code == code:
            return cls
    return TransferError
