"""Training augmentations: changes to an adapter's *factors* that leave (almost) its ΔW alone.

An encoder that is not invariant by construction (W2T relies on the canonical form; the
raw-factor baselines on nothing) should learn to ignore them:

    gl_reparam       B → B R, A → R⁻¹ A with R = Q₁ diag(e^{s·n}) Q₂ (random orthogonal Q, log-normal
                     spread s): ΔW is unchanged; s sets how ill-conditioned R is
    pad_rank         B → [B, 0], A → [A; random rows]: ΔW unchanged, rank grows (σ = 0 components)
    round_precision  factors rounded to fp16 or bf16, as a re-saved file would be
    flip_signs       (u_i, v_i) → (−u_i, −v_i) on tokens: the sign rule's tie cases

``augment_canonical`` applies a random mix and re-canonicalizes, so the encoder sees exactly
what the canonicalizer makes of such a file.
"""
from __future__ import annotations

import numpy as np
import torch

from lorasearch.types import CanonicalAdapter, LoraAdapter, LoraModule


def gl_matrix(r: int, strength: float, rng: np.random.Generator) -> np.ndarray:
    """A random invertible r×r matrix whose log singular values have spread ``strength``."""
    q1, _ = np.linalg.qr(rng.standard_normal((r, r)))
    q2, _ = np.linalg.qr(rng.standard_normal((r, r)))
    return (q1 * np.exp(strength * rng.standard_normal(r))) @ q2


def gl_reparam(B: np.ndarray, A: np.ndarray, strength: float, rng: np.random.Generator):
    R = gl_matrix(A.shape[0], strength, rng)
    return (B.astype(np.float64) @ R).astype(np.float32), np.linalg.solve(R, A.astype(np.float64)).astype(np.float32)


def pad_rank(B: np.ndarray, A: np.ndarray, extra: int, rng: np.random.Generator):
    if extra <= 0:
        return B, A
    rows = rng.standard_normal((extra, A.shape[1])).astype(np.float32) * np.float32(A.std() + 1e-8)
    return np.concatenate([B, np.zeros((B.shape[0], extra), np.float32)], 1), np.concatenate([A, rows], 0)


def round_precision(x: np.ndarray, dtype: str) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    return t.to(torch.float16 if dtype == "float16" else torch.bfloat16).float().numpy()


def factors_of(ca: CanonicalAdapter) -> LoraAdapter:
    """The raw adapter when kept, else factors rebuilt from the canonical form (B = Uσ, A = Vᵀ)."""
    if ca.raw is not None:
        return ca.raw
    mods = [LoraModule(m.name, np.ascontiguousarray(m.V.T), m.U * m.sigma[None, :], 1.0, shape=m.shape)
            for m in ca.modules]
    return LoraAdapter(path="", format="memory", sha256="", family=ca.family, modules=mods)


def augment_canonical(adapters: list[CanonicalAdapter], rng: np.random.Generator, p: float = 0.5,
                      gl: bool = True, gl_strength: float = 1.0, pad: bool = True, max_pad: int = 4,
                      precision: bool = True, max_rank: int = 128) -> list[CanonicalAdapter]:
    """Each adapter is augmented with probability ``p`` (a random subset of the transforms)."""
    from lorasearch.canonical import canonicalize_many

    out: list[CanonicalAdapter | None] = list(adapters)
    todo, idx = [], []
    for k, ca in enumerate(adapters):
        if rng.random() >= p:
            continue
        raw = factors_of(ca)
        use_gl, use_pad = gl and rng.random() < 0.5, pad and rng.random() < 0.5
        dtype = rng.choice(["float16", "bfloat16"]) if precision and rng.random() < 0.5 else None
        mods = []
        for m in raw.modules:
            B, A = m.B.reshape(m.B.shape[0], m.rank) * np.float32(m.scale), m.A.reshape(m.rank, -1)
            if use_gl:
                B, A = gl_reparam(B, A, gl_strength * rng.random(), rng)
            if use_pad:
                B, A = pad_rank(B, A, int(rng.integers(1, max_pad + 1)) if m.rank + 1 <= max_rank else 0, rng)
                B, A = B[:, :max_rank], A[:max_rank]
            if dtype:
                B, A = round_precision(B, dtype), round_precision(A, dtype)
            mods.append(LoraModule(m.name, A, B, 1.0, shape=m.shape))
        todo.append(LoraAdapter(path=raw.path, format="memory", sha256="", family=raw.family, modules=mods))
        idx.append(k)
    if todo:
        for k, ca in zip(idx, canonicalize_many(todo, device="cpu")):
            out[k] = ca
    return out  # type: ignore[return-value]


def flip_signs(u: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, generator: torch.Generator, p: float = 0.5):
    """Flip the sign of random (u_i, v_i) pairs together (σ and ΔW unchanged)."""
    s = torch.where(torch.rand(mask.shape, generator=generator) < p, -1.0, 1.0).to(u.device)[..., None]
    return u * s, v * s
