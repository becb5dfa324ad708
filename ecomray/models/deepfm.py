"""DeepFM (Guo et al., IJCAI 2017): a factorization machine and a deep MLP over the same field embeddings, their
logits summed. Shapes: B = batch, F = fields, E = embedding dim.
forward(x (B, F) global field ids) -> logits (B,).
"""

from __future__ import annotations

import torch
from torch import nn

from ecomray.models.field_layers import MLP, FieldEmbedding


class FactorizationMachine(nn.Module):
    """bias + sum_f w[x_f] + sum_{f<g} <e_f, e_g>, the pairwise term in O(F E): ((sum e)^2 - sum e^2) / 2."""

    def __init__(self, cardinalities: list[int]) -> None:
        super().__init__()
        self.first_order = FieldEmbedding(cardinalities, 1)          # w: one weight per feature value
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        linear = self.first_order(x).sum((1, 2)) + self.bias                          # (B,)
        pairwise = 0.5 * (emb.sum(1).pow(2) - emb.pow(2).sum(1)).sum(1)               # (B,)
        return linear + pairwise


class DeepFM(nn.Module):
    def __init__(self, *, cardinalities: list[int], embed_dim: int = 10, hidden: list[int] | tuple[int, ...] = (400, 400, 400),
                 dropout: float = 0.2, batch_norm: bool = True) -> None:
        super().__init__()
        self.embedding = FieldEmbedding(cardinalities, embed_dim)
        self.fm = FactorizationMachine(cardinalities)
        self.deep = MLP(len(cardinalities) * embed_dim, hidden, dropout, batch_norm, out=1)

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The tables an embedding regularizer applies to (task.embedding_l2)."""
        return [self.embedding.table.weight, self.fm.first_order.table.weight]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(x)                                            # (B, F, E)
        return self.fm(x, emb) + self.deep(emb.flatten(1)).squeeze(1)      # (B,)
