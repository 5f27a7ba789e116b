"""Attention over a paged KV cache, for any mix of prefill chunks and decode steps in one batch.

The engine's cache for one layer is a tuple of tensors in the layout its KvSpec names
(engine/kv_layout.py; default NHD `[2, num_blocks, block_size, num_kv_heads, head_dim]`). `AttentionMetadata` says, per sequence in the batch, which
new tokens it contributes (`query_start_loc`), how long its context is after this step
(`seq_lens`) and where its blocks are (`block_tables`); `slot_mapping` says where each new
token's K/V is written.

`paged_attention` is the function boundary a CUDA/Triton kernel replaces: same arguments,
same result. This torch version is the CPU path and the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.kv_layout import LayerCache, gather_kv, write_kv
from engine.kv_spec import KvSpec


@dataclass
class AttentionMetadata:
    """Per-step batch description. Built by the model runner, read by every layer."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: flat cache slot of each new token
    query_start_loc: list[int]  # [num_seqs + 1]: new tokens of seq i are [qsl[i], qsl[i+1])
    seq_lens: list[int]  # [num_seqs]: context length of seq i including this step's tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, padded with 0
    spec: KvSpec  # the cache's geometry and layout

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    def query_len(self, i: int) -> int:
        return self.query_start_loc[i + 1] - self.query_start_loc[i]

    @property
    def decode_seq_indices(self) -> list[int]:
        return [i for i in range(self.num_seqs) if self.query_len(i) == 1]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_cache: LayerCache,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Write k/v into the cache, then attend every query to its sequence's cached context.

    q: [T, Hq, D]; k, v: [T, Hkv, D] (this step's new tokens). Returns [T, Hq, D].
    """
    write_kv(meta.spec, layer_cache, k, v, meta.slot_mapping)
    out = torch.empty_like(q)
    decode_idx = meta.decode_seq_indices
    if decode_idx:
        rows = [meta.query_start_loc[i] for i in decode_idx]
        out[rows] = _decode_batch(q[rows], layer_cache, meta, decode_idx, scale)
    for i in range(meta.num_seqs):
        q_len = meta.query_len(i)
        if q_len == 1:
            continue
        start = meta.query_start_loc[i]
        out[start:start + q_len] = _prefill_one(q[start:start + q_len], layer_cache, meta, i, scale)
    return out


def _prefill_one(q: torch.Tensor, layer_cache: LayerCache, meta: AttentionMetadata, i: int,
                 scale: float) -> torch.Tensor:
    seq_len, q_len = meta.seq_lens[i], q.shape[0]
    num_blocks = -(-seq_len // meta.spec.block_size)
    k, v = gather_kv(meta.spec, layer_cache, meta.block_tables[i, :num_blocks], seq_len)  # [L, Hkv, D]
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device).unsqueeze(1)  # [q_len, 1]
    mask = torch.arange(seq_len, device=q.device).unsqueeze(0) <= q_pos  # [q_len, L]
    return _sdpa(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), mask.unsqueeze(0), scale)[0]


def _decode_batch(q: torch.Tensor, layer_cache: LayerCache, meta: AttentionMetadata,
                  idx: list[int], scale: float) -> torch.Tensor:
    """One query per sequence. q: [B, Hq, D] -> [B, Hq, D]."""
    lens = torch.tensor([meta.seq_lens[i] for i in idx], device=q.device)
    max_len = max(meta.seq_lens[i] for i in idx)
    num_blocks = -(-max_len // meta.spec.block_size)
    k, v = gather_kv(meta.spec, layer_cache, meta.block_tables[idx, :num_blocks], max_len)  # [B, L, Hkv, D]
    mask = (torch.arange(max_len, device=q.device).unsqueeze(0) < lens.unsqueeze(1)).unsqueeze(1)  # [B, 1, L]
    return _sdpa(q.unsqueeze(1), k, v, mask, scale)[:, 0]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
          scale: float) -> torch.Tensor:
    """q: [B, Lq, Hq, D]; k, v: [B, Lk, Hkv, D]; mask: [B or 1, Lq, Lk] bool -> [B, Lq, Hq, D]."""
    num_groups = q.shape[2] // k.shape[2]
    if num_groups > 1:
        k = k.repeat_interleave(num_groups, dim=2)
        v = v.repeat_interleave(num_groups, dim=2)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
        attn_mask=mask.unsqueeze(1), scale=scale)
    return out.transpose(1, 2)
