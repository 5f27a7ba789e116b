"""Attention over a paged KV cache, for any mix of prefill chunks and decode steps in one batch.

The engine's cache for one layer is a tuple of tensors in the layout its KvSpec names
(engine/kv_layout.py; default NHD `[2, num_blocks, block_size, num_kv_heads, head_dim]`).
`AttentionMetadata` says, per sequence in the batch, which new tokens it contributes
(`query_start_loc`), how long its context is after this step (`seq_lens`) and where its
blocks are (`block_tables`); `slot_mapping` says where each new token's K/V is written.

`paged_attention` is the function boundary a CUDA/Triton kernel replaces: same arguments,
same result. Two backends sit behind it:
- torch (CPU, and any layout on CUDA): the reference. Prefill chunks one sequence at a time,
  decode rows batched after gathering their blocks into a padded `[B, L, H, D]` copy.
- triton (CUDA, NHD cache; chosen by the model runner, which then fills `meta.decode`): the
  KV write and the decode rows run as Triton kernels that read the paged cache in place
  (engine/triton_attention.py), with no shape or value that depends on the step's data, so a
  decode step can be captured in a CUDA graph. Prefill chunks use torch SDPA (flash attention
  when the chunk is the whole prompt) one sequence at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.kv_layout import LayerCache, gather_kv, write_kv
from engine.kv_spec import KvSpec


@dataclass
class DecodeMetadata:
    """Device tensors the Triton decode kernel reads: one row per single-token query.

    Nothing here is read on the host, so a step described by it can be replayed in a CUDA
    graph with new values in the same tensors. A padding row has seq_len 0.
    """

    seq_lens: torch.Tensor  # [num_decodes] int64: context length including the new token
    block_tables: torch.Tensor  # [num_decodes, max_blocks] int64
    rows: torch.Tensor | None  # [num_decodes] int64 rows of q; None = every row, in order
    num_splits: int  # context splits per (seq, kv head) (engine/triton_attention.py)


@dataclass
class AttentionMetadata:
    """Per-step batch description. Built by the model runner, read by every layer."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: flat cache slot of each new token
    query_start_loc: list[int]  # [num_seqs + 1]: new tokens of seq i are [qsl[i], qsl[i+1])
    seq_lens: list[int]  # [num_seqs]: context length of seq i including this step's tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, padded with 0
    spec: KvSpec  # the cache's geometry and layout
    decode: DecodeMetadata | None = None  # set by the runner for the triton backend only

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    def query_len(self, i: int) -> int:
        return self.query_start_loc[i + 1] - self.query_start_loc[i]

    @property
    def decode_seq_indices(self) -> list[int]:
        return [i for i in range(self.num_seqs) if self.query_len(i) == 1]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_cache: LayerCache,
                    meta: AttentionMetadata, scale: float,
                    kv_written: bool = False) -> torch.Tensor:
    """Write k/v into the cache, then attend every query to its sequence's cached context.

    q: [T, Hq, D]; k, v: [T, Hkv, D] (this step's new tokens). Returns [T, Hq, D].
    kv_written: the caller already stored k/v at meta.slot_mapping (a fused kernel did).
    """
    if meta.decode is not None:
        return _paged_attention_triton(q, k, v, layer_cache, meta, meta.decode, scale, kv_written)
    if not kv_written:
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


