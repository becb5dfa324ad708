"""A decoder-only Transformer language model for copy generation (GPT-style: pre-LayerNorm blocks, learned positions,
output weights tied to the token embeddings), with a key/value cache for incremental decoding.

Shapes: B = batch, T = new tokens, P = cached (past) tokens, D = dim, H = heads, V = vocabulary.
forward(ids (B, T), positions (B, T) | None, key_mask (B, P + T) | None, cache | None) -> (logits (B, T, V), cache)
where cache is one (k, v) pair of (B, H, P + T, D / H) per layer, and key_mask marks real tokens (False: padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Cache = list[tuple[torch.Tensor, torch.Tensor]]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff), nn.GELU(), nn.Linear(ff, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                past: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B,H,T,d)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)                               # (B,H,P+T,d)
        drop = self.dropout if self.training else 0.0
        if mask is None:                                  # training: plain causal attention, no cache, no padding
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T, D)))
        return x + self.drop(self.ff(self.ln2(x))), (k, v)


class CopyLM(nn.Module):
    def __init__(self, *, vocab_size: int, max_len: int = 320, dim: int = 256, layers: int = 4, heads: int = 4,
                 ff: int = 1024, dropout: float = 0.1) -> None:
        super().__init__()
        self.max_len = max_len
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, ff, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                cache: Cache | None = None) -> tuple[torch.Tensor, Cache]:
        B, T = ids.shape
        past = cache[0][0].shape[2] if cache else 0                                            # P
        if positions is None:
            positions = torch.arange(past, past + T, device=ids.device).expand(B, T)
        x = self.drop(self.tok(ids) + self.pos(positions.clamp(max=self.max_len - 1)))       # (B, T, D)
        mask = None
        if cache is not None or key_mask is not None:
            q = torch.arange(past, past + T, device=ids.device)[:, None]
            kpos = torch.arange(past + T, device=ids.device)[None, :]
            allowed = (kpos <= q)[None, None]                                                  # (1, 1, T, P+T)
            if key_mask is not None:
                allowed = allowed & key_mask[:, None, None, :]                                 # (B, 1, T, P+T)
            # every query may attend to itself, so a padding query never has an empty row (NaN)
            mask = allowed | (kpos == q)[None, None]
        new_cache: Cache = []
        for n, block in enumerate(self.blocks):
            x, kv = block(x, mask, cache[n] if cache else None)
            new_cache.append(kv)
        return self.ln(x) @ self.tok.weight.T, new_cache                                      # (B, T, V)
