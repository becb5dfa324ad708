"""FinalMLP (Mao et al., AAAI 2023): two MLP streams over the same field embeddings, each behind its own feature
gate (stream 1 gated by the context of some fields, stream 2 by others), fused by a multi-head bilinear layer.
Shapes: B = batch, F = fields, E = embedding dim, D = F * E, H = heads. forward(x (B, F) global field ids) -> (B,).
"""

from __future__ import annotations

import torch
from torch import nn

from ecomray.models.field_layers import MLP, FieldEmbedding


class FeatureGate(nn.Module):
    """gate = 2 * sigmoid(MLP(context)), context = the `fields`' own embeddings (a table of the gate's, not the
    streams'), or a learned vector when there are none: each stream re-weights every embedding dimension by what the
    context says matters (gate 1 = unchanged)."""

    def __init__(self, cardinalities: list[int], width: int, embed_dim: int, fields: list[int],
                 hidden: list[int]) -> None:
        super().__init__()
        self.fields = fields
        self.embedding = FieldEmbedding(cardinalities, embed_dim) if fields else None
        self.bias = nn.Parameter(torch.zeros(1, embed_dim)) if not fields else None
        self.mlp = MLP(len(fields) * embed_dim if fields else embed_dim, hidden, out=width)

    def forward(self, x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        if self.embedding is not None:
            ctx = self.embedding(x[:, self.fields]).flatten(1)                                 # (B, C)
        else:
            ctx = self.bias.expand(len(x), -1)
        return flat * 2 * torch.sigmoid(self.mlp(ctx))                                         # (B, D)


class BilinearFusion(nn.Module):
    """logit = w1.x + w2.y + sum_h x_h^T W_h y_h, with x and y cut into H heads (x_h: X/H, y_h: Y/H)."""

    def __init__(self, x_dim: int, y_dim: int, heads: int) -> None:
        super().__init__()
        if x_dim % heads or y_dim % heads:
            raise ValueError(f"FinalMLP: stream widths {x_dim} and {y_dim} must divide by heads={heads}")
        self.heads = heads
        self.wx, self.wy = nn.Linear(x_dim, 1), nn.Linear(y_dim, 1)
        self.w = nn.Parameter(torch.empty(heads, x_dim // heads, y_dim // heads))
        # the bilinear weights start small, as one (H * X/H * Y/H, 1) column with Xavier scaling would
        nn.init.normal_(self.w, std=(2.0 / (self.w.numel() + 1)) ** 0.5)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xh = x.view(len(x), self.heads, -1)                                   # (B, H, X/H)
        yh = y.view(len(y), self.heads, -1)                                   # (B, H, Y/H)
        pair = torch.einsum("bhi,hij,bhj->b", xh, self.w, yh)                 # (B,)
        return self.wx(x).squeeze(1) + self.wy(y).squeeze(1) + pair


class FinalMLP(nn.Module):
    def __init__(self, *, cardinalities: list[int], embed_dim: int = 10, hidden1: list[int] | tuple[int, ...] = (400,),
                 hidden2: list[int] | tuple[int, ...] = (100,), dropout1: float = 0.4, dropout2: float = 0.4,
                 batch_norm: bool = True, gate_fields1: list[int] | tuple[int, ...] = (0,),
                 gate_fields2: list[int] | tuple[int, ...] = (1,), gate_hidden: list[int] | tuple[int, ...] = (400,),
                 heads: int = 5) -> None:
        super().__init__()
        width = len(cardinalities) * embed_dim                                          # D
        self.embedding = FieldEmbedding(cardinalities, embed_dim)
        self.gate1 = FeatureGate(cardinalities, width, embed_dim, list(gate_fields1), list(gate_hidden))
        self.gate2 = FeatureGate(cardinalities, width, embed_dim, list(gate_fields2), list(gate_hidden))
        self.mlp1 = MLP(width, hidden1, dropout1, batch_norm)
        self.mlp2 = MLP(width, hidden2, dropout2, batch_norm)
        self.fusion = BilinearFusion(self.mlp1.width, self.mlp2.width, heads)

    def embedding_parameters(self) -> list[nn.Parameter]:
        return [self.embedding.table.weight, *[g.embedding.table.weight for g in (self.gate1, self.gate2)
                                               if g.embedding is not None]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.embedding(x).flatten(1)                                             # (B, D)
        return self.fusion(self.mlp1(self.gate1(x, flat)), self.mlp2(self.gate2(x, flat)))   # (B,)
