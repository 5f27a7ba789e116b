"""Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2) over a paged KV cache.

Parameter names equal Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...), so a
checkpoint's state dict loads directly. The model knows nothing of batching policy, networks
or cache layout conversion: it reads `AttentionMetadata` and one cache tensor per layer.

Under tensor parallelism each rank builds its share (`TpPlan`: its query and KV heads, its MLP
columns, its vocabulary rows) and the row-parallel layers and the embedding all-reduce through
the `TpGroup` (engine/tp_layers.py); `compute_logits` gathers the vocabulary to rank 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata, paged_attention
from engine.config import ModelConfig
from engine.kv_layout import LayerCache
from engine.rope import RotaryEmbedding
from engine.tp_group import TpGroup
from engine.tp_layers import RowParallelLinear, VocabParallelEmbedding
from engine.tp_plan import TpPlan


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like the reference implementation, then scale in the model dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: TpPlan, tp: TpGroup) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = plan.num_heads, plan.num_kv_heads  # this rank's
        self.head_dim = cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = RowParallelLinear(self.num_heads * cfg.head_dim, cfg.hidden_size, tp)
        self.scale = cfg.head_dim ** -0.5

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
                kv_cache: LayerCache, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        q = self.q_proj(x).view(num_tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = rope(positions, q, k)
        out = paged_attention(q, k, v, kv_cache, meta, self.scale)  # [T, Hq, D]
        return self.o_proj(out.reshape(num_tokens, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: TpPlan, tp: TpGroup) -> None:
        super().__init__()
        width = plan.intermediate_size  # this rank's columns
        self.gate_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.down_proj = RowParallelLinear(width, cfg.hidden_size, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: TpPlan, tp: TpGroup) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, plan, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, plan, tp)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
                kv_cache: LayerCache, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, rope, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int, plan: TpPlan, tp: TpGroup) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(plan.vocab_per_rank, cfg.hidden_size,
                                                   plan.vocab_start, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, plan, tp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[LayerCache], meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, hidden]
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, positions, self.rope, kv_cache, meta)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """forward() -> final hidden states [T, hidden]; compute_logits() -> fp32 logits [N, vocab]
    (on rank 0; None on the other TP ranks)."""

    def __init__(self, cfg: ModelConfig, max_positions: int, tp: TpGroup | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.tp = tp or TpGroup.single()
        self.plan = TpPlan(cfg, self.tp.rank, self.tp.size)
        self.model = LlamaModel(cfg, max_positions, self.plan, self.tp)
        self.lm_head = nn.Linear(cfg.hidden_size, self.plan.vocab_per_rank, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[LayerCache], meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        # [N, V'] this rank's vocabulary slice -> [N, vocab] on rank 0
        return self.tp.gather_vocab(self.lm_head(hidden).float(), self.config.vocab_size)

    @torch.no_grad()
    def init_dummy_weights(self, seed: int = 0) -> None:
        """Random weights for benchmarks (`--load-format dummy`): N(0, 0.02), norms at 1 (each
        TP rank draws its own shard)."""
        gen = torch.Generator(device=self.lm_head.weight.device).manual_seed(seed + self.tp.rank)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy a HF-named state dict in (this rank's shards under TP); every parameter must be
        present, none extra."""
        expected = dict(self.named_parameters())
        if self.config.tie_word_embeddings:
            expected.pop("lm_head.weight", None)
            weights = {k: w for k, w in weights.items() if k != "lm_head.weight"}
        missing = sorted(set(expected) - set(weights))
        unexpected = sorted(k for k in set(weights) - set(expected) if "rotary_emb" not in k)
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, param in expected.items():
                w = weights[name]
                if w.shape != param.shape:
                    raise ValueError(f"{name}: checkpoint shape {tuple(w.shape)} "
                                     f"!= model {tuple(param.shape)}")
                param.copy_(w.to(param.dtype))
