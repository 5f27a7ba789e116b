"""PagedKvCache: a paged KV cache (any supported layout) as the transfer layer sees it.

It wraps tensors someone else owns — the engine's cache, or a test's — and never allocates or
frees blocks. Ownership: the caller keeps the tensors alive and decides which block ids a
transfer may read (sender) or write (receiver); this class only reads/writes the blocks and
token positions it is told to.

Per layer it holds `spec.num_tensors` tensors in `spec.layout` (shapes from
`layouts.layer_tensor_shapes`) and, when the spec has scales, one float32 scale tensor
(`layouts.scale_tensor_shape`). The engine's default cache — one `[2, B, S, H, D]` tensor per
layer — is `PagedKvCache(KvSpec(layout=NHD, is_kv_stacked=True, ...), [(t,) for t in layers])`,
or `PagedKvCache.from_engine(spec, layers)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine.kv_spec import KvSpec, ScaleGranularity
from transfer.wire import layouts
from transfer.wire.errors import CacheMismatch, InvalidRequest


@dataclass
class PagedKvCache:
    spec: KvSpec
    layers: list[tuple[torch.Tensor, ...]]
    scales: list[torch.Tensor] | None = None
    # block_copy.CacheTable once built (False: the kernel does not apply to this cache)
    copy_table: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        spec = self.spec
        if len(self.layers) != spec.num_layers:
            raise CacheMismatch(f"{len(self.layers)} layers given for {spec.describe()}")
        self.layers = [tuple(t) for t in self.layers]
        first = self.layers[0][0]
        is_stacked = len(layouts.layer_tensor_shapes(spec, 1)[0]) == len(layouts.part_block_shape(
            spec, layouts.data_parts(spec)[0])) + 2
        axis = 1 if is_stacked else 0
        if first.dim() <= axis:
            raise CacheMismatch(f"layer 0 tensor of shape {tuple(first.shape)} for "
                                f"{spec.describe()}")
        self._num_blocks = int(first.shape[axis])
        want = layouts.layer_tensor_shapes(spec, self._num_blocks)
        dtype = layouts.storage_dtype(spec.dtype)
        for i, tensors in enumerate(self.layers):
            got = [tuple(t.shape) for t in tensors]
            if got != want or any(t.dtype != dtype or not t.is_contiguous() for t in tensors):
                raise CacheMismatch(
                    f"layer {i}: tensors {got} {[t.dtype for t in tensors]} do not match "
                    f"{want} {dtype} (contiguous) of {spec.describe()}"
                )
        want_scale = layouts.scale_tensor_shape(spec, self._num_blocks)
        if (want_scale is None) != (self.scales is None):
            what = "missing" if self.scales is None else "given"
            raise CacheMismatch(f"scales {what} for {spec.describe()}")
        if self.scales is not None and (len(self.scales) != spec.num_layers or any(
                tuple(s.shape) != want_scale or s.dtype != layouts.SCALE_DTYPE
                for s in self.scales)):
            raise CacheMismatch(f"scale tensors must be float32 {want_scale} per layer")

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def allocate(cls, spec: KvSpec, num_blocks: int,
                 device: str | torch.device = "cpu") -> PagedKvCache:
        """Zero-filled cache (tests, benchmarks). Scales start at 1.0."""
        dtype = layouts.storage_dtype(spec.dtype)
        shapes = layouts.layer_tensor_shapes(spec, num_blocks)
        layers = [tuple(torch.zeros(s, dtype=dtype, device=device) for s in shapes)
                  for _ in range(spec.num_layers)]
        shape = layouts.scale_tensor_shape(spec, num_blocks)
        scales = None if shape is None else [
            torch.ones(shape, dtype=layouts.SCALE_DTYPE, device=device)
            for _ in range(spec.num_layers)
        ]
        return cls(spec, layers, scales)

    @classmethod
    def from_engine(
        cls, spec: KvSpec, tensors: Sequence[torch.Tensor | Sequence[torch.Tensor]],
        scales: Sequence[torch.Tensor] | None = None,
    ) -> PagedKvCache:
        """Accept one tensor per layer, or a (K, V) pair per layer."""
        layers = [(t,) if isinstance(t, torch.Tensor) else tuple(t) for t in tensors]
        return cls(spec, layers, None if scales is None else list(scales))

    # ---- geometry -----------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def device(self) -> torch.device:
        return self.layers[0][0].device

    def parts(self, layer: int) -> dict[str, torch.Tensor]:
        """`{part: [B, *part_block_shape]}` views of one layer."""
        return layouts.split_parts(self.spec, self.layers[layer])

    def block_rows(self, layer: int, part: str) -> tuple[int, int, int] | None:
        """(base address, block stride, block bytes) of one layer's part, all in bytes; None
        when a block is not one contiguous piece of memory."""
        t = self.parts(layer)[part]
        if t.dim() < 2 or not t[0].is_contiguous():
            return None
        size = t.element_size()
        return t.data_ptr(), t.stride(0) * size, t[0].numel() * size

    def token_view(self, layer: int, component: int) -> torch.Tensor:
        """`[B, S, H, *dims]` view of one component of one layer (writes land in the cache)."""
        for part, t in self.parts(layer).items():
            for comp, view in layouts.token_views(self.spec, part, t):
                if comp == component:
                    return view
        raise InvalidRequest(f"component {component} not in {self.spec.describe()}")

    def scale_view(self, layer: int, component: int) -> torch.Tensor | None:
        """per-token-head `[B, S, H, G]`, per-head `[H, G]`, per-tensor `[G]`; None without
        scales."""
        if self.scales is None:
            return None
        return self.scales[layer][component]

    def check_block_table(self, block_table: Sequence[int], token_end: int) -> torch.Tensor:
        """The block ids covering tokens `[0, token_end)` as an int64 tensor, all checked."""
        need = -(-token_end // self.spec.block_size)
        if len(block_table) < need:
            raise InvalidRequest(
                f"block table has {len(block_table)} blocks; tokens up to {token_end} need {need} "
                f"of {self.spec.block_size} tokens"
            )
        try:
            ids = np.asarray(block_table[:need], dtype=np.int64)
        except (TypeError, ValueError, OverflowError):
            raise InvalidRequest("block ids must be integers") from None
        if ids.ndim != 1 or (need and (int(ids.min()) < 0 or int(ids.max()) >= self.num_blocks)):
            raise InvalidRequest(f"block ids must lie in [0, {self.num_blocks}), "
                                 f"got {ids.tolist()[:8]}...")
        return torch.from_numpy(ids)

    def slots(self, block_ids: torch.Tensor, start: int,
              end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(block id, offset) of token positions `[start, end)` given the sequence's block ids."""
        pos = torch.arange(start, end, dtype=torch.int64)
        s = self.spec.block_size
        blk = block_ids[pos // s]
        dev = self.device
        return blk.to(dev), (pos % s).to(dev)

    # ---- token-level access (generic path; layout-independent) ---------------------------------
    def read_tokens(self, layer: int, component: int, block_ids: torch.Tensor, start: int,
                    end: int) -> torch.Tensor:
        """Copy of tokens `[start, end)` → `[T, H, D]` in the storage dtype."""
        blk, off = self.slots(block_ids, start, end)
        vals = self.token_view(layer, component)[blk, off]
        return vals.reshape(end - start, vals.shape[1], -1)

    def read_token_scales(self, layer: int, component: int, block_ids: torch.Tensor, start: int,
                          end: int) -> torch.Tensor | None:
        """Scales that apply to tokens `[start, end)`: `[T, H, G]` (broadcast for coarse scales)."""
        view = self.scale_view(layer, component)
        if view is None:
            return None
        t, h = end - start, self.spec.num_kv_heads
        if self.spec.scale_granularity is ScaleGranularity.PER_TOKEN_HEAD:
            blk, off = self.slots(block_ids, start, end)
            return view[blk, off]
        if self.spec.scale_granularity is ScaleGranularity.PER_HEAD:
            return view.unsqueeze(0).expand(t, h, view.shape[-1])
        return view.view(1, 1, -1).expand(t, h, view.shape[-1])

    def write_tokens(
        self, layer: int, component: int, block_ids: torch.Tensor, start: int, end: int,
        values: torch.Tensor, head_lo: int = 0, token_scales: torch.Tensor | None = None,
    ) -> None:
        """Write `values` `[T, Hw, D]` (storage dtype) at tokens `[start, end)`, heads
        `[head_lo, head_lo + Hw)` of this cache (local head indices), and per-token-head scales."""
        blk, off = self.slots(block_ids, start, end)
        view = self.token_view(layer, component)
        hw = values.shape[1]
        target = view[:, :, head_lo:head_lo + hw]
        target[blk, off] = values.to(target.device).reshape(end - start, hw, *view.shape[3:])
        if token_scales is not None:
            sview = self.scale_view(layer, component)
            assert sview is not None
            assert self.spec.scale_granularity is ScaleGranularity.PER_TOKEN_HEAD
            sview[:, :, head_lo:head_lo + hw][blk, off] = token_scales.to(sview.device)
