"""A Transformer encoder for review text, trained from scratch: one module for masked-LM pretraining and for
classification, so a fine-tuning run loads the pretraining checkpoint's state dict as is.

Shapes (B = batch, L = tokens incl. [CLS], D = dim, V = vocab_size, C = num_classes):
    ids            (B, L) int64, 0 = [PAD], position 0 = [CLS]
    encode(ids)    (B, L, D)   pre-norm Transformer encoder over token + learned position embeddings
    forward(ids)   (B, C)      logits: a linear head over [mean of the non-pad token states ; the [CLS] state]
    forward(ids, mlm_mask)     mlm_mask (B, L) bool -> (M, V) masked-LM logits at the M masked positions only
                               (output projection tied to the token embedding)
"""

from __future__ import annotations

import torch
from torch import nn


class TextClassifier(nn.Module):
    def __init__(self, vocab_size: int, num_classes: int = 2, max_len: int = 161, dim: int = 128, layers: int = 2,
                 heads: int = 4, ff: int = 256, dropout: float = 0.1, init_from: str | None = None) -> None:
        """`init_from` (a registry reference) is read by the task's `build_model`; the module ignores it."""
        super().__init__()
        self.max_len = max_len
        self.tok = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.pos = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(dim, heads, ff, dropout, activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * dim, num_classes))
        self.mlm_bias = nn.Parameter(torch.zeros(vocab_size))
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, L, D)."""
        pad = ids.eq(0)                                                          # (B, L) True at padding
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.drop(self.tok(ids) + self.pos(pos)[None])                       # (B, L, D)
        return self.norm(self.encoder(x, src_key_padding_mask=pad))

    def forward(self, ids: torch.Tensor, mlm_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) -> (B, C) class logits; with `mlm_mask` (B, L) -> (M, V) masked-LM logits."""
        h = self.encode(ids)                                                     # (B, L, D)
        if mlm_mask is not None:
            return h[mlm_mask] @ self.tok.weight.T + self.mlm_bias + self._unused(self.head)  # (M, V)
        keep = ids.ne(0).unsqueeze(-1).to(h.dtype)                               # (B, L, 1)
        mean = (h * keep).sum(1) / keep.sum(1).clamp_min(1.0)                    # (B, D)
        return self.head(torch.cat([mean, h[:, 0]], dim=-1)) + self._unused(self.mlm_bias)  # (B, C)

    @staticmethod
    def _unused(part: nn.Module | torch.Tensor) -> torch.Tensor:
        """0 times the parameters a path doesn't use: every parameter stays in the graph, so DDP (scaling=cpu2)
        needs no find_unused_parameters."""
        params = [part] if isinstance(part, torch.Tensor) else list(part.parameters())
        return sum(p.sum() for p in params) * 0.0
