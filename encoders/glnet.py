"""GL-net: a GL(r)-equivariant network on LoRA factors with an invariant head.

After "Learning on LoRAs: GL-Equivariant Processing of Low-Rank Weight Spaces" (Putterman,
Lim et al., arXiv 2410.04207). For a module with ΔW = U Vᵀ the pair (U R, V R⁻ᵀ) is the same
update for every invertible R, so learnable maps act on the *left* only:

    equivariant linear   U′ = W1 U,  V′ = W2 V           (no bias, no U↔V mixing)
    nonlinearity         P = U′V′ᵀ; keep row i of U′ iff (P·1)_i > 0, row j of V′ iff (1ᵀP)_j > 0
    (more layers)        U″ = Wu U′, V″ = Wv V′, gate again
    invariant head       P = U″V″ᵀ (h×h) per module → flattened → MLP

Every step is equivariant, and P is invariant, so the embedding is GL(r)-invariant by
construction, one R per module. Width and module-count independence (a deviation from the
paper, whose W1_ℓ is h×n_ℓ per layer ℓ): U and V enter through the same fixed random
projection of each width as W2T (``tokenize.py``; a left multiplication, so equivariance
holds), W1/W2 are chosen by module *type* instead of by layer index, and the per-module
invariant features are pooled by attention with a depth and type embedding instead of
being concatenated in a fixed layer order. P is fed as its direction plus its log norm,
so that adapters whose ΔW differ by orders of magnitude in scale stay in the LayerNorm's
working range.

The input is built from the canonical form as U = U_c diag(√σ), V = V_c diag(√σ) (so
UVᵀ = ΔW); the network never relies on that choice.
"""
from __future__ import annotations

import torch
from torch import nn

from lorasearch.encoders.base import Encoder, register
from lorasearch.encoders.tokenize import DEPTH_FEATURES, N_TYPES, PROJ_DIM, ModuleBatch, depth_features, scatter_positions
from lorasearch.encoders.w2t import AttentionPool, LearnedEncoder


def gl_gate(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The equivariant nonlinearity: zero the rows of U (V) whose row (column) sum of UVᵀ is ≤ 0.

    Computed without forming P: P·1 = U (Vᵀ 1) and 1ᵀP = (1ᵀ U) Vᵀ, with U ``[M, h, r]``.
    """
    row = U @ V.sum(1)[..., None]                 # [M, h, 1]
    col = V @ U.sum(1)[..., None]                 # [M, h, 1]
    return U * (row > 0), V * (col > 0)


class GLNet(nn.Module):
    invariant_by_construction = True

    def __init__(self, proj_dim: int = PROJ_DIM, equiv_dim: int = 16, n_layers: int = 1, hidden: int = 128,
                 inv_dim: int = 128, n_types: int = N_TYPES, dropout: float = 0.0):
        super().__init__()
        self.config = dict(proj_dim=proj_dim, equiv_dim=equiv_dim, n_layers=n_layers, hidden=hidden,
                           inv_dim=inv_dim, n_types=n_types, dropout=dropout)
        self.dim = hidden
        h = equiv_dim
        self.W1 = nn.Parameter(torch.randn(n_types, h, proj_dim) / proj_dim ** 0.5)
        self.W2 = nn.Parameter(torch.randn(n_types, h, proj_dim) / proj_dim ** 0.5)
        self.Wu = nn.ParameterList([nn.Parameter(torch.randn(n_types, h, h) / h ** 0.5) for _ in range(n_layers - 1)])
        self.Wv = nn.ParameterList([nn.Parameter(torch.randn(n_types, h, h) / h ** 0.5) for _ in range(n_layers - 1)])
        self.inv = nn.Sequential(nn.Linear(h * h + 1, inv_dim), nn.LayerNorm(inv_dim), nn.ReLU(), nn.Dropout(dropout))
        self.depth_embed = nn.Linear(DEPTH_FEATURES, inv_dim)
        self.type_embed = nn.Embedding(n_types, inv_dim)
        self.pool = AttentionPool(inv_dim, dropout)
        self.out = nn.Sequential(nn.Linear(inv_dim, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, hidden))

    def invariant_features(self, U: torch.Tensor, V: torch.Tensor, type_id: torch.Tensor) -> torch.Tensor:
        """Factors ``U, V [M, proj_dim, r]`` → ``[M, h²+1]`` GL(r)-invariant features per module."""
        U, V = gl_gate(self.W1[type_id] @ U, self.W2[type_id] @ V)
        for Wu, Wv in zip(self.Wu, self.Wv):
            U, V = gl_gate(Wu[type_id] @ U, Wv[type_id] @ V)
        P = (U @ V.transpose(1, 2)).flatten(1)                          # [M, h*h]
        norm = P.norm(dim=1, keepdim=True)
        return torch.cat([P / (norm + 1e-12), torch.log(norm + 1e-12)], dim=1)

    def forward(self, b: ModuleBatch) -> torch.Tensor:
        root = b.sigma.clamp_min(0).sqrt()[..., None]                    # [M, R, 1]
        U = (b.u * root).transpose(1, 2)                                 # [M, proj_dim, R]
        V = (b.v * root).transpose(1, 2)
        t = self.inv(self.invariant_features(U, V, b.type_id))
        t = t + self.depth_embed(depth_features(b.depth)) + self.type_embed(b.type_id)
        seq, mask = scatter_positions(t, b)
        return self.out(self.pool(seq, mask))


class GLNetEncoder(LearnedEncoder):
    name = "glnet"


@register("glnet")
def _factory(arg: str | None, device: str = "auto") -> Encoder:
    from lorasearch.encoders.checkpoint import load_encoder

    return load_encoder("glnet", arg, device=device)
