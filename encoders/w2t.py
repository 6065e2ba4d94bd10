"""W2T (Weight-to-Token): a two-level Transformer over the canonical rank tokens of an adapter.

After "W2T: LoRA Weights Already Know What They Can Do" (arXiv 2603.15990), with the
tokenization made independent of the base model (``encoders/tokenize.py``): the per-position
projectors of the paper become one shared projector over fixed-length random projections of
``u`` and ``v``, and the position's layer index becomes a normalized depth plus a module type.

    rank token   h_u = ReLU(LN(W_u u)), h_v = ReLU(LN(W_v v)), x = W_f [h_u; h_v]
                 FiLM from σ̃ = standardized log1p σ: x ← x ⊙ (1 + ε tanh γ) + ε β, ε starts at 0
                 token = GELU(LN(x))
    rank level   1 pre-LN Transformer layer (4 heads) over a module's rank tokens
    σ-pooling    4 learned queries, logits q·h/√H + 0.5 log1p σ → one token per module
    position     + depth and module-type embeddings, LN, 2 pre-LN Transformer layers
    pooling      attention pooling over modules → the embedding (hidden = 128)

The encoder only sees the canonical form, so it is GL(r)-invariant as far as the canonical
form is (to rounding, away from tied singular values).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from lorasearch.encoders.base import Encoder, l2_normalize, register
from lorasearch.encoders.tokenize import DEPTH_FEATURES, N_TYPES, PROJ_DIM, ModuleBatch, depth_features, scatter_positions, tokenize
from lorasearch.types import CanonicalAdapter


def _encoder_stack(hidden: int, heads: int, layers: int, dropout: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=4 * hidden, dropout=dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class RankTokenizer(nn.Module):
    """(u_i, v_i, σ_i) → one token per rank component, σ entering through a gated FiLM."""

    def __init__(self, proj_dim: int, hidden: int, dropout: float):
        super().__init__()
        self.u = nn.Sequential(nn.Linear(proj_dim, hidden), nn.LayerNorm(hidden), nn.ReLU())
        self.v = nn.Sequential(nn.Linear(proj_dim, hidden), nn.LayerNorm(hidden), nn.ReLU())
        self.fuse = nn.Linear(2 * hidden, hidden)
        self.film = nn.Sequential(nn.Linear(1, hidden), nn.GELU(), nn.Linear(hidden, 2 * hidden))
        self.eps = nn.Parameter(torch.zeros(()))  # the FiLM gate: tokens ignore σ at init
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout))

    def forward(self, u, v, sigma, mask):
        x = self.fuse(torch.cat([self.u(u), self.v(v)], dim=-1))
        ls = torch.log1p(sigma.clamp_min(0))
        n = mask.sum(-1, keepdim=True).clamp_min(1)
        mean = (ls * mask).sum(-1, keepdim=True) / n
        std = (((ls - mean) ** 2 * mask).sum(-1, keepdim=True) / n).sqrt()
        s_std = torch.where(mask, (ls - mean) / (std + 1e-6), torch.zeros_like(ls))
        gamma, beta = self.film(s_std[..., None]).chunk(2, dim=-1)
        x = x * (1 + self.eps * torch.tanh(gamma)) + self.eps * beta
        return self.out(x)


class SigmaPool(nn.Module):
    """Multi-query attention pooling over rank tokens with an additive log1p σ prior."""

    def __init__(self, hidden: int, queries: int = 4, prior: float = 0.5, dropout: float = 0.0):
        super().__init__()
        self.q = nn.Parameter(torch.randn(queries, hidden) * 0.02)
        self.prior = prior
        self.drop = nn.Dropout(dropout)
        self.out = nn.Sequential(nn.Linear(queries * hidden, hidden), nn.LayerNorm(hidden), nn.GELU())

    def forward(self, h, sigma, mask):                       # h [M, R, H]
        logits = torch.einsum("mrh,qh->mqr", h, self.q) / math.sqrt(h.shape[-1])
        logits = logits + self.prior * torch.log1p(sigma.clamp_min(0))[:, None, :]
        logits = logits.masked_fill(~mask[:, None, :], -1e9)
        w = self.drop(logits.softmax(-1))
        pooled = torch.einsum("mqr,mrh->mqh", w, h)
        return self.out(pooled.flatten(1))


class AttentionPool(nn.Module):
    """Softmax-weighted sum over positions, the score from a small MLP."""

    def __init__(self, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout),
                                   nn.Linear(hidden, 1, bias=False))

    def forward(self, x, mask):                               # x [B, P, H]
        s = self.score(x).squeeze(-1).masked_fill(~mask, -1e9)
        return torch.einsum("bp,bph->bh", s.softmax(-1), x)


class W2T(nn.Module):
    invariant_by_construction = False   # invariant through the canonical form, not by its layers

    def __init__(self, proj_dim: int = PROJ_DIM, hidden: int = 128, heads: int = 4, rank_layers: int = 1,
                 pos_layers: int = 2, pool_queries: int = 4, sigma_prior: float = 0.5, dropout: float = 0.0,
                 n_types: int = N_TYPES):
        super().__init__()
        self.config = dict(proj_dim=proj_dim, hidden=hidden, heads=heads, rank_layers=rank_layers,
                           pos_layers=pos_layers, pool_queries=pool_queries, sigma_prior=sigma_prior,
                           dropout=dropout, n_types=n_types)
        self.dim = hidden
        self.tokens = RankTokenizer(proj_dim, hidden, dropout)
        self.rank_encoder = _encoder_stack(hidden, heads, rank_layers, dropout)
        self.rank_pool = SigmaPool(hidden, pool_queries, sigma_prior, dropout)
        self.depth_embed = nn.Linear(DEPTH_FEATURES, hidden)
        self.type_embed = nn.Embedding(n_types, hidden)
        self.pos_norm = nn.LayerNorm(hidden)
        self.pos_encoder = _encoder_stack(hidden, heads, pos_layers, dropout)
        self.pool = AttentionPool(hidden, dropout)

    def forward(self, b: ModuleBatch) -> torch.Tensor:
        """``ModuleBatch`` → ``[n_adapters, hidden]`` embeddings (not normalized)."""
        x = self.tokens(b.u, b.v, b.sigma, b.rank_mask)
        x = self.rank_encoder(x, src_key_padding_mask=~b.rank_mask)
        t = self.rank_pool(x, b.sigma, b.rank_mask)                       # [M, H]
        t = self.pos_norm(t + self.depth_embed(depth_features(b.depth)) + self.type_embed(b.type_id))
        seq, mask = scatter_positions(t, b)
        seq = self.pos_encoder(seq, src_key_padding_mask=~mask)
        return self.pool(seq, mask)


class LearnedEncoder(Encoder):
    """An ``Encoder`` around a trained torch model read from a checkpoint folder."""

    batch_size = 32

    def __init__(self, model: nn.Module, path: str | None = None, device: str = "auto", version: str = "1"):
        from lorasearch.encoders.checkpoint import resolve_device

        self.model = model.eval()
        self.path = path
        self.device = resolve_device(device)
        self.model.to(self.device)
        self.dim = int(model.dim)
        self.version = version
        self.proj_dim = int(model.config["proj_dim"])

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.path}" if self.path else self.name

    @torch.no_grad()
    def features(self, adapters: list[CanonicalAdapter]) -> np.ndarray:
        """The raw (unnormalized) embeddings, e.g. for a classification probe."""
        out = np.zeros((len(adapters), self.dim), np.float32)
        for i in range(0, len(adapters), self.batch_size):
            chunk = adapters[i:i + self.batch_size]
            out[i:i + len(chunk)] = self.model(tokenize(chunk, self.proj_dim).to(self.device)).float().cpu().numpy()
        return out

    def encode(self, adapters: list[CanonicalAdapter]) -> np.ndarray:
        if not adapters:
            return np.zeros((0, self.dim), np.float32)
        return l2_normalize(self.features(adapters))


class W2TEncoder(LearnedEncoder):
    name = "w2t"


@register("w2t")
def _factory(arg: str | None, device: str = "auto") -> Encoder:
    from lorasearch.encoders.checkpoint import load_encoder

    return load_encoder("w2t", arg, device=device)
