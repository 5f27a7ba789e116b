"""CUDA graphs of the decode step: one query token per sequence, for fixed batch sizes.

A decode step of a Llama-8B-sized model is ~30 kernels per layer, ~1000 in all; launched one
by one from Python they cost more host time than a small batch costs the GPU. `DecodeGraphs`
captures the whole step (embedding -> layers -> logits) once per batch size in `sizes` and
replays it. Every graph reads its inputs from one static device buffer:

    [token_ids | positions | slot_mapping | seq_lens | block_tables (rows of max_blocks)]

(int64, sections of `max_batch_size` rows). A step writes its inputs into a pinned host
buffer of the same layout, copies it over in one non-blocking transfer, and replays the graph
of the smallest captured size >= its batch. Padding rows have slot -1 and seq_len 0: the
Triton kernels write nothing for them and attend to nothing, so they never touch a block.

Owned by the ModelRunner; it decides when a step may run here (`can_run`). Needs the triton
attention backend (engine/attention.py), whose kernels take their shapes from tensor shapes only.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.attention import AttentionMetadata, DecodeMetadata
from engine.kv_layout import LayerCache
from engine.memory_plan import KvPlan
from engine.model import LlamaForCausalLM

CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
"""Batch sizes captured (those up to --max-num-seqs, plus --max-num-seqs itself up to 256)."""


def capture_sizes(max_num_seqs: int) -> tuple[int, ...]:
    top = min(max_num_seqs, CAPTURE_SIZES[-1])
    return (*(s for s in CAPTURE_SIZES if s < top), top)


class DecodeGraphs:
    def __init__(self, model: LlamaForCausalLM, kv_caches: list[LayerCache], plan: KvPlan,
                 num_splits_for: dict[int, int], device: torch.device,
                 sizes: tuple[int, ...] | None = None) -> None:
        """num_splits_for: batch size -> context splits of the decode kernel for that graph."""
        self.model, self.kv_caches, self.spec, self.device = model, kv_caches, plan.spec, device
        self.sizes = tuple(sorted(sizes or capture_sizes(plan.max_num_seqs)))
        self.max_batch_size = self.sizes[-1]
        self.max_blocks = -(-plan.max_model_len // plan.spec.block_size)
        self.num_splits_for = num_splits_for
        n = self.max_batch_size
        self.buffer = torch.zeros(4 * n + n * self.max_blocks, dtype=torch.int64, device=device)
        self.buffer[2 * n:3 * n] = -1  # no slot: warm-up and capture write nothing to the cache
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    # ---- static inputs ------------------------------------------------------------------------
    def _inputs(self, bs: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        n, buf = self.max_batch_size, self.buffer
        tables = buf[4 * n:4 * n + bs * self.max_blocks].view(bs, self.max_blocks)
        seq_lens = buf[3 * n:3 * n + bs]
        meta = AttentionMetadata(
            slot_mapping=buf[2 * n:2 * n + bs], query_start_loc=list(range(bs + 1)),
            seq_lens=[1] * bs,  # host copy unused by the triton decode path
            block_tables=tables, spec=self.spec,
            decode=DecodeMetadata(seq_lens, tables, None, self.num_splits_for[bs]))
        return buf[:bs], buf[n:n + bs], meta

    def _forward(self, bs: int) -> torch.Tensor:
        input_ids, positions, meta = self._inputs(bs)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)  # [bs, hidden]
        return self.model.compute_logits(hidden)  # [bs, vocab] float32

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per size, largest first, all in one memory pool."""
        pool = None
        side = torch.cuda.Stream(self.device)
        for bs in sorted(self.sizes, reverse=True):
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up: compile kernels, create cuBLAS handles
                self._forward(bs)
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                logits = self._forward(bs)
            pool = graph.pool() if pool is None else pool
            self.graphs[bs] = (graph, logits)
        torch.cuda.synchronize(self.device)

    # ---- one step -----------------------------------------------------------------------------
    def can_run(self, num_seqs: int, max_num_blocks: int) -> bool:
        return 0 < num_seqs <= self.max_batch_size and max_num_blocks <= self.max_blocks

    def padded_size(self, num_seqs: int) -> int:
        return next(s for s in self.sizes if s >= num_seqs)

    @torch.inference_mode()
    def run(self, token_ids: list[int], positions: list[int], slots: list[int],
            seq_lens: list[int], block_tables: list[list[int]],
            use_graph: bool = True) -> torch.Tensor:
        """Logits [num_seqs, vocab] (float32) of one decode step. The tensor is the graph's
        static output: read it before the next `run`. `use_graph=False` runs the same padded
        step eagerly (the reference the graph must equal exactly)."""
        num_seqs, n = len(token_ids), self.max_batch_size
        bs = self.padded_size(num_seqs)
        host = torch.zeros(4 * n + bs * self.max_blocks, dtype=torch.int64,
                           pin_memory=self.device.type == "cuda")
        h = host.numpy()
        h[:num_seqs] = token_ids
        h[n:n + num_seqs] = positions
        h[2 * n:2 * n + bs] = -1
        h[2 * n:2 * n + num_seqs] = slots
        h[3 * n:3 * n + num_seqs] = seq_lens
        tables = h[4 * n:].reshape(bs, self.max_blocks)
        for row, table in zip(tables, block_tables, strict=False):
            row[:len(table)] = np.asarray(table, dtype=np.int64)
        self.buffer[:host.numel()].copy_(host, non_blocking=True)
        if not use_graph:
            return self._forward(bs)[:num_seqs]
        graph, logits = self.graphs[bs]
        graph.replay()
        return logits[:num_seqs]
