"""Turn canonical adapters into tensors the learned encoders read, whatever the base model.

The W2T paper gives every module ("position") its own projector sized to that module's
widths, so a checkpoint only fits one base model. Here the tokenization is made
independent of the base model's widths and module count, so that one checkpoint embeds
adapters of several families:

* **Widths.** A singular vector of length ``w`` (``u`` has the module's out-width, ``v`` its
  in-width) is mapped to a fixed length ``proj_dim`` by a fixed Gaussian matrix seeded by
  ``w`` alone (entries N(0, 1/proj_dim)). A random projection keeps inner products and
  norms between vectors of the same width (Johnson–Lindenstrauss), needs no fitting and
  no table of known widths, and is a *left* multiplication, so it commutes with the
  GL(r) action on the right (GL-net stays equivariant). Resampling/binning the coordinates
  instead would mix neighbouring neurons, which have no spatial order in a weight matrix.
* **Module count.** A module becomes one position with a *normalized depth* in [0, 1]
  (its block's index among the adapter's blocks, natural sort of the names) and a *module
  type* from a small vocabulary of projection names (self/cross attention q/k/v/o, MLP in/
  gate/out, proj_in/out, conv …); an unknown projection name falls in one of a few hashed
  buckets. Positions are a set with a mask, so any number of modules fits.
* **Ranks.** Ranks 1…128 (or more) share one batch by zero padding plus a mask. Components
  with σ ≤ 1e-5·σ_max are dropped: they add nothing to ΔW and their directions are arbitrary
  (a rank-deficient or zero-padded factor), so the tokens depend on ΔW alone.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from lorasearch.types import CanonicalAdapter

PROJ_DIM = 256
SIGMA_RTOL = 1e-5
DEPTH_FEATURES = 9  # depth itself plus sin/cos at 4 frequencies

# The fixed vocabulary of module types. Index 0 is reserved for "unknown, no bucket".
TYPE_VOCAB = [
    "<unk>",
    "self.q", "self.k", "self.v", "self.o",
    "cross.q", "cross.k", "cross.v", "cross.o",
    "mlp.in", "mlp.gate", "mlp.out",
    "proj_in", "proj_out", "conv", "time_emb", "embed", "head",
]
N_HASH_BUCKETS = 8
N_TYPES = len(TYPE_VOCAB) + N_HASH_BUCKETS

_PROJ_WORDS = {
    "q": {"to_q", "q_proj", "query", "q", "wq", "q_lin"},
    "k": {"to_k", "k_proj", "key", "k", "wk", "k_lin"},
    "v": {"to_v", "v_proj", "value", "v", "wv", "v_lin"},
    "o": {"to_out", "o_proj", "out_proj", "o", "wo", "out_lin", "c_proj_attn"},
}
_CROSS_WORDS = {"attn2", "crossattention", "encoder_attn", "cross_attn", "cross_attention"}
_CONTAINERS = {"layer", "h", "block", "mid_block"}


@lru_cache(maxsize=64)
def width_projection(width: int, dim: int = PROJ_DIM) -> np.ndarray:
    """The fixed ``[width, dim]`` Gaussian map for vectors of length ``width`` (seeded by width)."""
    rng = np.random.default_rng(zlib.crc32(f"lorasearch-width-projection:{width}:{dim}".encode()))
    return (rng.standard_normal((width, dim)) / np.sqrt(dim)).astype(np.float32)


def module_type(name: str) -> str:
    """The projection kind of a module path, e.g. ``...attn2.to_v`` → ``cross.v``."""
    parts = [p for p in name.lower().split(".") if p]
    words = [p for p in parts if not p.isdigit()]
    if not words:
        return "<unk>"
    leaf = words[-1]
    cross = any(w in _CROSS_WORDS for w in words)
    for kind, names in _PROJ_WORDS.items():
        if leaf in names:
            return f"{'cross' if cross else 'self'}.{kind}"
    joined = ".".join(parts)
    if "attention.output.dense" in joined or ("attn" in joined and leaf in {"dense", "c_proj", "proj"}):
        return f"{'cross' if cross else 'self'}.o"
    if leaf in {"gate_proj", "w1_gate", "gate"}:
        return "mlp.gate"
    if leaf in {"up_proj", "fc1", "c_fc", "w1", "wi", "lin1"} or "intermediate" in words or \
            (leaf == "proj" and "ff" in words) or ("ff" in words and "net" in words and parts[-1] == "0"):
        return "mlp.in"
    if leaf in {"down_proj", "fc2", "w2", "lin2"} or (leaf == "dense" and "output" in words) or \
            ("ff" in words and "net" in words) or (leaf == "c_proj" and "mlp" in words):
        return "mlp.out"
    if leaf in {"proj_in", "proj_out"}:
        return leaf
    if leaf.startswith("conv") or leaf in {"conv_shortcut", "conv_in", "conv_out"}:
        return "conv"
    if "time_emb" in leaf or leaf.startswith("linear_") and "time" in joined:
        return "time_emb"
    if "embed" in leaf:
        return "embed"
    if leaf in {"classifier", "lm_head", "score", "pooler"}:
        return "head"
    return f"hash:{zlib.crc32(leaf.encode()) % N_HASH_BUCKETS}"


def type_id(name: str) -> int:
    t = module_type(name)
    if t.startswith("hash:"):
        return len(TYPE_VOCAB) + int(t[5:])
    return TYPE_VOCAB.index(t) if t in TYPE_VOCAB else 0


def block_of(name: str) -> str:
    """The block a module belongs to: its path cut after the last ``<container>.<index>``
    (``...transformer_blocks.0.attn1.to_q`` → ``...transformer_blocks.0``)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prev = parts[i - 1].lower()
        if parts[i].isdigit() and (prev.endswith("s") or prev in _CONTAINERS):
            return ".".join(parts[: i + 1])
    return ""


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def module_depths(names: list[str]) -> list[float]:
    """Normalized depth in [0, 1] of each module: its block's rank among the adapter's blocks."""
    blocks = sorted({block_of(n) for n in names}, key=_natural_key)
    pos = {b: i for i, b in enumerate(blocks)}
    denom = max(1, len(blocks) - 1)
    return [pos[block_of(n)] / denom for n in names]


