"""A decoder-only Transformer language model for copy generation (GPT-style: pre-LayerNorm blocks, learned positions,
output weights tied to the token embeddings), with a key/value cache for incremental decoding.

Shapes: B = batch, T = new tokens, P = cached (past) tokens, D = dim, H = heads, V = vocabulary.
forward(ids (B, T), positions (B, T) | None, key_mask (B, P + T) | None, cache | None) -> (logits (B, T, V), cache)
where key_mask marks real tokens (False: padding); with a key_mask (decoding) the logits are the last position's
only, (B, 1, V), since decoding reads no other (a prompt's other positions would cost a third of the prefill). With a key_mask (decoding) the cache is a `KVCache`: one
preallocated (B, H, capacity, D / H) key and value buffer per layer, written in place at positions P..P+T-1, so a
decoding step copies one token's keys rather than the whole past; without one (training) there is no cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn



class KVCache:
    """Keys and values of the tokens seen so far: per layer, (B, H, capacity, d) buffers, the first `length` used."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: int = 0) -> None:
        self.keys, self.values, self.length = keys, values, length

    @classmethod
    def empty(cls, layers: int, like: torch.Tensor, capacity: int) -> "KVCache":
        B, H, _, d = like.shape
        new = lambda: like.new_empty((B, H, capacity, d))  # noqa: E731     (only the first `length` are read)
        return cls([new() for _ in range(layers)], [new() for _ in range(layers)])

    def put(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' k, v (B, H, T, d) of `layer`; return all of the layer's (B, H, length + T, d)."""
        end = self.length + k.shape[2]
        if end > self.keys[layer].shape[2]:                 # out of room: at least double the buffers
            cap = max(end, 2 * self.keys[layer].shape[2])
            grow = lambda x: torch.cat([x, x.new_empty((*x.shape[:2], cap - x.shape[2], x.shape[3]))], 2)  # noqa: E731
            self.keys[layer], self.values[layer] = grow(self.keys[layer]), grow(self.values[layer])
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def select(self, idx: torch.Tensor) -> "KVCache":
        """The rows `idx` of the batch (finished sequences dropped, beams reordered); only the used part of each
        buffer is copied, the capacity is kept."""
        def rows(x: torch.Tensor) -> torch.Tensor:
            out = x.new_empty((len(idx), *x.shape[1:]))
            torch.index_select(x[:, :, :self.length], 0, idx, out=out[:, :, :self.length])
            return out
        return KVCache([rows(k) for k in self.keys], [rows(v) for v in self.values], self.length)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff), nn.GELU(), nn.Linear(ff, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B,H,T,d)
        if cache is not None:
            k, v = cache.put(layer, k, v)                                                                # (B,H,P+T,d)
        drop = self.dropout if self.training else 0.0
        if mask is None:                                  # training: plain causal attention, no cache, no padding
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        elif T == 1 and not self.training:
            # a decoding step: one query per row. Written out, since two small matmuls cost about 60% of
            # scaled_dot_product_attention's call on CPU at this size (benchmarks/README.md#copy-generation)
            att = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + mask                  # (B,H,1,P+1)
            y = torch.matmul(att.softmax(-1), v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T, D)))
        return x + self.drop(self.ff(self.ln2(x)))


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
                cache: KVCache | None = None) -> tuple[torch.Tensor, KVCache | None]:
        B, T = ids.shape
        past = cache.length if cache is not None else 0                                        # P
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
            # every query may attend to itself, so a padding query never has an empty row (NaN); additive, built
            # once for every layer
            allowed = allowed | (kpos == q)[None, None]
            mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill_(~allowed, float("-inf"))
        if cache is None and key_mask is not None:       # decoding starts: room for the prompt and a full copy
            d = self.tok.weight.shape[1] // self.blocks[0].heads
            like = x.new_empty((B, self.blocks[0].heads, 0, d))
            cache = KVCache.empty(len(self.blocks), like, max(self.max_len, T + 1))
        for n, block in enumerate(self.blocks):
            x = block(x, mask, cache, n)
        if cache is not None:
            cache.length += T
        if key_mask is not None:                         # decoding reads the last position's logits only
            x = x[:, -1:]
        return F.linear(self.ln(x), self.tok.weight), cache                          # (B, T, V); decoding (B, 1, V)
