"""K independently initialized SASRec members in one module (a deep ensemble, Lakshminarayanan et al. 2017).

Each member is a whole `SASRec` (its own item embeddings, positions and blocks) and is trained on its own loss;
the ensemble ranks items by the mean of the members' log-probabilities (a geometric mean of their softmaxes).
On a catalogue-sized softmax over sparse data (Amazon Beauty: 22k users, 12k items) members that differ only in
their initialization and dropout disagree enough that averaging them lifts HR@10 and NDCG@10 by several percent
over any one of them; the cost is K times one model's training.

Shapes: K = members, B = batch, T = sequence length (<= max_len), D = dim, I = num_items.
forward(seq (B, T) long) -> hidden (K, B, T, D); item_weights() -> (K, I, D).
"""

from __future__ import annotations

import torch
from torch import nn

from ecomray.models.sasrec import SASRec


class SASRecEnsemble(nn.Module):
    def __init__(self, *, num_items: int, members: int = 3, max_len: int = 50, dim: int = 64, blocks: int = 1,
                 heads: int = 1, dropout: float = 0.2, ffn_mult: int = 1) -> None:
        super().__init__()
        if members < 1:
            raise ValueError(f"members must be >= 1, got {members}")
        self.num_items, self.max_len = num_items, max_len
        # Each member draws its own initialization from the global RNG in turn (the loop seeds it first).
        self.members = nn.ModuleList(
            SASRec(num_items=num_items, max_len=max_len, dim=dim, blocks=blocks, heads=heads, dropout=dropout,
                   ffn_mult=ffn_mult) for _ in range(members))

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq (B, T) -> (K, B, T, D): every member's hidden states."""
        return torch.stack([m(seq) for m in self.members])

    def item_weights(self) -> torch.Tensor:
        """(K, I, D): each member's embeddings of the real items 1..I."""
        return torch.stack([m.item_weights() for m in self.members])