def depth_features(depth: torch.Tensor) -> torch.Tensor:
    """``[...]`` depths in [0, 1] → ``[..., 9]`` (the depth and sin/cos at 4 octaves)."""
    freqs = torch.pi * torch.tensor([1.0, 2.0, 4.0, 8.0], device=depth.device, dtype=depth.dtype)
    ang = depth[..., None] * freqs
    return torch.cat([depth[..., None], torch.sin(ang), torch.cos(ang)], dim=-1)


@dataclass
class ModuleBatch:
    """All modules of a batch of adapters, flattened: module m belongs to adapter ``owner[m]``.

    u, v   ``[M, R, proj_dim]`` projected left/right singular vectors (rows are rank components)
    sigma  ``[M, R]`` singular values (scale folded in); 0 in padding
    rank_mask ``[M, R]`` True for real rank components
    depth  ``[M]`` normalized depth;  type_id ``[M]`` module-type index
    owner  ``[M]`` adapter index; slot ``[M]`` the module's place among its adapter's modules
    """

    u: torch.Tensor
    v: torch.Tensor
    sigma: torch.Tensor
    rank_mask: torch.Tensor
    depth: torch.Tensor
    type_id: torch.Tensor
    owner: torch.Tensor
    slot: torch.Tensor
    n_adapters: int
    n_slots: int

    def to(self, device) -> "ModuleBatch":
        kw = {k: (getattr(self, k).to(device) if isinstance(getattr(self, k), torch.Tensor) else getattr(self, k))
              for k in self.__dataclass_fields__}
        return ModuleBatch(**kw)


def _kept(sigma: np.ndarray) -> np.ndarray:
    """Indices of the components that carry ΔW (at least the first, so a zero module stays a token)."""
    k = np.flatnonzero(sigma > SIGMA_RTOL * float(sigma.max(initial=0.0)))
    return k if len(k) else np.zeros(1, dtype=np.int64)


def tokenize(adapters: list[CanonicalAdapter], proj_dim: int = PROJ_DIM) -> ModuleBatch:
    """Batch canonical adapters into padded, width-independent tensors (see the module doc)."""
    if not adapters:
        raise ValueError("tokenize needs at least one adapter")
    mods, owners, slots, depths, types = [], [], [], [], []
    for a_idx, ad in enumerate(adapters):
        if not ad.modules:
            raise ValueError(f"adapter {a_idx} has no modules")
        names = [m.name for m in ad.modules]
        for s, (m, d) in enumerate(zip(ad.modules, module_depths(names))):
            mods.append(m)
            owners.append(a_idx)
            slots.append(s)
            depths.append(d)
            types.append(type_id(m.name))
    keep = [_kept(np.asarray(m.sigma, np.float32)) for m in mods]
    R = max(len(k) for k in keep)
    M = len(mods)
    u = torch.zeros((M, R, proj_dim))
    v = torch.zeros((M, R, proj_dim))
    sig = torch.zeros((M, R))
    mask = torch.zeros((M, R), dtype=torch.bool)
    for i, (m, k) in enumerate(zip(mods, keep)):   # torch matmul: it honours torch's thread setting, numpy's does not
        r, n = m.rank, len(k)
        U = torch.from_numpy(np.ascontiguousarray(np.asarray(m.U, np.float32).reshape(-1, r)[:, k]))
        V = torch.from_numpy(np.ascontiguousarray(np.asarray(m.V, np.float32).reshape(-1, r)[:, k]))
        u[i, :n] = U.T @ torch.from_numpy(width_projection(U.shape[0], proj_dim))
        v[i, :n] = V.T @ torch.from_numpy(width_projection(V.shape[0], proj_dim))
        sig[i, :n] = torch.from_numpy(np.asarray(m.sigma, np.float32)[k])
        mask[i, :n] = True
    return ModuleBatch(
        u=u, v=v, sigma=sig, rank_mask=mask, depth=torch.tensor(depths, dtype=torch.float32),
        type_id=torch.tensor(types, dtype=torch.long), owner=torch.tensor(owners, dtype=torch.long),
        slot=torch.tensor(slots, dtype=torch.long), n_adapters=len(adapters), n_slots=max(slots) + 1,
    )


def scatter_positions(x: torch.Tensor, batch: ModuleBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``[M, H]`` per-module vectors → ``[B, P, H]`` per-adapter sequences and a ``[B, P]`` mask."""
    out = x.new_zeros(batch.n_adapters, batch.n_slots, x.shape[-1])
    out[batch.owner, batch.slot] = x
    mask = torch.zeros(batch.n_adapters, batch.n_slots, dtype=torch.bool, device=x.device)
    mask[batch.owner, batch.slot] = True
    return out, mask
