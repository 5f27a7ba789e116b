"""Layer-wise KV streaming (`--kv-streaming layerwise`): a prompt's KV leaves while it is computed.

The model's decoder layers are split into `num_groups` groups of consecutive layers. A forward
hook on the last layer of each group (PyTorch's `register_forward_hook`: the model code knows
nothing of it) runs right after that layer has written its K/V for the step, and queues one
part per prompt in the step on the outbox (kv_outbox.py): the step's tokens of that chunk x the
group's layers. The outbox's lane thread sends it while the following layers compute (CPU:
torch releases the GIL in its kernels; CUDA: the part carries an event recorded on the compute
stream after the group, and the lane waits on it before reading; checked on an H100:
bench/results/stream_equal_h100_hookfix_2026-12-06.json). A step that ran its layers without
their hooks (a CUDA graph replay of 1-token chunks; any forward pass that does not call each
layer as a module) still sends every group: `end_step` queues the groups whose hook did not
run, after the step. Parts go in order, each an ordinary transfer with
`meta["kv_part"] = [index, is_last]` (transfer/endpoint/parts.py); the decode worker's receiver
writes each as it lands and completes the reservation after the last (once every layer has
every token: it refuses a stream with a hole).

Order of a request's parts: its prefix-cache hit first (tokens `[0, num_cached)`, all layers,
queued when its first computed chunk starts), then chunk by chunk and group by group; the last
group of the last chunk is held back until the first token is sampled and goes last, with the
first token in its meta (`finish`), exactly where a whole transfer would have carried it.

Ownership: as with a whole transfer, the blocks stay the worker's until the request's single
outcome (kv_outbox.py); the worker does not free a streaming request's blocks before that, even
on an abort (`cancel` queues the end of the stream; the outcome follows the parts queued).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any

import torch

from engine.llm_engine import LLMEngine
from engine.model_runner import ScheduledSeq
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from prefill.kv_outbox import KvOutbox
from protocol import prefill_ctrl as ctrl
from transfer.endpoint.parts import part_meta

log = logging.getLogger(__name__)


@dataclass
class _InStep:
    """A prompt in the step being computed: its request, the chunk's tokens, whether it is the
    prompt's last chunk (then its last group waits for the first token)."""

    msg: ctrl.Prefill
    block_table: list[int]
    token_start: int
    token_end: int
    is_final: bool


def layer_groups(num_layers: int, num_groups: int) -> list[tuple[int, int]]:
    """`[start, end)` of each group of consecutive layers, tapered at both ends: group sizes
    weighted 1, 2, 4, 4, ..., 4, 2, 1 (30 layers in 6 groups: 2, 4, 9, 9, 4, 2). What the
    overlap cannot hide is the first group's compute (before anything can leave; it counts
    when the link is the slower phase) and the last group's send (after the last layer; it
    counts when the prefill is): small end groups shrink both, with the per-part cost of only
    `num_groups` parts. Two groups or fewer, or too few layers to taper: near-equal runs."""
    n = max(1, min(num_groups, num_layers))
    weights = [2 ** min(i, n - 1 - i, 2) for i in range(n)]
    if n < 3 or num_layers < 2 * n:
        weights = [1] * n
    marks = list(itertools.accumulate(weights))
    bounds = [0]
    for i, mark in enumerate(marks):  # rounded cumulative shares, each group >= 1 layer
        left = n - 1 - i
        bounds.append(min(max(round(num_layers * mark / marks[-1]), bounds[-1] + 1),
                          num_layers - left))
    return list(itertools.pairwise(bounds))


def take_out(scheduler: Scheduler, seq: Sequence) -> None:
    """Remove a streaming prompt from the batch keeping its blocks (the outbox reads them until
    the request's outcome); a preempted one waiting for readmission holds none."""
    if any(s is seq for s in scheduler.running):
        scheduler.detach(seq)
    else:
        scheduler.abort(seq.seq_id)



