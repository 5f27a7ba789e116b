"""Fixtures shared by several test files of tests/unit (the repository-wide ones, `tiny_engine`
among them, are in tests/conftest.py): the worker handler tests' fake proxy and worker factory
(worker_fakes.py), and the stream transfer tests' source cache (transfer_stream_helpers.py).
Imports are inside the fixtures, so that unit tests which use none of them do not load the
workers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from worker_fakes import FakeProxy

    from engine.llm_engine import LLMEngine
    from transfer.convert.cache import PagedKvCache
    from worker.base import WorkerBase
    from worker.config import WorkerConfig


@pytest.fixture
def proxy() -> Iterator[FakeProxy]:
    """The worker handler tests' fake proxy (worker_fakes.FakeProxy), closed at teardown."""
    from worker_fakes import FakeProxy

    p = FakeProxy()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def make_worker(tiny_engine: Callable[..., LLMEngine]) -> Iterator[Callable[..., Any]]:
    """Factory: `make_worker(DecodeWorker, config, **engine_overrides)`; closed at teardown."""
    from worker_fakes import KV_64K

    made: list[WorkerBase] = []

    def build(cls: type, config: WorkerConfig, **engine: Any) -> Any:
        worker = cls(config, tiny_engine(**{"kv_cache_memory": KV_64K, **engine}))
        made.append(worker)
        return worker

    try:
        yield build
    finally:
        for worker in made:
            worker.close()


@pytest.fixture
def src() -> PagedKvCache:
    """The stream transfer tests' sender side: a 16-block `SRC` cache (transfer_stream_helpers.py)
    of random contents, seed 0."""
    import torch
    from transfer_stream_helpers import SRC

    from bench.kv_fill import fill_random
    from transfer.convert.cache import PagedKvCache

    cache = PagedKvCache.allocate(SRC, 16)
    fill_random(cache, torch.Generator().manual_seed(0))
    return cache
