"""Tensor-parallel layers for the model (engine/model.py), sized by `TpPlan`, talking through
`TpGroup`. Parameter names stay Hugging Face's (`o_proj.weight`, `embed_tokens.weight`), so
the loaders fill a rank's shard as they fill a whole model. With one rank each layer is the
plain torch layer it subclasses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.tp_group import TpGroup


class RowParallelLinear(nn.Linear):
    """y = sum over ranks of x_r W_r^T: this rank's input columns, one all-reduce."""

    def __init__(self, in_features: int, out_features: int, tp: TpGroup) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(F.linear(x, self.weight))


class VocabParallelEmbedding(nn.Embedding):
    """Rank r holds vocabulary rows [start, start + V'); a token outside them contributes zeros
    here and its row from the rank that holds it (one all-reduce)."""

    def __init__(self, num_rows: int, hidden_size: int, vocab_start: int, tp: TpGroup) -> None:
        super().__init__(num_rows, hidden_size)
        self.vocab_start, self.tp = vocab_start, tp

    def reset_parameters(self) -> None:
        """No random draw: the weights come from the checkpoint (or `init_dummy_weights`). On
        the meta device `normal_` would import torch._dynamo: seconds of every worker's start."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.is_single:
            return super().forward(input_ids)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)  # [T, hidden]
        return self.tp.all_reduce(x.masked_fill(outside.unsqueeze(-1), 0.0))
