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

Tensor parallelism (either side): each prefill rank streams its own heads to the decode ranks
that hold them, every part once per route (transfer/convert/tp_routes.py), carrying the route
count beside its part marker (transfer/endpoint/parts.py). Rank 0 tells its followers each
step's streaming chunks before the step and each stream's end (protocol/tp_ranks.py
StreamStep/StreamEnd); their own streamer (prefill/tp_rank.py) hooks their own layers, so the
parts of every rank leave while the layers compute. Only the first token's meta is rank 0's.

Ownership: as with a whole transfer, the blocks stay the worker's until the request's single
outcome (kv_outbox.py); the worker does not free a streaming request's blocks before that, even
on an abort (`cancel` queues the end of the stream; the outcome follows the parts queued).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.kv_spec import KvSpec
from engine.model_runner import ModelRunner, ScheduledSeq
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from prefill.kv_outbox import KvOutbox
from protocol import prefill_ctrl as ctrl
from transfer.convert.tp_routes import rank_spec, sends_of
from transfer.endpoint.parts import part_meta, routes_meta

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamDest:
    """Where one request's KV goes: the decode worker's rank-0 spec, its ranks' KV addresses
    (rank 0 first; one without TP has one) and the reservation's token."""

    request_id: str
    kv_spec: KvSpec
    addresses: list[str]
    kv_token: str = ""

    @classmethod
    def of(cls, msg: ctrl.Prefill) -> StreamDest:
        return cls(msg.request_id, msg.kv_spec, list(msg.kv_rank_addresses) or [msg.kv_address],
                   msg.kv_token)