class LayerStreamer:
    def __init__(self, engine: LLMEngine, outbox: KvOutbox, num_groups: int) -> None:
        layers = engine.runner.model.model.layers
        self.outbox = outbox
        self.num_layers = len(layers)
        self.groups = layer_groups(self.num_layers, num_groups)
        self.device = engine.runner.device
        self._in_step: list[_InStep] = []
        self._sent_groups: set[tuple[int, int]] = set()  # groups queued by their hook this step
        self._is_bypass_logged = False
        self._num_parts: dict[str, int] = {}  # parts queued per streaming request
        self._final_chunk: dict[str, _InStep] = {}  # the last chunk, until `finish`
        self._address: dict[str, str] = {}  # the decode worker's KV address per request
        self._hooks = [layers[group[1] - 1].register_forward_hook(self._hook(group))
                       for group in self.groups]

    def has_final(self, request_id: str) -> bool:
        """Whether this request streamed its last chunk (then `finish` sends its last part)."""
        return request_id in self._final_chunk

    def begin_step(self, batch: list[ScheduledSeq], msgs: dict[str, ctrl.Prefill]) -> None:
        """Before the model runs `batch`: note the prompts whose chunks stream (`msgs`: the
        live, not aborted requests by id); queue a prefix-cache hit first."""
        self._in_step, self._sent_groups = [], set()
        for s in batch:
            seq, msg = s.seq, msgs.get(s.seq.seq_id)
            if msg is None or s.num_tokens == 0 or seq.num_computed_tokens >= seq.num_prompt_tokens:
                continue
            start = seq.num_computed_tokens
            end = min(start + s.num_tokens, seq.num_prompt_tokens)
            chunk = _InStep(msg, list(seq.block_table), start, end,
                            end == seq.num_prompt_tokens)
            if seq.seq_id not in self._num_parts and start > 0:  # cached tokens go first
                # (on CUDA after the steps enqueued so far: they may have written those blocks)
                self._queue(chunk, 0, start, (0, self.num_layers), {}, is_last=False,
                            ready=self._ready_event())
            self._num_parts.setdefault(seq.seq_id, 0)
            self._in_step.append(chunk)
            if chunk.is_final:
                self._final_chunk[seq.seq_id] = chunk

    def end_step(self, is_computed: bool = True) -> None:
        """After the model ran the step (`is_computed`: it did not fail): queue the groups whose
        hook did not run, so that every group of every chunk goes out whatever way the step ran
        its layers (a CUDA graph replay runs no Python hook; so does any forward pass that does
        not call each layer as a module). Such groups leave after the step, with no overlap."""
        missed = [g for g in self.groups if g not in self._sent_groups]
        if is_computed and self._in_step and missed:
            if not self._is_bypass_logged:
                log.warning("layer-wise KV streaming: the forward pass ran %d of %d layer "
                            "groups without their hooks; those groups are sent after the step "
                            "(no overlap)", len(missed), len(self.groups))
                self._is_bypass_logged = True
            ready = self._ready_event()
            for group in missed:
                self._queue_group(group, ready)
        self._in_step, self._sent_groups = [], set()

    def finish(self, request_id: str, meta: dict[str, Any]) -> None:
        """The first token is sampled: queue the last part (last group of the last chunk)."""
        chunk = self._final_chunk.pop(request_id)
        self._queue(chunk, chunk.token_start, chunk.token_end, self.groups[-1], meta,
                    is_last=True)
        del self._num_parts[request_id]
        self._address.pop(request_id, None)

    def cancel(self, request_id: str) -> bool:
        """The request ends before its last part (abort, failed part): end its stream. True when
        parts were queued: the outbox still reads its blocks, and an outcome follows them."""
        self._final_chunk.pop(request_id, None)
        address = self._address.pop(request_id, None)
        if self._num_parts.pop(request_id, 0) == 0 or address is None:
            return False
        self.outbox.end_stream(request_id, address)
        return True

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()

    # ---- inside the forward pass ----------------------------------------------------------
    def _hook(self, group: tuple[int, int]) -> Any:
        def after_group(module: Any, inputs: Any, output: Any) -> None:
            if not self._in_step or group in self._sent_groups:
                return
            self._queue_group(group, self._ready_event())
        return after_group

    def _ready_event(self) -> Any:
        """On CUDA, an event recorded now on the current (compute) stream: the K/V enqueued so
        far is written once the GPU gets here (the lane waits on it before reading)."""
        if self.device.type != "cuda":
            return None
        ready = torch.cuda.Event()
        ready.record()
        return ready

    def _queue_group(self, group: tuple[int, int], ready: Any) -> None:
        """One part per prompt in the step: its chunk's tokens x `group`'s layers."""
        self._sent_groups.add(group)
        for chunk in self._in_step:
            if chunk.is_final and group == self.groups[-1]:
                continue  # goes with the first token (`finish`)
            self._queue(chunk, chunk.token_start, chunk.token_end, group, {},
                        is_last=False, ready=ready)

    def _queue(self, chunk: _InStep, token_start: int, token_end: int, layers: tuple[int, int],
               meta: dict[str, Any], *, is_last: bool, ready: Any = None) -> None:
        msg = chunk.msg
        index = self._num_parts.get(msg.request_id, 0)
        self._num_parts[msg.request_id] = index + 1
        self._address[msg.request_id] = msg.kv_address
        self.outbox.send_part(msg.request_id, msg.kv_address, chunk.block_table, token_start,
                              token_end, layers, msg.kv_spec, {**meta, **part_meta(index, is_last)},
                              (index, is_last), ready, kv_token=msg.kv_token)
