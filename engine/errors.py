"""Typed engine errors. Each carries the numbers a user needs to act."""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class OutOfBlocks(EngineError):
    """The block pool cannot satisfy a request right now (callers queue or preempt)."""

    def __init__(self, needed: int, free: int) -> None:
        super().__init__(f"need {needed} KV blocks, {free} free")
        self.needed, self.free = needed, free


class BlockAccountingError(EngineError):
    """An operation would break a block-pool invariant (double free, truncate past length...).

    Raised before any state changes: the offending request fails alone, the pool is intact.
    """


class RequestError(EngineError):
    """A request that can never run (too long, bad sampling parameters)."""


class MemoryPlanError(EngineError):
    """The KV budget cannot hold what the configuration asks for."""
