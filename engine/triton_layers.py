"""A pass over the Llama model for the CUDA path: fewer, fused kernels per layer (Triton).

The model (engine/model.py) is written op by op, which costs ~40 kernels per layer: on a GPU
most of them are tiny (RMSNorm is 7 elementwise kernels, rotary embedding 14), and in a
decode step each costs a few microseconds of launch and ramp-up however little it moves.
`apply_fused_layers(model)` rewrites the model in place, as gpt-fast's `apply_tp` does, so
the model file knows nothing of it:

- q/k/v projections become one GEMM, gate/up one GEMM (the HF-named parameters stay, as views
  into the merged weight: `load_weights` and `init_dummy_weights` fill them as before);
- residual add + RMSNorm: one kernel (the residual is updated in place);
- rotary embedding of q and k + the KV-cache write: one kernel;
- SiLU(gate) * up: one kernel.

A layer is then ~10 kernels: 2 add+norm, 4 GEMMs, rope+write, attention (1-2), SiLU-mul.
Each decoder layer stays a module call (its `forward` is replaced, not bypassed), so forward
hooks on a layer run once it has written its K/V, as in the op-by-op model (layer-wise KV
streaming sends from them: prefill/layer_stream.py).
Rounding follows the op-by-op model (bf16 results rounded where it rounds them), except that
the rotary embedding is computed in fp32 and rounded once.
Applied by the ModelRunner with the triton attention backend (CUDA, NHD cache).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from engine.attention import AttentionMetadata, paged_attention
from engine.kv_layout import LayerCache
from engine.model import Attention, DecoderLayer, LlamaForCausalLM, LlamaModel, RMSNorm
from engine.rope import RotaryEmbedding


@triton.jit
def _add_rms_norm_kernel(x_ptr, h_ptr, w_ptr, out_ptr, stride_x, stride_h, stride_o, n, eps,
                         HAS_ADD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:  # residual += h, rounded to the model dtype as torch rounds it
        h = tl.load(h_ptr + row * stride_h + offs, mask=mask, other=0.0).to(tl.float32)
        x = (x + h).to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + row * stride_x + offs, x, mask=mask)
        x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n + eps)
    y = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (y * w).to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, h: torch.Tensor | None, norm: RMSNorm) -> torch.Tensor:
    """x += h (in place, when h is given), then return RMSNorm(x). x, h: [T, hidden]."""
    out = torch.empty_like(x)
    n = x.shape[-1]
    block = triton.next_power_of_2(n)
    _add_rms_norm_kernel[(x.shape[0],)](
        x, x if h is None else h, norm.weight, out, x.stride(0), 0 if h is None else h.stride(0),
        out.stride(0), n, norm.eps, HAS_ADD=h is not None, BLOCK=block,
        num_warps=8 if block >= 4096 else 4)
    return out


@triton.jit
def _rope_write_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, kc_ptr, vc_ptr, slots_ptr,
                       stride_qkv, stride_cos, stride_q, stride_k,
                       stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                       BLOCK_SIZE: tl.constexpr, NUM_Q: tl.constexpr, NUM_KV: tl.constexpr,
                       HEAD_DIM: tl.constexpr, Q_PAD: tl.constexpr, KV_PAD: tl.constexpr,
                       HALF_PAD: tl.constexpr):
    token = tl.program_id(0)
    half: tl.constexpr = HEAD_DIM // 2
    pos = tl.load(pos_ptr + token)
    offs = tl.arange(0, HALF_PAD)
    mask_d = offs < half
    cos = tl.load(cos_ptr + pos * stride_cos + offs, mask=mask_d, other=0.0)[None, :]  # fp32
    sin = tl.load(sin_ptr + pos * stride_cos + offs, mask=mask_d, other=0.0)[None, :]
    row = qkv_ptr + token * stride_qkv

    # q: rotate (HF rotate_half: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin])
    hq = tl.arange(0, Q_PAD)[:, None]
    mq = (hq < NUM_Q) & mask_d[None, :]
    src = row + hq * HEAD_DIM + offs[None, :]
    x1 = tl.load(src, mask=mq, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mq, other=0.0).to(tl.float32)
    dst = q_ptr + token * stride_q + hq * HEAD_DIM + offs[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(q_ptr.dtype.element_ty), mask=mq)
    tl.store(dst + half, (x2 * cos + x1 * sin).to(q_ptr.dtype.element_ty), mask=mq)

    # k: rotate, keep for prefill attention, and write to the cache; v: write to the cache
    slot = tl.load(slots_ptr + token)
    block = slot // BLOCK_SIZE
    in_block = slot % BLOCK_SIZE
    hk = tl.arange(0, KV_PAD)[:, None]
    mk = (hk < NUM_KV) & mask_d[None, :]
    src = row + NUM_Q * HEAD_DIM + hk * HEAD_DIM + offs[None, :]
    x1 = tl.load(src, mask=mk, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mk, other=0.0).to(tl.float32)
    k1 = (x1 * cos - x2 * sin).to(k_ptr.dtype.element_ty)
    k2 = (x2 * cos + x1 * sin).to(k_ptr.dtype.element_ty)
    dst = k_ptr + token * stride_k + hk * HEAD_DIM + offs[None, :]
    tl.store(dst, k1, mask=mk)
    tl.store(dst + half, k2, mask=mk)
    mc = mk & (slot >= 0)  # slot -1: a padding row, write nothing
    dst = kc_ptr + block * stride_kcb + in_block * stride_kcs + hk * stride_kch + offs[None, :]
    tl.store(dst, k1.to(kc_ptr.dtype.element_ty), mask=mc)
    tl.store(dst + half, k2.to(kc_ptr.dtype.element_ty), mask=mc)
    src = row + (NUM_Q + NUM_KV) * HEAD_DIM + hk * HEAD_DIM + offs[None, :]
    dst = vc_ptr + block * stride_vcb + in_block * stride_vcs + hk * stride_vch + offs[None, :]
    tl.store(dst, tl.load(src, mask=mc, other=0.0).to(vc_ptr.dtype.element_ty), mask=mc)
    tl.store(dst + half, tl.load(src + half, mask=mc, other=0.0).to(vc_ptr.dtype.element_ty),
             mask=mc)


def rope_and_write_kv(qkv: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
                      layer_cache: LayerCache, slot_mapping: torch.Tensor, num_heads: int,
                      num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv: [T, (Hq + 2 Hkv) D] -> rotated q [T, Hq, D] and k [T, Hkv, D]; rotated k and v go
    to the NHD cache at slot_mapping (-1 = skip)."""
    num_tokens = qkv.shape[0]
    q = qkv.new_empty(num_tokens, num_heads, head_dim)
    k = qkv.new_empty(num_tokens, num_kv_heads, head_dim)
    if num_tokens == 0:
        return q, k
    k_cache, v_cache = ((layer_cache[0][0], layer_cache[0][1]) if len(layer_cache) == 1
                        else layer_cache)
    _rope_write_kernel[(num_tokens,)](
        qkv, positions, rope.cos, rope.sin, q, k, k_cache, v_cache, slot_mapping,
        qkv.stride(0), rope.cos.stride(0), q.stride(0), k.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1], NUM_Q=num_heads, NUM_KV=num_kv_heads, HEAD_DIM=head_dim,
        Q_PAD=triton.next_power_of_2(num_heads), KV_PAD=triton.next_power_of_2(num_kv_heads),
        HALF_PAD=triton.next_power_of_2(head_dim // 2), num_warps=4)
    return q, k


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, n, stride_gu, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(gu_ptr + row * stride_gu + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + n + offs, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (s * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2 I] (gate | up) -> SiLU(gate) * up, [T, I]."""
    n = gate_up.shape[1] // 2
    out = gate_up.new_empty(gate_up.shape[0], n)
    if gate_up.shape[0]:
        _silu_mul_kernel[(gate_up.shape[0], triton.cdiv(n, 1024))](
            gate_up, out, n, gate_up.stride(0), out.stride(0), BLOCK=1024, num_warps=4)
    return out


# ---- the pass ----------------------------------------------------------------------------------
def _merge_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linears over the same input; each linear's
    parameters become views into it, so whatever fills them fills the merged one."""
    sizes = [lin.out_features for lin in linears]
    ref = linears[0].weight
    weight = torch.empty(sum(sizes), ref.shape[1], dtype=ref.dtype, device=ref.device)
    for lin, part in zip(linears, weight.split(sizes), strict=True):
        lin.weight = nn.Parameter(part, requires_grad=False)
    if linears[0].bias is None:
        return weight, None
    bias = torch.empty(sum(sizes), dtype=ref.dtype, device=ref.device)
    for lin, part in zip(linears, bias.split(sizes), strict=True):
        lin.bias = nn.Parameter(part, requires_grad=False)
    return weight, bias


def _attention(attn: Attention, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
               layer_cache: LayerCache, meta: AttentionMetadata) -> torch.Tensor:
    num_tokens = x.shape[0]
    qkv = F.linear(x, attn.qkv_weight, attn.qkv_bias)  # [T, (Hq + 2 Hkv) D]
    q, k = rope_and_write_kv(qkv, positions, rope, layer_cache, meta.slot_mapping,
                             attn.num_heads, attn.num_kv_heads, attn.head_dim)
    kv_width = attn.num_kv_heads * attn.head_dim
    v = qkv[:, -kv_width:].view(num_tokens, attn.num_kv_heads, attn.head_dim)
    out = paged_attention(q, k, v, layer_cache, meta, attn.scale, kv_written=True)
    return attn.o_proj(out.view(num_tokens, -1))


def _layer_forward(self: DecoderLayer, x: torch.Tensor, h: torch.Tensor | None,
                   positions: torch.Tensor, rope: RotaryEmbedding, kv_cache: LayerCache,
                   meta: AttentionMetadata) -> torch.Tensor:
    """One fused decoder layer. x: the residual stream [T, hidden], updated in place (x += h,
    the previous layer's output, then this layer's attention); returns this layer's MLP output,
    not yet added to x (the next layer's or the final norm's kernel adds it)."""
    normed = add_rms_norm(x, h, self.input_layernorm)
    h = _attention(self.self_attn, normed, positions, rope, kv_cache, meta)
    normed = add_rms_norm(x, h, self.post_attention_layernorm)
    mlp = self.mlp
    return mlp.down_proj(silu_mul(F.linear(normed, mlp.gate_up_weight)))


def _model_forward(self: LlamaModel, input_ids: torch.Tensor, positions: torch.Tensor,
                   kv_caches: list[LayerCache], meta: AttentionMetadata) -> torch.Tensor:
    x = self.embed_tokens(input_ids)  # [T, hidden], the residual stream
    h = None  # the last block's output, not yet added to x
    for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
        # a module call, as in the op-by-op model: forward hooks on a layer run once it has
        # written its K/V (layer-wise KV streaming sends each layer group from one)
        h = layer(x, h, positions, self.rope, kv_cache, meta)
    return add_rms_norm(x, h, self.norm)


def apply_fused_layers(model: LlamaForCausalLM) -> None:
    """Rewrite `model` in place for the CUDA path (see the module docstring). Call it after
    the model is on its device and dtype, before its weights are filled."""
    inner = model.model
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_weight, attn.qkv_bias = _merge_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        mlp.gate_up_weight, _ = _merge_linears([mlp.gate_proj, mlp.up_proj])
        layer.forward = types.MethodType(_layer_forward, layer)
    inner.forward = types.MethodType(_model_forward, inner)
