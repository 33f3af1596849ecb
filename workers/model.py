"""A small decoder-only transformer whose attention kind is a config field.

Reads top-down: positions, attention, MLP, block, config, model (after nanoGPT's model.py).
The settings that decide a fair start (q/k/v init scale, attention temperature, positional
encoding) are config fields too; docs/evaluation.md says why their defaults are what they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from workers.attention import ATTENTION_KINDS, causal_mask, squared_or_plain_softmax, weights_from_scores

QKV_INIT_STD = 0.02  # q/k/v projection init std by default (docs/evaluation.md, "Fair start": why not 0.2)


def rotate(x: Tensor) -> Tensor:
    """Rotary position encoding of queries or keys (B, H, T, d): pairs of channels turned by position."""
    t, d = x.shape[-2], x.shape[-1]
    freq = 10000.0 ** (-torch.arange(0, d, 2, device=x.device, dtype=x.dtype) / d)  # (d/2,)
    angle = torch.arange(t, device=x.device, dtype=x.dtype)[:, None] * freq  # (T, d/2)
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)  # (B, H, T, d)


POSITIONAL = ("learned", "rotary", "none")  # learned absolute embeddings, rotary on q and k, no positions


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; the kind decides how scores become weights.

    Scores are ``q . k / (sqrt(d_head) * temperature)``; a learned temperature is one per head.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.kind = cfg.attention
        self.eps = cfg.eps
        self.rotary = cfg.positional == "rotary"
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        log_t = torch.full((cfg.n_heads, 1, 1), math.log(cfg.temperature))
        self.log_temperature: Tensor
        if cfg.learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t, persistent=False)
        self.mask: Tensor
        self.register_buffer("mask", causal_mask(cfg.context_length), persistent=False)

    def forward(self, x: Tensor, square: Tensor | None = None) -> Tensor:
        """``square``: EA (true) or DPA (false) instead of the configured kind (a pack that mixes them)."""
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2) for z in (q, k, v))  # (B, H, T, d)
        if self.rotary:
            q, k = rotate(q), rotate(k)
        scale = math.sqrt(q.shape[-1]) * self.log_temperature.exp()  # sqrt(d_head), not sqrt(d_model); (H, 1, 1)
        scores = (q @ k.transpose(-2, -1)) / scale  # (B, H, T, T)
        if square is None:
            w = weights_from_scores(scores, self.kind, self.eps, self.mask[:t, :t])  # (B, H, T, T)
        else:
            w = squared_or_plain_softmax(scores, square, self.mask[:t, :t])
        y = (w @ v).transpose(1, 2).reshape(b, t, c)  # (B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.act = nn.GELU()
        self.out = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.act(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, square: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln1(x), square)
        return x + self.mlp(self.ln2(x))


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    context_length: int
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 2
    attention: str = "dpa"
    eps: float = 1e-6
    mlp_ratio: int = 4
    init_std: float = 0.02  # every linear and embedding weight
    qkv_init_std: float = QKV_INIT_STD  # the q/k/v projection: sets the size of the scores at init
    temperature: float = 1.0
    learn_temperature: bool = False
    positional: str = "learned"

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model must be divisible by n_heads: {self.d_model=}, {self.n_heads=}")
        if self.positional not in POSITIONAL:
            raise ValueError(f"unknown positional encoding {self.positional=}; known: {POSITIONAL}")
        if self.positional == "rotary" and (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"rotary positions need an even head size, got d_model/n_heads={self.d_model // self.n_heads}"
            )
        for name in ("init_std", "qkv_init_std", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"unknown attention kind {self.attention=}; registered: {ATTENTION_KINDS}")
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class Transformer(nn.Module):
    """Token (+ learned position) embeddings, pre-norm blocks, final norm, output head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.context_length, cfg.d_model) if cfg.positional == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)
        qkv = {m.qkv for m in self.modules() if isinstance(m, CausalSelfAttention)}
        for m in self.modules():  # one draw per weight, in module order
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=cfg.qkv_init_std if m in qkv else cfg.init_std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=cfg.init_std)

    def forward(self, idx: Tensor, square: Tensor | None = None) -> Tensor:
        """Logits (B, T, vocab) for token ids (B, T); ``square``: see ``CausalSelfAttention.forward``."""
        t = idx.shape[1]
        if t > self.cfg.context_length:
            raise ValueError(f"sequence length {t} exceeds context_length={self.cfg.context_length}")
        x = self.tok(idx)  # (B, T, C)
        if self.pos is not None:
            x = x + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x, square)
        return self.head(self.ln_f(x))  # (B, T, vocab)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def count_parameters(cfg: ModelConfig) -> int:
    """Parameter count of a model with ``cfg``, computed without building it."""
    d, v, r = cfg.d_model, cfg.vocab_size, cfg.mlp_ratio
    t = cfg.context_length if cfg.positional == "learned" else 0
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (r * d * d + r * d) + (r * d * d + d)
    block += cfg.n_heads if cfg.learn_temperature else 0
    return v * d + t * d + cfg.n_layers * block + 2 * d + d * v + v
