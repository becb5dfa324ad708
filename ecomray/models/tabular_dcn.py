"""A DCN-style tabular classifier: embedded categoricals + numeric features -> cross layers || deep MLP -> logit.

Shapes: B = batch, N = numeric features, C = categorical features, E = embedding dim, F = N + C*E.
forward(numeric (B, N) float, categorical (B, C) long) -> logits (B,).
"""

from __future__ import annotations

import torch
from torch import nn


class CrossLayer(nn.Module):
    """x_{l+1} = x0 * (W x_l + b) + x_l  (DCN-V2 cross layer, full-rank)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.linear(x) + x


class TabularDCN(nn.Module):
    def __init__(self, *, num_numeric: int, cardinalities: list[int], embed_dim: int = 8, cross_layers: int = 2,
                 hidden: list[int] | tuple[int, ...] = (128, 64), dropout: float = 0.1) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(n, embed_dim) for n in cardinalities)
        with torch.no_grad():    # row 0, out of vocabulary: no training row reaches it, so it would stay a random
            for e in self.embeddings:   # vector for every unseen value at serving; zero is the neutral one
                e.weight[0].zero_()
        width = num_numeric + embed_dim * len(cardinalities)                       # F
        self.cross = nn.ModuleList(CrossLayer(width) for _ in range(cross_layers))
        layers: list[nn.Module] = []
        last = width
        for h in hidden:
            layers += [nn.Linear(last, h), nn.ReLU(), nn.Dropout(dropout)]
            last = h
        self.deep = nn.Sequential(*layers)
        self.head = nn.Linear(width + last, 1)

    def forward(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        emb = [e(categorical[:, k]) for k, e in enumerate(self.embeddings)]       # C x (B, E)
        x0 = torch.cat([numeric, *emb], dim=1)                                     # (B, F)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)                                                       # (B, F)
        return self.head(torch.cat([x, self.deep(x0)], dim=1)).squeeze(1)          # (B,)