def _paged_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            layer_cache: LayerCache, meta: AttentionMetadata,
                            decode: DecodeMetadata, scale: float, kv_written: bool) -> torch.Tensor:
    from engine import triton_attention  # triton is imported only where this backend runs

    k_cache, v_cache = ((layer_cache[0][0], layer_cache[0][1]) if len(layer_cache) == 1
                        else layer_cache)
    if not kv_written:
        triton_attention.write_kv_nhd(k, v, k_cache, v_cache, meta.slot_mapping)
    if decode.rows is None:  # a decode-only step: every row is one query token
        return triton_attention.decode_attention(q, k_cache, v_cache, decode.block_tables,
                                                 decode.seq_lens, scale, decode.num_splits)
    out = torch.empty_like(q)
    if decode.rows.numel():
        rows_out = triton_attention.decode_attention(
            q.index_select(0, decode.rows), k_cache, v_cache, decode.block_tables,
            decode.seq_lens, scale, decode.num_splits)
        out.index_copy_(0, decode.rows, rows_out)
    for i in range(meta.num_seqs):
        q_len = meta.query_len(i)
        if q_len == 1:
            continue
        start = meta.query_start_loc[i]
        rows = slice(start, start + q_len)
        if meta.seq_lens[i] == q_len:  # the whole prompt in this step: attend to the new K/V
            out[rows] = _sdpa_causal(q[rows], k[rows], v[rows], scale)
        else:  # a later chunk, or a prefix-cache hit: earlier tokens come from the cache
            out[rows] = _prefill_one(q[rows], layer_cache, meta, i, scale)
    return out


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal self-attention of one whole sequence (flash attention on CUDA in bf16/fp16).

    q: [L, Hq, D]; k, v: [L, Hkv, D] -> [L, Hq, D]. K/V are expanded to Hq heads first: a
    copy of L x Hq x D, small next to the attention itself, and every SDPA backend takes it.
    """
    k, v = _expand_heads(k, q.shape[1]), _expand_heads(v, q.shape[1])
    out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0),
                                         k.transpose(0, 1).unsqueeze(0),
                                         v.transpose(0, 1).unsqueeze(0), is_causal=True,
                                         scale=scale)
    return out[0].transpose(0, 1)


def _prefill_one(q: torch.Tensor, layer_cache: LayerCache, meta: AttentionMetadata, i: int,
                 scale: float) -> torch.Tensor:
    seq_len, q_len = meta.seq_lens[i], q.shape[0]
    num_blocks = -(-seq_len // meta.spec.block_size)
    # k, v: [L, Hkv, D]
    k, v = gather_kv(meta.spec, layer_cache, meta.block_tables[i, :num_blocks], seq_len)
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device).unsqueeze(1)  # [q_len, 1]
    mask = torch.arange(seq_len, device=q.device).unsqueeze(0) <= q_pos  # [q_len, L]
    return _sdpa(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), mask.unsqueeze(0), scale)[0]


def _decode_batch(q: torch.Tensor, layer_cache: LayerCache, meta: AttentionMetadata,
                  idx: list[int], scale: float) -> torch.Tensor:
    """One query per sequence. q: [B, Hq, D] -> [B, Hq, D]."""
    lens = torch.tensor([meta.seq_lens[i] for i in idx], device=q.device)
    max_len = max(meta.seq_lens[i] for i in idx)
    num_blocks = -(-max_len // meta.spec.block_size)
    # k, v: [B, L, Hkv, D]
    k, v = gather_kv(meta.spec, layer_cache, meta.block_tables[idx, :num_blocks], max_len)
    positions = torch.arange(max_len, device=q.device).unsqueeze(0)
    mask = (positions < lens.unsqueeze(1)).unsqueeze(1)  # [B, 1, L]
    return _sdpa(q.unsqueeze(1), k, v, mask, scale)[:, 0]


def _expand_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[..., Hkv, D] -> [..., num_heads, D]: query head h reads kv head h // group (GQA).

    (expand + reshape rather than repeat_interleave, whose CUDA version may read its output
    size back from the device.)"""
    group = num_heads // x.shape[-2]
    if group == 1:
        return x
    return x.unsqueeze(-2).expand(*x.shape[:-1], group, x.shape[-1]).reshape(
        *x.shape[:-2], num_heads, x.shape[-1])


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
          scale: float) -> torch.Tensor:
    """q: [B, Lq, Hq, D]; k, v: [B, Lk, Hkv, D]; mask: [B or 1, Lq, Lk] bool -> [B, Lq, Hq, D].

    On CPU SDPA reads the GQA groups itself (`enable_gqa`, bit-identical and no copy of K/V:
    measured 350 -> 213 ms per SmolLM2 decode step at 16 sequences); elsewhere K/V are expanded.
    """
    gqa = q.device.type == "cpu" and q.shape[2] != k.shape[2]
    if not gqa:
        k, v = _expand_heads(k, q.shape[2]), _expand_heads(v, q.shape[2])
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
        attn_mask=mask.unsqueeze(1), scale=scale, **({"enable_gqa": True} if gqa else {}))
    return out.transpose(1, 2)
