"""Parts shared by the click-through-rate models (deepfm.py, dcnv2.py): the field embedding over one table and the
deep MLP. Shapes: B = batch, F = fields, E = embedding dim.

Initialization follows FuxiCTR (the library behind the BARS benchmark), so that a side-by-side comparison differs
in the platform, not the recipe: embeddings ~ N(0, 1e-4), linear weights Xavier-normal with zero biases.
"""

from __future__ import annotations

import torch
from torch import nn


class FieldEmbedding(nn.Module):
    """(B, F) global ids (field offset + index; ecomray.tasks.ctr.encode) -> (B, F, E), from one table."""

    def __init__(self, cardinalities: list[int], dim: int) -> None:
        super().__init__()
        self.table = nn.Embedding(int(sum(cardinalities)), dim)
        nn.init.normal_(self.table.weight, std=1e-4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table(x)


class MLP(nn.Module):
    """Linear -> [BatchNorm] -> ReLU -> [Dropout] per hidden layer; `out` adds a final linear layer."""

    def __init__(self, width: int, hidden: list[int] | tuple[int, ...], dropout: float = 0.0,
                 batch_norm: bool = False, out: int | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        if out is not None:
            layers.append(nn.Linear(width, out))
        self.net = nn.Sequential(*layers)
        self.width = out if out is not None else width
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
