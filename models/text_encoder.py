"""A tiny causal transformer text encoder whose last hidden state is the UNet's cross-attention context.

Choice: a small transformer **trained jointly** with the UNet, not frozen random embeddings
plus a trained projection. Why:

- Stable Diffusion's CLIP text encoder is a causal (GPT-style) transformer; with a causal mask
  the ``<bos>`` position attends only to itself, so its output is the same for every prompt.
  That constant start-token column is what the outlier papers observe soaking up
  cross-attention mass ("attention sink"). Frozen per-token embeddings with a projection
  would also give a constant ``<bos>`` column, but every other column would carry only its
  own word, so the digit would sit in one column whose position varies by template.
- With causal self-attention the digit's identity spreads into every later position
  (``<eos>`` and the ``<pad>`` tail, as in SD), which makes the class signal strong and
  position-independent for the UNet's cross-attention: the UNet can find it in any of the
  trailing columns. That is the point of the issue's warning (conditioning that is not
  learned in time); a jointly trained encoder learns this within the first few hundred steps.
- It is small (two blocks of width ``TEXT_DIM``), so it costs little next to the UNet.

Attention is written op by op (MatMul -> Mul(1/sqrt(d)) -> causal mask -> Softmax -> MatMul)
so the exported graph carries plain attention rather than a fused operator.
"""

from __future__ import annotations

import math

import torch
from torch import nn

TEXT_DIM, TEXT_HEADS, TEXT_DEPTH, TEXT_MLP = 64, 4, 2, 128


class CausalSelfAttention(nn.Module):
    """softmax(Q K^T / sqrt(d) + causal mask) V over ``heads`` heads."""

    def __init__(self, dim: int, heads: int, length: int):
        super().__init__()
        self.heads, self.head_dim, self.length = heads, dim // heads, length
        self.query, self.key, self.value, self.out = (nn.Linear(dim, dim) for _ in range(4))
        # Additive mask (0 on and below the diagonal, -1e4 above): a buffer, so it exports as
        # a constant. -1e4 rather than -inf keeps the softmax finite under any quantization.
        mask = torch.triu(torch.full((length, length), -1e4), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, self.length, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim)) + self.mask
        context = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.out(context.transpose(1, 2).reshape(-1, self.length, self.heads * self.head_dim))


class TextBlock(nn.Module):
    """Pre-norm block: x + Attn(LN(x)), then x + MLP(LN(x)) (CLIP's layout, GELU MLP)."""

    def __init__(self, dim: int, heads: int, length: int, hidden: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = CausalSelfAttention(dim, heads, length)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """Token + position embeddings, TEXT_DEPTH causal blocks, final LayerNorm -> (B, L, TEXT_DIM)."""

    def __init__(self, vocab_size: int, length: int, dim: int = TEXT_DIM, heads: int = TEXT_HEADS,
                 depth: int = TEXT_DEPTH, hidden: int = TEXT_MLP):
        super().__init__()
        self.token = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.randn(1, length, dim) * 0.02)
        self.blocks = nn.Sequential(*(TextBlock(dim, heads, length, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.token(input_ids) + self.position))
