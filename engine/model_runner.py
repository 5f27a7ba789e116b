"""ModelRunner: owns the model weights and the KV cache tensors; runs one batch step.

It turns a scheduled batch (sequences + how many of their tokens to compute) into model
inputs, runs the forward pass, and samples for the sequences whose tokens are all computed.
It never decides *what* runs (the scheduler does) and never frees blocks (the cache manager does).

On CUDA a step does not wait for the GPU until it reads the sampled tokens: the step's inputs
(token ids, positions, slots, block tables, ...) are packed into one pinned host buffer and
copied over in one non-blocking transfer; attention runs on the triton backend when the cache
is NHD (engine/attention.py), with the layers' small ops fused (engine/triton_layers.py);
decode-only steps replay a CUDA graph (engine/cuda_graphs.py).

Under tensor parallelism this runner is one rank's (its shard of the model, its heads of the
cache). On rank 0 `execute` sends each step's inputs to the other ranks (`TpGroup`, as the
compact int64 `StepInputs`) before running its own share; the other ranks run
`engine/tp_executor.py`'s loop, which calls `run_step` with what arrives. Only rank 0 gets the
logits and samples. CUDA graphs are off with TP > 1 (the collectives are not captured).
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from engine.attention import AttentionMetadata, DecodeMetadata
from engine.config import ModelConfig
from engine.cpu_malloc import keep_freed_memory
from engine.cuda_graphs import DecodeGraphs, capture_sizes
from engine.grammar_runtime import GrammarRuntime
from engine.kv_layout import allocate_cache, copy_block
from engine.kv_spec import KvLayout
from engine.memory_plan import KvPlan
from engine.model import LlamaForCausalLM
from engine.penalties import apply_penalties
from engine.prompt_logprobs import add_prompt_logprobs, wants_prompt_logprobs
from engine.sampler import SampleResult, sample
from engine.sequence import Sequence
from engine.step_inputs import StepInputs, copy_blocks_message
from engine.tp_group import TpGroup

log = logging.getLogger(__name__)


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens of this sequence computed in this step

    @property
    def completes(self) -> bool:
        """After this step every token has K/V, so the next token can be sampled."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass
class _Step:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    logits_rows: torch.Tensor  # [D] int64: last row of each sequence the step completes


