"""Exact Gram matrix of Frobenius inner products ⟨ΔWᵢ, ΔWⱼ⟩ between adapters, from their factors.

For one module with ΔWᵢ = sᵢ·Bᵢ·Aᵢ (raw) or Uᵢ·diag σᵢ·Vᵢᵀ (canonical), i.e. ΔW = L·Rᵀ with
L = s·B, R = Aᵀ:

    ⟨ΔWᵢ, ΔWⱼ⟩_F = Σ (LᵢᵀLⱼ) ⊙ (RᵢᵀRⱼ) = sᵢsⱼ·Σ((BᵢᵀBⱼ) ⊙ (AᵢAⱼᵀ))        O(rᵢrⱼ(out+in))

Per module the factors of every adapter that has it are stacked side by side, so one GEMM per
side gives all pairs at once; the [Σr, Σr] block result is summed back per adapter. Dense ΔW is
never formed. Modules are keyed by (name, out, in): a same-named weight of another shape (e.g.
GQA ``v_proj`` of two bases sharing a family name) is another weight and contributes 0, exactly
like a module only one adapter has. numpy only, float64 accumulation.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lorasearch.similarity import factors


def module_factors(adapter) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
    """(name, out, in) -> (L ``[out, k]``, R ``[in, k]``) float64 with ΔW = L·Rᵀ (``similarity.factors``),
    rank-0 modules left out."""
    return {key: (L, R) for key, (L, R) in factors(adapter).items() if L.shape[1]}


def gram(adapters: Sequence, factors: Sequence[dict] | None = None) -> np.ndarray:
    """``G[i, j] = ⟨ΔWᵢ, ΔWⱼ⟩_F`` summed over modules, float64 ``[n, n]``, symmetric.

    ``factors``: the adapters' :func:`module_factors` if already computed."""
    fs = list(factors) if factors is not None else [module_factors(a) for a in adapters]
    n = len(fs)
    G = np.zeros((n, n), np.float64)
    by_key: dict[tuple, list[int]] = {}
    for i, f in enumerate(fs):
        for key in f:
            by_key.setdefault(key, []).append(i)
    for key, members in by_key.items():
        Ls = [fs[i][key][0] for i in members]
        Rs = [fs[i][key][1] for i in members]
        L = np.concatenate(Ls, axis=1)
        R = np.concatenate(Rs, axis=1)
        block = (L.T @ L) * (R.T @ R)                              # [Σk, Σk]
        starts = np.cumsum([0] + [x.shape[1] for x in Ls[:-1]])
        summed = np.add.reduceat(np.add.reduceat(block, starts, axis=0), starts, axis=1)
        G[np.ix_(members, members)] += summed
    return (G + G.T) / 2


def cross(query, others: Sequence, query_factors: dict | None = None,
          other_factors: Sequence[dict] | None = None) -> np.ndarray:
    """``[⟨ΔW_query, ΔW_j⟩_F for j in others]`` float64: one GEMM per module and side."""
    qf = query_factors if query_factors is not None else module_factors(query)
    ofs = list(other_factors) if other_factors is not None else [module_factors(o) for o in others]
    dots = np.zeros(len(ofs), np.float64)
    by_key: dict[tuple, list[int]] = {}
    for j, f in enumerate(ofs):
        for key in f:
            if key in qf:
                by_key.setdefault(key, []).append(j)
    for key, members in by_key.items():
        Lq, Rq = qf[key]
        Ls = [ofs[j][key][0] for j in members]
        L = np.concatenate(Ls, axis=1)
        R = np.concatenate([ofs[j][key][1] for j in members], axis=1)
        col = np.sum((Lq.T @ L) * (Rq.T @ R), axis=0)             # [Σk]
        starts = np.cumsum([0] + [x.shape[1] for x in Ls[:-1]])
        dots[members] += np.add.reduceat(col, starts)
    return dots


def sq_norm(adapter=None, factors: dict | None = None) -> float:
    """‖ΔW‖²_F over all modules."""
    f = factors if factors is not None else module_factors(adapter)
    return float(sum(max(0.0, float(np.sum((L.T @ L) * (R.T @ R)))) for L, R in f.values()))
