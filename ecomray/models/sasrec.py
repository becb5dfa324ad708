"""SASRec: a causal self-attention encoder over item-id sequences (Kang & McAuley, 2018).

Shapes: B = batch, T = max_len, D = dim, I = num_items (ids 1..I; 0 is padding).
forward(seq (B, T) long) -> hidden (B, T, D); scoring against item embeddings is `hidden @ item_emb.T`.
"""

from __future__ import annotations

import torch
from torch import nn


class SASRec(nn.Module):
    def __init__(self, *, num_items: int, max_len: int = 50, dim: int = 64, blocks: int = 1, heads: int = 1,
                 dropout: float = 0.2, ffn_mult: int = 1) -> None:
        super().__init__()
        self.num_items, self.max_len, self.heads = num_items, max_len, heads
        self.item_emb = nn.Embedding(num_items + 1, dim, padding_idx=0)  # (I+1, D)
        self.pos_emb = nn.Embedding(max_len, dim)                         # (T, D)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * ffn_mult, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.item_emb.weight, std=dim ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq (B, T), T <= max_len, left-padded with 0 -> hidden (B, T, D); position t sees items <= t only.

        Positions count from the right (the newest item is always position max_len - 1), so a batch padded only
        to its longest sequence gives exactly the hidden states of the same batch padded to max_len: padding
        keys are masked, and the padding columns a short batch leaves out carry nothing.
        """
        B, T = seq.shape
        if T > self.max_len:
            raise ValueError(f"sequence length {T} > max_len {self.max_len}")
        real = seq > 0                                                           # (B, T)
        pos = torch.arange(self.max_len - T, self.max_len, device=seq.device)
        x = self.item_emb(seq) * (self.item_emb.embedding_dim ** 0.5) + self.pos_emb(pos)[None]
        x = self.drop(x) * real[..., None]
        # Disallowed: future keys, and padding keys (except a position's own, so no row is fully masked).
        future = torch.triu(torch.ones(T, T, dtype=torch.bool, device=seq.device), 1)  # (T, T)
        blocked = future[None] | (~real[:, None, :] & ~torch.eye(T, dtype=torch.bool, device=seq.device)[None])
        mask = blocked.repeat_interleave(self.heads, 0)                          # (B*H, T, T)
        h = self.encoder(x, mask=mask)
        return self.norm(h) * real[..., None]                                    # (B, T, D)

    def item_weights(self) -> torch.Tensor:
        """(I, D): embeddings of the real items 1..I (row k is item id k+1)."""
        return self.item_emb.weight[1:]
