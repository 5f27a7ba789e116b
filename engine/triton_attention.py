"""Triton kernels of the CUDA path: paged decode attention and the KV write, on the NHD cache.

Both read and write the engine's NHD cache in place (`[num_blocks, block_size, kv_heads,
head_dim]` for K and for V, views of the stacked `[2, ...]` tensor are fine: only the last dim
must be contiguous). Both are safe to capture in a CUDA graph: grids and shapes depend only
on tensor shapes and on `num_splits`, never on values, and a padding row (`seq_len` 0,
`slot` -1) writes nothing to the cache and gets a zero attention output.

Decode attention is split-K ("flash-decoding"): program (seq, kv_head, split) attends the
whole GQA group of query heads that share kv_head (one K/V read serves the group) to its slice
of the context, keeping a running max and sum; a second kernel merges the splits by their
log-sum-exp. With one split the first kernel writes the output directly.

This module imports triton at the top: import it only where triton is installed
(`engine.attention` does so lazily, when the runner asked for this backend).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Spread (seq, kv_head) programs over the context until about this many programs per SM ...
_TARGET_PROGRAMS_PER_SM = 4
# ... but never give a split fewer context tokens than this (each split costs a partial
# output write and a merge).
_MIN_TOKENS_PER_SPLIT = 256


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """How many context splits per (seq, kv_head): enough programs to fill the GPU."""
    programs = max(1, num_seqs * num_kv_heads)
    want = -(-_TARGET_PROGRAMS_PER_SM * num_sms // programs)
    cap = max(1, -(-max_seq_len // _MIN_TOKENS_PER_SPLIT))
    return max(1, min(want, cap))


# Integer arguments that change from step to step are not specialised on (Triton compiles a
# variant per value class: 1, a multiple of 16, anything else): the split count, the block
# table's width (eager steps size it to their longest sequence) and the split buffers' strides.
# Each variant is a 0.5-1 s compile on its first step, and mixed steps (run eagerly) kept
# meeting new ones under load on a fresh server (a cold H100, 2026-12-07: six steps of 0.5-1.1
# s); the merge kernel's split tile is one size up to 64 splits for the same reason.
_VARYING = ["num_splits", "stride_tt", "stride_pt", "stride_ph", "stride_ps", "stride_lt",
            "stride_lh"]
_MIN_SPLITS_PAD = 64


@triton.jit(do_not_specialize=_VARYING)
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    scale, num_splits,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_tt,
    stride_ot, stride_oh,
    stride_pt, stride_ph, stride_ps,
    stride_lt, stride_lh,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_SPLIT: tl.constexpr, PRECISION: tl.constexpr,
):
    # Over 60 lines on purpose: one Triton program, the flash-decoding loop and its epilogue
    # sharing the running max/sum/accumulator in registers; split into @triton.jit helpers it
    # would only pass those around. A quarter of the length is the stride parameters.
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + seq)
    # this split's context slice, whole BLOCK_N tiles except the last
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g  # query heads of this kv head's group
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)  # [GROUP_PAD, HEAD_DIM_PAD]

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        block = tl.load(tables_ptr + seq * stride_tt + offs_n // BLOCK_SIZE, mask=mask_n, other=0)
        in_block = offs_n % BLOCK_SIZE
        kv_mask = mask_n[:, None] & mask_d[None, :]
        # k: [BLOCK_N, D]
        k = tl.load(k_ptr + block[:, None] * stride_kb + in_block[:, None] * stride_ks
                    + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + block[:, None] * stride_vb + in_block[:, None] * stride_vs
                    + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        # s: [GROUP_PAD, BLOCK_N]
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)  # an empty split (or a padding row) gives zeros
    o = acc / l_safe[:, None]
    mask_o = mask_g[:, None] & mask_d[None, :]
    if IS_SPLIT:
        lse = tl.where(l_i > 0, m_i + tl.log(l_safe), float("-inf"))
        base = seq * stride_pt + split * stride_ps
        tl.store(part_out_ptr + base + heads[:, None] * stride_ph + offs_d[None, :], o, mask=mask_o)
        tl.store(part_lse_ptr + seq * stride_lt + heads * stride_lh + split, lse, mask=mask_g)
    else:
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=mask_o)


@triton.jit(do_not_specialize=_VARYING)
def _merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, num_splits,
    stride_pt, stride_ph, stride_ps, stride_lt, stride_lh, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_s = offs_s < num_splits
    lse = tl.load(part_lse_ptr + seq * stride_lt + head * stride_lh + offs_s, mask=mask_s,
                  other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m > float("-inf"), m, 0.0)
    w = tl.exp(lse - m)  # 0 for empty splits
    total = tl.sum(w, axis=0)
    parts = tl.load(part_out_ptr + seq * stride_pt + head * stride_ph + offs_s[:, None] * stride_ps
                    + offs_d[None, :], mask=mask_s[:, None] & (offs_d[None, :] < HEAD_DIM),
                    other=0.0)
    o = tl.sum(parts * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     num_splits: int, out: torch.Tensor | None = None, *,
                     block_n: int | None = None, num_warps: int = 4,
                     num_stages: int = 2) -> torch.Tensor:
    """One query token per sequence against its paged context.

    q: [N, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D] (last dim contiguous);
    block_tables: [N, max_blocks] int; seq_lens: [N] int (0 = padding row). Returns [N, Hq, D].
    block_n (context tokens per loop step), num_warps, num_stages: launch tuning (bench/).
    """
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    for t in (q, k_cache, v_cache, out):
        if t.stride(-1) != 1:
            raise ValueError(f"decode_attention needs a contiguous last dim, "
                             f"got strides {t.stride()}")
    head_dim_pad = triton.next_power_of_2(head_dim)
    block_n = block_n or (64 if head_dim_pad <= 128 else 32)
    is_split = num_splits > 1
    if is_split:
        part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32,
                               device=q.device)
        part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32,
                               device=q.device)
    else:  # unused by the kernel; any tensor with the right number of strides
        part_out = out.new_empty(1, 1, 1, 1, dtype=torch.float32)
        part_lse = out.new_empty(1, 1, 1, dtype=torch.float32)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_lse,
        scale, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        BLOCK_SIZE=block_size, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_N=block_n,
        IS_SPLIT=is_split, PRECISION=precision, num_warps=num_warps, num_stages=num_stages,
    )
    if is_split:
        _merge_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, num_splits,
            part_out.stride(0), part_out.stride(1), part_out.stride(2),
            part_lse.stride(0), part_lse.stride(1), out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
            SPLITS_PAD=max(_MIN_SPLITS_PAD, triton.next_power_of_2(num_splits)), num_warps=4,
        )
    return out


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    BLOCK_SIZE: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HD_PAD: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slots_ptr + token)
    offs = tl.arange(0, HD_PAD)
    head = offs // HEAD_DIM
    dim = offs % HEAD_DIM
    mask = (offs < NUM_HEADS * HEAD_DIM) & (slot >= 0)  # slot -1: a padding row, write nothing
    block = slot // BLOCK_SIZE
    in_block = slot % BLOCK_SIZE
    k = tl.load(k_ptr + token * stride_kt + head * stride_kh + dim, mask=mask)
    v = tl.load(v_ptr + token * stride_vt + head * stride_vh + dim, mask=mask)
    tl.store(kc_ptr + block * stride_kcb + in_block * stride_kcs + head * stride_kch + dim,
             k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + block * stride_vcb + in_block * stride_vcs + head * stride_vch + dim,
             v.to(vc_ptr.dtype.element_ty), mask=mask)


def write_kv_nhd(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Store this step's K/V in one launch. k, v: [T, Hkv, D]; caches [B, S, Hkv, D];
    slot_mapping: [T] flat slots (block * block_size + offset), -1 = skip the row."""
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1], NUM_HEADS=num_heads, HEAD_DIM=head_dim,
        HD_PAD=triton.next_power_of_2(num_heads * head_dim), num_warps=4,
    )
