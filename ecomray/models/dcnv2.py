"""DCN-V2 (Wang et al., WWW 2021): full-rank cross layers x_{l+1} = x_0 * (W_l x_l + b_l) + x_l beside (parallel)
or before (stacked) a deep MLP, over the flattened field embeddings. Shapes: B = batch, F = fields,
E = embedding dim, D = F * E. forward(x (B, F) global field ids) -> logits (B,).
"""

from __future__ import annotations

import torch
from torch import nn

from ecomray.models.field_layers import MLP, FieldEmbedding


class CrossNetV2(nn.Module):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        for layer in self.layers:
            nn.init.xavier_normal_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x                                          # (B, D)
        return x


class DCNv2(nn.Module):
    def __init__(self, *, cardinalities: list[int], embed_dim: int = 10, cross_layers: int = 4,
                 hidden: list[int] | tuple[int, ...] = (400, 400, 400), dropout: float = 0.4, batch_norm: bool = True,
                 structure: str = "parallel") -> None:
        super().__init__()
        if structure not in ("parallel", "stacked"):
            raise ValueError(f"DCNv2 structure must be parallel or stacked, not {structure!r}")
        width = len(cardinalities) * embed_dim                                        # D
        self.structure = structure
        self.embedding = FieldEmbedding(cardinalities, embed_dim)
        self.cross = CrossNetV2(width, cross_layers)
        self.deep = MLP(width, hidden, dropout, batch_norm)
        head_in = width + self.deep.width if structure == "parallel" else self.deep.width
        self.head = nn.Linear(head_in, 1)
        nn.init.xavier_normal_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def embedding_parameters(self) -> list[nn.Parameter]:
        return [self.embedding.table.weight]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.embedding(x).flatten(1)                                             # (B, D)
        if self.structure == "parallel":
            return self.head(torch.cat([self.cross(x0), self.deep(x0)], 1)).squeeze(1)
        return self.head(self.deep(self.cross(x0))).squeeze(1)
