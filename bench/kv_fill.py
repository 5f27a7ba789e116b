"""Helpers for tests and benchmarks: fill caches with valid random values, calibrate scales.

Not used by the serving path. Everything takes an explicit `torch.Generator` (no global RNG).
"""

from __future__ import annotations

import threading
from types import MappingProxyType
from typing import Any

import torch

from engine.kv_spec import KvDtype, ScaleGranularity
from transfer.convert.cache import PagedKvCache
from transfer.wire import layouts

_FLOAT_STD = MappingProxyType({KvDtype.FP8_E4M3: 64.0, KvDtype.FP8_E5M2: 512.0})


def fill_random(cache: PagedKvCache, gen: torch.Generator, std: float = 1.0) -> None:
    """Random finite values in every block (and random positive scales)."""
    dtype = cache.spec.dtype
    for tensors in cache.layers:
        for t in tensors:
            if dtype is KvDtype.INT8:
                t.copy_(torch.randint(-127, 128, t.shape, generator=gen, dtype=torch.int8))
            elif dtype is KvDtype.INT4:
                t.copy_(torch.randint(0, 256, t.shape, generator=gen,
                                      dtype=torch.int16).to(torch.uint8))
            else:
                scale = _FLOAT_STD.get(dtype, std)
                t.copy_((torch.randn(t.shape, generator=gen) * scale).to(t.dtype))
    for s in cache.scales or []:
        s.copy_(torch.rand(s.shape, generator=gen) * 0.5 + 0.25)


def calibrate_scales(cache: PagedKvCache, amax_per_layer: list[torch.Tensor]) -> None:
    """Set a cache's per-tensor/per-head scales so values up to `amax` (per layer: `[C, H]`
    float32 over the cache's heads) fit its dtype without clipping."""
    spec = cache.spec
    if cache.scales is None or spec.scale_granularity is ScaleGranularity.PER_TOKEN_HEAD:
        return
    qmax = {KvDtype.FP8_E4M3: 448.0, KvDtype.FP8_E5M2: 57344.0, KvDtype.INT8: 127.0,
            KvDtype.INT4: 7.0}.get(spec.dtype, 1.0)
    g = layouts.scale_groups(spec)
    for s, amax in zip(cache.scales, amax_per_layer, strict=True):
        per = (amax / qmax).clamp_min(1e-12)  # [C, H]
        if spec.scale_granularity is ScaleGranularity.PER_TENSOR:
            s.copy_(per.amax(dim=1, keepdim=True).expand(-1, g))
        else:
            s.copy_(per.unsqueeze(-1).expand(-1, -1, g))


class ReceiverHarness:
    """A started ZmqKvReceiver whose outcomes land in `ended` (request id → reports or error);
    asserts that no reservation ends twice. For tests and benchmarks."""

    def __init__(self, cache: PagedKvCache, config: Any, **receiver: Any) -> None:
        """`receiver`: more ZmqKvReceiver arguments (context, security, on_refused)."""
        from transfer.endpoint.receiver import ZmqKvReceiver

        self.cache = cache
        self.ended: dict[str, Any] = {}
        self._cond = threading.Condition()
        self.rx = ZmqKvReceiver(cache, config, on_complete=self._end, on_release=self._end,
                                **receiver)
        self.rx.start()

    def _end(self, rid: str, outcome: Any) -> None:
        with self._cond:
            assert rid not in self.ended, f"reservation {rid} ended twice"
            self.ended[rid] = outcome
            self._cond.notify_all()

    def wait(self, rid: str, timeout: float = 10.0) -> Any:
        with self._cond:
            assert self._cond.wait_for(lambda: rid in self.ended, timeout), f"{rid} never ended"
            return self.ended[rid]

    def close(self) -> None:
        self.rx.close()