@dataclass(frozen=True)
class _Target:
    """One receiver of a request's parts: with TP (either side) one route of this rank."""

    address: str
    spec: KvSpec
    heads: tuple[int, int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Chunk:
    """A prompt in the step being computed: where its KV goes, the chunk's tokens, whether it
    is the prompt's last chunk (then its last group waits for the first token)."""

    dest: StreamDest
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
    def __init__(self, runner: ModelRunner, outbox: KvOutbox, num_groups: int, rank: int = 0,
                 tp_size: int = 1, on_end: Callable[[str, bool], None] | None = None) -> None:
        """Stream the KV of `runner`'s cache (TP rank `rank` of `tp_size`) through `outbox`;
        `on_end(request_id, is_cancel)`: rank 0 tells its followers a stream's end."""
        layers = runner.model.model.layers
        self.outbox, self.rank, self.tp_size, self.on_end = outbox, rank, tp_size, on_end
        self.num_layers = len(layers)
        self.groups = layer_groups(self.num_layers, num_groups)
        self.device = runner.device
        self._in_step: list[Chunk] = []
        self._sent_groups: set[tuple[int, int]] = set()  # groups queued by their hook this step
        self._is_bypass_logged = False
        self._num_parts: dict[str, int] = {}  # parts queued per streaming request
        self._final_chunk: dict[str, Chunk] = {}  # the last chunk, until `finish`
        self._targets: dict[str, list[_Target]] = {}  # where each request's parts go
        self.new_requests: list[str] = []  # the requests the last `begin_chunks` saw first
        self._hooks = [layers[group[1] - 1].register_forward_hook(self._hook(group))
                       for group in self.groups]

    def has_final(self, request_id: str) -> bool:
        """Whether this request streamed its last chunk (then `finish` sends its last part)."""
        return request_id in self._final_chunk

    def targets(self, request_id: str) -> int:
        """How many receivers (TP routes) a streaming request's parts go to."""
        return len(self._targets.get(request_id, ()))

    def begin_step(self, batch: list[ScheduledSeq], dests: dict[str, StreamDest]) -> list[Chunk]:
        """Before the model runs `batch`: note the prompts whose chunks stream (`dests`: the
        live, not aborted requests by id); queue a prefix-cache hit first. The chunks noted."""
        chunks = []
        for s in batch:
            seq, dest = s.seq, dests.get(s.seq.seq_id)
            is_done = seq.num_computed_tokens >= seq.num_prompt_tokens
            if dest is None or s.num_tokens == 0 or is_done:
                continue
            start = seq.num_computed_tokens
            end = min(start + s.num_tokens, seq.num_prompt_tokens)
            chunks.append(Chunk(dest, list(seq.block_table), start, end,
                                end == seq.num_prompt_tokens))
        self.begin_chunks(chunks)
        return chunks

    def begin_chunks(self, chunks: list[Chunk]) -> None:
        """`begin_step` given the step's streaming chunks (a follower rank gets them from rank
        0: protocol/tp_ranks.py StreamStep)."""
        self._in_step, self._sent_groups, self.new_requests = [], set(), []
        for chunk in chunks:
            rid = chunk.dest.request_id
            if rid not in self._num_parts:
                self._targets[rid] = self._targets_of(chunk.dest)
                self.new_requests.append(rid)
                if chunk.token_start > 0:  # cached tokens go first
                    # (on CUDA after the steps enqueued so far: they may have written those blocks)
                    self._queue(chunk, 0, chunk.token_start, (0, self.num_layers), {},
                                is_last=False, ready=self._ready_event())
            self._num_parts.setdefault(rid, 0)
            self._in_step.append(chunk)
            if chunk.is_final:
                self._final_chunk[rid] = chunk

    def _targets_of(self, dest: StreamDest) -> list[_Target]:
        """Without TP on either side, the decode worker's one address; else this rank's routes
        (transfer/convert/tp_routes.py), each part carrying the route count."""
        if self.tp_size == 1 and dest.kv_spec.tp_size == 1:
            return [_Target(dest.addresses[0], dest.kv_spec)]
        sends = sends_of(self.outbox.cache.spec, dest.kv_spec, self.rank)
        if any(route.dst_rank >= len(dest.addresses) for route, _ in sends):
            raise ValueError(f"the decode worker has {dest.kv_spec.tp_size} TP ranks but "
                             f"{len(dest.addresses)} KV addresses")
        return [_Target(dest.addresses[route.dst_rank], rank_spec(dest.kv_spec, route.dst_rank),
                        route.heads, routes_meta(n)) for route, n in sends]

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
        chunk = self._final_chunk.pop(request_id, None)
        if chunk is None:  # a follower told of a stream it does not hold: nothing to send
            return
        self._queue(chunk, chunk.token_start, chunk.token_end, self.groups[-1], meta,
                    is_last=True)
        del self._num_parts[request_id]
        self._targets.pop(request_id, None)
        if self.on_end is not None:
            self.on_end(request_id, False)

    def cancel(self, request_id: str) -> bool:
        """The request ends before its last part (abort, failed part): end its stream. True when
        parts were queued: the outbox still reads its blocks, and an outcome follows them (one
        per target)."""
        self._final_chunk.pop(request_id, None)
        targets = self._targets.pop(request_id, [])
        is_known = request_id in self._num_parts
        if self._num_parts.pop(request_id, 0) == 0 or not targets:
            if is_known and self.on_end is not None:
                self.on_end(request_id, True)
            return False
        for target in targets:
            self.outbox.end_stream(request_id, target.address)
        if self.on_end is not None:
            self.on_end(request_id, True)
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

    def _queue(self, chunk: Chunk, token_start: int, token_end: int, layers: tuple[int, int],
               meta: dict[str, Any], *, is_last: bool, ready: Any = None) -> None:
        dest = chunk.dest
        index = self._num_parts.get(dest.request_id, 0)
        self._num_parts[dest.request_id] = index + 1
        for t in self._targets.get(dest.request_id, ()):
            self.outbox.send_part(dest.request_id, t.address, chunk.block_table, token_start,
                                  token_end, layers, t.spec,
                                  {**meta, **t.meta, **part_meta(index, is_last)},
                                  (index, is_last), ready, kv_token=dest.kv_token,
                                  head_range=t.heads)
