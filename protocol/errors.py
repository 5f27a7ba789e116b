"""Why a request failed on a worker, as a typed code that crosses processes (`RequestFailed`).

Whether another worker may redo the failed step follows from the code and from nothing else
(`ErrorCode.retryable`); the proxy retries a retryable prefill failure on another prefill
worker, or has the decode worker prefill locally, and fails the request otherwise. A KV transfer
failure gets its code from the transfer layer's own error class (`TransferError.retryable`,
transfer/wire/errors.py): `KV_TRANSFER` when it is retryable, `KV_REFUSED` when it is not.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    INVALID_REQUEST = "invalid_request"  # the request itself: no worker would run it
    OVERLOADED = "overloaded"  # this worker cannot take it now: another one may
    KV_TRANSFER = "kv_transfer"  # the KV's path failed (timeout, peer lost, corrupted bytes)
    KV_REFUSED = "kv_refused"  # the KV can land from no sender (specs, limits, reservation gone)
    KV_LOST = "kv_lost"  # decode: the prompt KV failed on arrival; the reservation is released
    KV_TIMEOUT = "kv_timeout"  # decode: the prompt KV did not arrive in time; released too
    INTERNAL = "internal"  # a failure this worker did not expect (a bug: see its log)
    ABORTED = "aborted"  # the worker was told to drop it (Abort / AbortAll)

    @property
    def retryable(self) -> bool:
        """Whether redoing the failed step on another worker may succeed."""
        return self in (ErrorCode.OVERLOADED, ErrorCode.KV_TRANSFER)

    @classmethod
    def of_transfer(cls, retryable: bool) -> ErrorCode:
        """The code of a KV transfer failure, from the transfer error's own `retryable`."""
        return cls.KV_TRANSFER if retryable else cls.KV_REFUSED
