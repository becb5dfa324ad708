"""An encoder-decoder Transformer for copy generation: the encoder reads the prompt, the decoder writes the copy
attending to its own past (causal) and to the encoded prompt (cross-attention). Pre-LayerNorm blocks, learned
positions (one table for each side), one token embedding shared by the encoder input, the decoder input and the
output layer; the decoding counterpart of `copy_lm.CopyLM`, built to be compared with it on validation.

Shapes: B = batch, S = prompt tokens, T = new decoder tokens, P = decoded (past) tokens, D = dim, H = heads,
V = vocabulary, d = D / H.
forward(src (B, S), src_mask (B, S), tgt (B, T)) -> logits (B, T, V)       training: teacher forcing, no cache
step(ids, cache, positions, key_mask, start) -> (logits (B, 1, V), Seq2SeqCache)   the `step` of ecomray.decoding
src_mask marks real tokens (False: padding). Decoding starts from the `start` token the caller names (the task's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ecomray.models.copy_lm import Block, KVCache


class Seq2SeqCache:
    """What a decoding step needs besides the new token: the decoder's self-attention keys/values so far (a
    `KVCache`, written in place), and per decoder layer the encoded prompt's cross-attention keys and values
    (B, H, S, d), computed once at prefill, with the prompt's padding as an additive mask (B, 1, 1, S)."""

    def __init__(self, past: KVCache, memory_keys: list[torch.Tensor], memory_values: list[torch.Tensor],
                 memory_mask: torch.Tensor) -> None:
        self.past, self.memory_keys, self.memory_values = past, memory_keys, memory_values
        self.memory_mask = memory_mask

    @property
    def length(self) -> int:
        """Decoder tokens seen so far (the start token included): the next token's position."""
        return self.past.length

    def select(self, idx: torch.Tensor) -> "Seq2SeqCache":
        """The rows `idx` of the batch (finished sequences dropped, beams reordered)."""
        return Seq2SeqCache(self.past.select(idx), [k.index_select(0, idx) for k in self.memory_keys],
                            [v.index_select(0, idx) for v in self.memory_values], self.memory_mask.index_select(0, idx))


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    B, T, D = x.shape
    return x.view(B, T, heads, D // heads).transpose(1, 2)                                    # (B, H, T, d)


def _merge(y: torch.Tensor) -> torch.Tensor:
    B, H, T, d = y.shape
    return y.transpose(1, 2).reshape(B, T, H * d)                                             # (B, T, D)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            dropout: float) -> torch.Tensor:
    """q (B, H, T, d) over k, v (B, H, S, d), `mask` additive (B, 1, 1, S) or None -> (B, H, T, d). A decoding step
    (one query per row, no dropout) is written out: two small matmuls cost less than the call of
    scaled_dot_product_attention on CPU at this size (as in copy_lm), which matters to the speed comparison."""
    if q.shape[2] == 1 and dropout == 0.0:
        att = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5                   # (B, H, 1, S)
        return torch.matmul((att if mask is None else att + mask).softmax(-1), v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)                     # self-attention
        self.q, self.kv, self.cross_proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff), nn.GELU(), nn.Linear(ff, dim))
        self.drop = nn.Dropout(dropout)

    def memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values (B, H, S, d) of the encoded prompt (B, S, D)."""
        k, v = self.kv(memory).chunk(2, -1)
        return _heads(k, self.heads), _heads(v, self.heads)

    def forward(self, x: torch.Tensor, mem_k: torch.Tensor, mem_v: torch.Tensor, mem_mask: torch.Tensor,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        """x (B, T, D). Without a cache (training) self-attention is causal over x; with one, x is one new token
        per row and attends to every past token (all rows have decoded the same number: no padding)."""
        drop = self.dropout if self.training else 0.0
        q, k, v = (_heads(t, self.heads) for t in self.qkv(self.ln1(x)).chunk(3, -1))     # (B, H, T, d)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        else:
            k, v = cache.put(layer, k, v)                                                    # (B, H, P+T, d)
            y = _attend(q, k, v, None, drop)
        x = x + self.drop(self.proj(_merge(y)))
        q = _heads(self.q(self.ln2(x)), self.heads)
        y = _attend(q, mem_k, mem_v, mem_mask, drop)                                          # (B, H, T, d)
        x = x + self.drop(self.cross_proj(_merge(y)))
        return x + self.drop(self.ff(self.ln3(x)))


class CopySeq2Seq(nn.Module):
    encoder_decoder = True          # the task builds (prompt, decoder input) batches for it instead of one sequence

    def __init__(self, *, vocab_size: int, max_len: int = 320, dim: int = 256, enc_layers: int = 2,
                 dec_layers: int = 2, heads: int = 4, ff: int = 768, dropout: float = 0.1) -> None:
        super().__init__()
        self.max_len = max_len
        self.tok = nn.Embedding(vocab_size, dim)
        self.enc_pos, self.dec_pos = nn.Embedding(max_len, dim), nn.Embedding(max_len, dim)
        # encoder layers: copy_lm's pre-LN block, given the padding mask and no cache (every prompt position
        # attends to every real prompt token)
        self.encoder = nn.ModuleList(Block(dim, heads, ff, dropout) for _ in range(enc_layers))
        self.decoder = nn.ModuleList(DecoderBlock(dim, heads, ff, dropout) for _ in range(dec_layers))
        self.enc_ln, self.ln = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        for table in (self.tok, self.enc_pos, self.dec_pos):
            nn.init.normal_(table.weight, std=0.02)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor,
               positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoded prompt (B, S, D) and its additive padding mask (B, 1, 1, S). Positions default to 0..S-1
        (right padding); left-padded prompts pass theirs (counted from each prompt's first real token)."""
        B, S = src.shape
        if positions is None:
            positions = torch.arange(S, device=src.device).expand(B, S)
        x = self.drop(self.tok(src) + self.enc_pos(positions.clamp(max=self.max_len - 1)))   # (B, S, D)
        mask = torch.zeros((B, 1, 1, S), dtype=x.dtype, device=x.device)
        mask.masked_fill_(~src_mask[:, None, None, :], float("-inf"))
        for n, block in enumerate(self.encoder):
            x = block(x, mask, None, n)
        return self.enc_ln(x), mask

    def decode(self, tgt: torch.Tensor, memory: list[tuple[torch.Tensor, torch.Tensor]], mem_mask: torch.Tensor,
               cache: KVCache | None) -> torch.Tensor:
        """Logits (B, T, V) of the decoder tokens `tgt` (B, T), which follow the cache's `length` tokens."""
        B, T = tgt.shape
        past = cache.length if cache is not None else 0
        positions = torch.arange(past, past + T, device=tgt.device).clamp(max=self.max_len - 1)
        x = self.drop(self.tok(tgt) + self.dec_pos(positions)[None])                           # (B, T, D)
        for n, (block, (k, v)) in enumerate(zip(self.decoder, memory)):
            x = block(x, k, v, mem_mask, cache, n)
        if cache is not None:
            cache.length += T
        return F.linear(self.ln(x), self.tok.weight)                                           # (B, T, V)

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        memory, mask = self.encode(src, src_mask)
        return self.decode(tgt, [block.memory(memory) for block in self.decoder], mask, None)

    def step(self, ids: torch.Tensor, cache: Seq2SeqCache | None, positions: torch.Tensor | None,
             key_mask: torch.Tensor | None, start: int) -> tuple[torch.Tensor, Seq2SeqCache]:
        """One call of `ecomray.decoding.generate`'s step. Prefill (cache None): `ids` (B, S) is the left-padded
        prompt with its `positions` and `key_mask`; it is encoded, each decoder layer's cross-attention keys and
        values are computed once, and the decoder reads the `start` token. Later: `ids` (B, 1), one token per row;
        `positions` and `key_mask` (the prompt-plus-output view of a decoder-only model) are not needed, since the
        decoder counts its own positions and the prompt's mask lives in the cache. Returns logits (B, 1, V)."""
        if cache is None:
            real = key_mask if key_mask is not None else torch.ones_like(ids, dtype=torch.bool)
            memory, mask = self.encode(ids, real, positions)
            mem = [block.memory(memory) for block in self.decoder]
            B, d = ids.shape[0], self.tok.weight.shape[1] // self.decoder[0].heads
            past = KVCache.empty(len(self.decoder), memory.new_empty((B, self.decoder[0].heads, 0, d)), self.max_len)
            cache = Seq2SeqCache(past, [k for k, _ in mem], [v for _, v in mem], mask)
            ids = torch.full((B, 1), start, dtype=torch.long, device=memory.device)
        logits = self.decode(ids, list(zip(cache.memory_keys, cache.memory_values)), cache.memory_mask, cache.past)
        return logits, cache