def upload(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """int64 host arrays -> tensors on `device`, in one transfer (pinned + non-blocking on CUDA,
    so the host does not wait for the GPU)."""
    sizes = [a.size for a in arrays]
    host = torch.empty(sum(sizes), dtype=torch.int64, pin_memory=device.type == "cuda")
    flat = host.numpy()
    offset = 0
    for a in arrays:
        flat[offset:offset + a.size] = a.reshape(-1)
        offset += a.size
    dev = host.to(device, non_blocking=True)
    out, offset = [], 0
    for a in arrays:
        out.append(dev[offset:offset + a.size].view(a.shape))
        offset += a.size
    return out


def choose_attention_backend(requested: str, device: torch.device, layout: KvLayout) -> str:
    """'triton' on CUDA with an NHD cache when triton is installed, else 'torch'.

    requested: 'auto', 'torch' or 'triton' ('triton' on CPU works under TRITON_INTERPRET=1 only;
    it is for debugging the kernels there)."""
    if requested not in ("auto", "torch", "triton"):
        raise ValueError(f"attention backend must be auto, torch or triton, got {requested!r}")
    has_triton = importlib.util.find_spec("triton") is not None
    if requested == "triton":
        if layout is not KvLayout.NHD or not has_triton:
            raise ValueError(f"the triton backend needs triton installed and an NHD cache "
                             f"(cache layout {layout.value}, triton installed: {has_triton})")
        return "triton"
    if requested == "auto" and device.type == "cuda" and layout is KvLayout.NHD and has_triton:
        return "triton"
    return "torch"


def materialize(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give every meta parameter and buffer of `module` uninitialised storage on `device`,
    floating ones in `dtype` (what `to_empty(device).to(dtype)` does; that costs ~2 ms a
    tensor through torch's Python reference ops for meta tensors: 0.6 s of SmolLM2's load).
    A tensor shared by several modules (tied embeddings) stays shared."""
    done: dict[int, torch.Tensor] = {}
    for m in module.modules():
        for table, make in ((m._parameters, torch.nn.Parameter), (m._buffers, None)):
            for name, t in table.items():
                if t is None or not t.is_meta:
                    continue
                if id(t) not in done:
                    data = torch.empty(t.shape, device=device,
                                       dtype=dtype if t.is_floating_point() else t.dtype)
                    done[id(t)] = data if make is None else make(data, t.requires_grad)
                table[name] = done[id(t)]


class ModelRunner:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], plan: KvPlan,
                 dtype: torch.dtype, device: torch.device, *, attention_backend: str = "auto",
                 cuda_graphs: bool = True, tp: TpGroup | None = None) -> None:
        self.config, self.plan, self.device, self.dtype = config, plan, device, dtype
        self.grammars: GrammarRuntime | None = None  # set by the engine (it has the tokenizer)
        self.tp = tp or TpGroup.single(device)
        if device.type == "cpu":
            keep_freed_memory()  # no page-fault storm per decode step (engine/cpu_malloc.py)
        self.attention_backend = choose_attention_backend(attention_backend, device,
                                                          plan.spec.layout)
        with torch.device("meta"):
            model = LlamaForCausalLM(config, plan.max_model_len, self.tp)
        materialize(model, device, dtype)
        model.model.rope.build(device)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        if self.attention_backend == "triton":  # fused layers, before the weights fill them
            from engine.triton_layers import apply_fused_layers

            apply_fused_layers(model)
        if weights:
            model.load_weights(weights)
        else:  # --load-format dummy: random weights drawn on the device
            model.init_dummy_weights()
        self.model = model.eval()
        # one tuple of tensors per layer, in the layout plan.spec names (engine/kv_layout.py)
        self.kv_caches = allocate_cache(plan.spec, plan.num_blocks, device)
        self.num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                        if device.type == "cuda" else 1)
        self.graphs: DecodeGraphs | None = None
        if (cuda_graphs and device.type == "cuda" and self.attention_backend == "triton"
                and self.tp.is_single):
            self.graphs = self._capture_graphs()
        self.use_cuda_graphs = self.graphs is not None
        if device.type == "cuda":
            # cuDNN's SDPA builds a plan for every new (query, context) shape: ~70 ms on an H100
            # (bench/sdpa_probe.py), paid by every chunk of a prompt with cached context (its
            # shape is new each time); flash / memory-efficient attention have no per-shape cost
            torch.backends.cuda.enable_cudnn_sdp(False)
            free, total = torch.cuda.mem_get_info(device)
            log.info("CUDA memory: %.2f GiB held by this engine (weights, KV cache, graphs), "
                     "%.2f GiB free of %.2f GiB", torch.cuda.memory_reserved(device) / 2**30,
                     free / 2**30, total / 2**30)

    def _num_splits(self, num_seqs: int, max_seq_len: int) -> int:
        from engine.triton_attention import choose_num_splits

        return choose_num_splits(num_seqs, self.plan.spec.num_kv_heads, max_seq_len, self.num_sms)

    def _capture_graphs(self) -> DecodeGraphs:
        t0 = time.perf_counter()
        sizes = capture_sizes(self.plan.max_num_seqs)
        splits = {bs: self._num_splits(bs, self.plan.max_model_len) for bs in sizes}
        graphs = DecodeGraphs(self.model, self.kv_caches, self.plan, splits, self.device, sizes)
        graphs.capture()
        log.info("captured decode CUDA graphs for batch sizes %s in %.1f s", list(sizes),
                 time.perf_counter() - t0)
        return graphs

    # ---- inputs -------------------------------------------------------------------------------
    def prepare(
        self, batch: list[ScheduledSeq]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        step = self._device_step(self.host_inputs(batch))
        return step.input_ids, step.positions, step.meta

    def host_inputs(self, batch: list[ScheduledSeq]) -> StepInputs:
        """The step's inputs as host arrays (what rank 0 sends to the other TP ranks)."""
        bs = self.plan.spec.block_size
        input_ids: list[int] = []
        positions, slots = [], []
        qsl, seq_lens = [0], []
        tables = np.zeros((len(batch), max(len(s.seq.block_table) for s in batch)), dtype=np.int64)
        for i, s in enumerate(batch):
            start, end = s.seq.num_computed_tokens, s.seq.num_computed_tokens + s.num_tokens
            table = np.asarray(s.seq.block_table, dtype=np.int64)
            tables[i, :len(table)] = table
            input_ids.extend(s.seq.token_ids[start:end])
            pos = np.arange(start, end, dtype=np.int64)
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            qsl.append(qsl[-1] + s.num_tokens)
            seq_lens.append(end)
        done = [i for i, s in enumerate(batch) if s.completes]
        return StepInputs(np.asarray(input_ids, dtype=np.int64), np.concatenate(positions),
                          np.concatenate(slots), tables,
                          np.asarray([qsl[i + 1] - 1 for i in done], dtype=np.int64),
                          np.asarray(qsl, dtype=np.int64), np.asarray(seq_lens, dtype=np.int64))

    def _device_step(self, inputs: StepInputs) -> _Step:
        """Device tensors and attention metadata of a step (the same on every TP rank)."""
        qsl, seq_lens = inputs.query_start_loc.tolist(), inputs.seq_lens.tolist()
        tables = inputs.block_tables
        arrays = [inputs.input_ids, inputs.positions, inputs.slot_mapping, tables,
                  inputs.logits_rows]
        decode_idx = [i for i in range(len(seq_lens)) if qsl[i + 1] - qsl[i] == 1]
        is_triton = self.attention_backend == "triton"
        all_decode = len(decode_idx) == len(seq_lens)
        if is_triton:
            arrays.append(np.asarray([seq_lens[i] for i in decode_idx], dtype=np.int64))
            if not all_decode:
                arrays += [np.asarray([qsl[i] for i in decode_idx], dtype=np.int64),
                           tables[decode_idx]]
        dev = upload(arrays, self.device)
        input_ids_t, positions_t, slots_t, tables_t, logits_rows = dev[:5]
        decode = None
        if is_triton:
            max_len = max((seq_lens[i] for i in decode_idx), default=1)
            splits = self._num_splits(len(decode_idx), max_len)
            decode = (DecodeMetadata(dev[5], tables_t, None, splits) if all_decode
                      else DecodeMetadata(dev[5], dev[7], dev[6], splits))
        meta = AttentionMetadata(slots_t, qsl, seq_lens, tables_t, self.plan.spec, decode)
        return _Step(input_ids_t, positions_t, meta, logits_rows)

    # ---- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq]) -> dict[str, SampleResult]:
        """Compute the batch's K/V; sample one token for every sequence the step completes.

        Does not change the sequences (but for appending prompt logprobs, by position:
        engine/prompt_logprobs.py): the caller advances `num_computed_tokens` and appends
        sampled tokens (so a failed step leaves them as they were). The only wait for the GPU
        is the sampler reading the tokens back.
        """
        logits = self._graph_logits(batch) if self.use_cuda_graphs else None
        if logits is not None:
            seqs = [s.seq for s in batch]
        else:
            inputs = self.host_inputs(batch)
            if not self.tp.is_single:
                self.tp.broadcast_host(inputs.header())
                self.tp.broadcast_host(inputs.payload())
            step, hidden = self._forward(inputs)
            if self.tp.is_single:  # a TP engine refuses prompt logprobs (LLMEngine.add_request)
                self._prompt_logprobs(batch, hidden)
            logits = self._logits(step, hidden)
            if logits is None:
                return {}
            seqs = [s.seq for s in batch if s.completes]
        params = [s.params for s in seqs]
        processed = apply_penalties(logits, params, [s.token_ids for s in seqs],
                                    [s.num_prompt_tokens for s in seqs])
        # on CUDA the forward pass still runs while the host builds the grammar masks
        bitmask = None if self.grammars is None else self.grammars.bitmask(seqs)
        results = sample(processed, params, [s.generator for s in seqs], raw_logits=logits,
                         bitmask=bitmask)
        return {s.seq_id: r for s, r in zip(seqs, results, strict=True)}

    @torch.inference_mode()
    def run_step(self, inputs: StepInputs) -> torch.Tensor | None:
        """Forward pass of one step; the fp32 logits [D, vocab] of the sequences it completes
        (None when it completes none, and on TP ranks other than 0)."""
        return self._logits(*self._forward(inputs))

    def _forward(self, inputs: StepInputs) -> tuple[_Step, torch.Tensor]:
        step = self._device_step(inputs)
        # hidden: [T, hidden]
        return step, self.model(step.input_ids, step.positions, self.kv_caches, step.meta)

    def _logits(self, step: _Step, hidden: torch.Tensor) -> torch.Tensor | None:
        if not step.logits_rows.numel():
            return None
        # logits: [D, vocab] (gathered to rank 0 under TP)
        return self.model.compute_logits(hidden.index_select(0, step.logits_rows))

    def _prompt_logprobs(self, batch: list[ScheduledSeq], hidden: torch.Tensor) -> None:
        rows, row0 = [], 0
        for s in batch:
            start = s.seq.num_computed_tokens
            if wants_prompt_logprobs(s.seq, start, start + s.num_tokens):
                rows.append((s.seq, row0, start, start + s.num_tokens))
            row0 += s.num_tokens
        if rows:
            add_prompt_logprobs(self.model.compute_logits, hidden, rows)

    def _graph_logits(self, batch: list[ScheduledSeq],
                      use_graph: bool = True) -> torch.Tensor | None:
        """Logits of a decode-only step (every sequence computes one token and completes) from
        the captured graphs; None when the step does not fit them (it then runs eagerly)."""
        graphs = self.graphs
        if (graphs is None or not all(s.num_tokens == 1 and s.completes for s in batch)
                or not graphs.can_run(len(batch), max(len(s.seq.block_table) for s in batch))):
            return None
        bs = self.plan.spec.block_size
        positions = [s.seq.num_computed_tokens for s in batch]
        tables = [s.seq.block_table for s in batch]
        return graphs.run(
            token_ids=[s.seq.token_ids[p] for s, p in zip(batch, positions, strict=True)],
            positions=positions,
            slots=[t[p // bs] * bs + p % bs for t, p in zip(tables, positions, strict=True)],
            seq_lens=[p + 1 for p in positions], block_tables=tables, use_graph=use_graph)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy cache contents block to block (copy-on-write after a fork), on every TP rank."""
        if not self.tp.is_single:
            for array in copy_blocks_message(pairs):
                self.tp.broadcast_host(array)
        self.copy_local_blocks(pairs)

    def copy_local_blocks(self, pairs: list[tuple[int, int]]) -> None:
        for src, dst in pairs:
            copy_block(self.plan.spec, self.kv_caches, src, dst)
