"""ModelRunner: owns the model weights and the KV cache tensors; runs one batch step.

It turns a scheduled batch (sequences + how many of their tokens to compute) into model
inputs, runs the forward pass, and samples for the sequences whose tokens are all computed.
It never decides *what* runs (the scheduler does) and never frees blocks (the cache manager does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata
from engine.config import ModelConfig
from engine.kv_layout import allocate_cache, copy_block
from engine.memory_plan import KvPlan
from engine.model import LlamaForCausalLM
from engine.sampler import SampleResult, sample
from engine.sequence import Sequence


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens of this sequence computed in this step

    @property
    def completes(self) -> bool:
        """After this step every token has K/V, so the next token can be sampled."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


class ModelRunner:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], plan: KvPlan,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.config, self.plan, self.device, self.dtype = config, plan, device, dtype
        with torch.device("meta"):
            model = LlamaForCausalLM(config, plan.max_model_len)
        model = model.to_empty(device=device).to(dtype)
        model.model.rope.build(device)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.load_weights(weights)
        self.model = model.eval()
        # one tuple of tensors per layer, in the layout plan.spec names (engine/kv_layout.py)
        self.kv_caches = allocate_cache(plan.spec, plan.num_blocks, device)

    def prepare(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs = self.plan.spec.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl, seq_lens = [0], []
        max_blocks = max(len(s.seq.block_table) for s in batch)
        tables = torch.zeros(len(batch), max_blocks, dtype=torch.long)
        for i, s in enumerate(batch):
            start, end = s.seq.num_computed_tokens, s.seq.num_computed_tokens + s.num_tokens
            table = s.seq.block_table
            input_ids.extend(s.seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            qsl.append(qsl[-1] + s.num_tokens)
            seq_lens.append(end)
            tables[i, :len(table)] = torch.tensor(table, dtype=torch.long)
        dev = self.device
        meta = AttentionMetadata(torch.tensor(slots, dtype=torch.long, device=dev), qsl, seq_lens,
                                 tables.to(dev), self.plan.spec)
        return (torch.tensor(input_ids, dtype=torch.long, device=dev),
                torch.tensor(positions, dtype=torch.long, device=dev), meta)

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq]) -> dict[str, SampleResult]:
        """Compute the batch's K/V; sample one token for every sequence the step completes.

        Does not change the sequences: the caller advances `num_computed_tokens` and appends
        sampled tokens (so a failed step leaves them as they were).
        """
        input_ids, positions, meta = self.prepare(batch)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)  # [T, hidden]
        done = [i for i, s in enumerate(batch) if s.completes]
        if not done:
            return {}
        rows = torch.tensor([meta.query_start_loc[i + 1] - 1 for i in done], device=self.device)
        logits = self.model.compute_logits(hidden[rows])  # [len(done), vocab]
        seqs = [batch[i].seq for i in done]
        results = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        return {s.seq_id: r for s, r in zip(seqs, results, strict=True)}

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy cache contents block to block (copy-on-write after a fork)."""
        for src, dst in pairs:
            copy_block(self.plan.spec, self.kv_caches, src, dst)
