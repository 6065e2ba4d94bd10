"""Exact similarity of LoRA updates from their factors, never forming ΔW (DESIGN decision 3).

For ΔW₁ = L₁R₁ᵀ and ΔW₂ = L₂R₂ᵀ (raw: L = scale·B, R = Aᵀ; canonical: L = U·diag σ, R = V):

    ⟨ΔW₁, ΔW₂⟩_F = tr(R₁L₁ᵀL₂R₂ᵀ) = Σ_ij (L₁ᵀL₂)_ij (R₁ᵀR₂)_ij        O(r₁r₂(out+in))

summed over modules matched by name. A module present in only one adapter has ΔW = 0 in the
other: it adds nothing to the inner product and its full norm to that adapter's norm.
Both ``LoraAdapter`` and ``CanonicalAdapter`` (and a mix) are accepted.

Also the RawCos baseline of the W2T paper: cosine of the flattened raw factors as stored, which
is *not* invariant to B→BG, A→G⁻¹A and exists to show why raw factors are the wrong thing to compare.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence, Union

import numpy as np

from lorasearch.errors import IncompatibleError
from lorasearch.types import CanonicalAdapter, CanonicalModule, LoraAdapter

AnyAdapter = Union[LoraAdapter, CanonicalAdapter]

# Bound on the [q, g, k, l] Gram blocks held at once in pairwise_dense_cosine (elements).
_MAX_BLOCK = 1 << 24


def factors(adapter: AnyAdapter) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
    """(name, out, in) -> (L ``[out, k]``, R ``[in, k]``) in float64 with ΔW = L Rᵀ.

    Keyed by shape as well as name: bases that share a family name (e.g. Llama-2-7B and
    Llama-3-8B are both ``llama-h4096``) can name a weight alike with another shape (GQA
    ``v_proj``); such weights are different weights, so they add 0 to an inner product and
    count only in their own adapter's norm, exactly like a module the other adapter lacks."""
    out = {}
    for m in adapter.modules:
        if isinstance(m, CanonicalModule):
            L = np.asarray(m.U, np.float64) * np.asarray(m.sigma, np.float64)
            R = np.asarray(m.V, np.float64)
        else:
            L = float(m.scale) * np.asarray(m.B, np.float64)
            R = np.asarray(m.A, np.float64).T
        out[(m.name, L.shape[0], R.shape[0])] = (L, R)
    return out


def _pair_inner(f1, f2) -> float:
    (L1, R1), (L2, R2) = f1, f2
    return float(np.sum((L1.T @ L2) * (R1.T @ R2)))


def _sq_norm(f) -> float:
    L, R = f
    return max(0.0, float(np.sum((L.T @ L) * (R.T @ R))))


def delta_inner(a: AnyAdapter, b: AnyAdapter) -> float:
    """Frobenius inner product Σ_modules ⟨ΔW₁ₘ, ΔW₂ₘ⟩ (modules in only one adapter add 0)."""
    fa, fb = factors(a), factors(b)
    return sum(_pair_inner(fa[n], fb[n]) for n in fa.keys() & fb.keys())


def delta_norm(a: AnyAdapter) -> float:
    """‖ΔW‖_F over all modules of the adapter."""
    return float(np.sqrt(sum(_sq_norm(f) for f in factors(a).values())))


def delta_cosine(a: AnyAdapter, b: AnyAdapter) -> float:
    """Cosine of the whole-adapter ΔW (0 when either update is zero)."""
    fa, fb = factors(a), factors(b)
    na = np.sqrt(sum(_sq_norm(f) for f in fa.values()))
    nb = np.sqrt(sum(_sq_norm(f) for f in fb.values()))
    if na == 0 or nb == 0:
        return 0.0
    ip = sum(_pair_inner(fa[n], fb[n]) for n in fa.keys() & fb.keys())
    return float(np.clip(ip / (na * nb), -1.0, 1.0))


def relative_difference(a: AnyAdapter, b: AnyAdapter) -> float:
    """‖ΔW₁ − ΔW₂‖_F / ‖ΔW₁‖_F, accurate even when the two are nearly equal.

    Per module ΔW₁ − ΔW₂ = [L₁, −L₂][R₁, R₂]ᵀ; with thin QRs of both stacks its norm is that of
    the small product R_L R_Rᵀ, which avoids the cancellation of ‖a‖² + ‖b‖² − 2⟨a, b⟩.
    """
    fa, fb = factors(a), factors(b)
    diff2 = 0.0
    for n in fa.keys() | fb.keys():
        if n not in fb:
            diff2 += _sq_norm(fa[n])
        elif n not in fa:
            diff2 += _sq_norm(fb[n])
        else:
            L = np.concatenate([fa[n][0], -fb[n][0]], axis=1)
            R = np.concatenate([fa[n][1], fb[n][1]], axis=1)
            diff2 += float(np.sum((np.linalg.qr(L, mode="r") @ np.linalg.qr(R, mode="r").T) ** 2))
    na = np.sqrt(sum(_sq_norm(f) for f in fa.values()))
    if na == 0:
        return 0.0 if diff2 == 0 else float("inf")
    return float(np.sqrt(diff2) / na)


def _stack_module(facts: list[dict], name: str, dt):
    """Indices of the adapters having module ``name`` and their zero-padded (L, R) stacks."""
    idx = [i for i, f in enumerate(facts) if name in f]
    if not idx:
        return idx, None, None
    k = max(facts[i][name][0].shape[1] for i in idx)
    o, n_in = facts[idx[0]][name][0].shape[0], facts[idx[0]][name][1].shape[0]
    L = np.zeros((len(idx), o, k))
    R = np.zeros((len(idx), n_in, k))
    for j, i in enumerate(idx):
        Li, Ri = facts[i][name]
        L[j, :, :Li.shape[1]] = Li   # zero columns add nothing: padding to a common rank is exact
        R[j, :, :Ri.shape[1]] = Ri
    return idx, L.astype(dt, copy=False), R.astype(dt, copy=False)


def pairwise_dense_cosine(queries: Sequence[AnyAdapter], gallery: Sequence[AnyAdapter],
                          device="auto", dtype=np.float64) -> np.ndarray:
    """Exact dense cosine ``[nq, ng]`` of ΔW between every query and gallery adapter.

    The reference method benchmarks print beside an encoder. Per module, all adapters' factors
    are stacked (padded to a common rank) so the Grams L_qᵀL_g and R_qᵀR_g are a few large matmuls.
    numpy only (``device`` is accepted for compatibility and ignored; ``dtype`` may be a numpy
    dtype or a torch float dtype such as ``torch.float32``).
    """
    dtype = np.dtype(str(dtype).replace("torch.", "")) if str(dtype).startswith("torch.") else np.dtype(dtype)
    fq = [factors(a) for a in queries]
    fg = [factors(a) for a in gallery]
    nq = np.sqrt([sum(_sq_norm(f) for f in d.values()) for d in fq])
    ng = np.sqrt([sum(_sq_norm(f) for f in d.values()) for d in fg])
    dots = np.zeros((len(fq), len(fg)), dtype=np.float64)
    names = set().union(*[d.keys() for d in fq]) & set().union(*[d.keys() for d in fg]) if fq and fg else set()
    for name in sorted(names, key=str):
        qi, Lq, Rq = _stack_module(fq, name, dtype)
        gi, Lg, Rg = _stack_module(fg, name, dtype)
        if not qi or not gi:
            continue
        kq, kg = Lq.shape[2], Lg.shape[2]
        gidx = np.asarray(gi)
        step = max(1, _MAX_BLOCK // max(1, len(gi) * kq * kg))
        # Gram blocks as two GEMMs: [a·k, o] @ [o, b·l] -> [a, k, b, l]
        LgF = Lg.transpose(1, 0, 2).reshape(Lg.shape[1], -1)
        RgF = Rg.transpose(1, 0, 2).reshape(Rg.shape[1], -1)
        for s in range(0, len(qi), step):
            lq, rq = Lq[s:s + step], Rq[s:s + step]
            a = lq.shape[0]
            GL = (lq.transpose(0, 2, 1).reshape(a * kq, -1) @ LgF).reshape(a, kq, len(gi), kg)
            GR = (rq.transpose(0, 2, 1).reshape(a * kq, -1) @ RgF).reshape(a, kq, len(gi), kg)
            rows = np.asarray(qi[s:s + step])
            dots[rows[:, None], gidx[None, :]] += np.einsum("akbl,akbl->ab", GL, GR, dtype=np.float64)
    denom = np.outer(nq, ng)
    d = dots
    return np.clip(np.divide(d, denom, out=np.zeros_like(d), where=denom > 0), -1.0, 1.0)


def _raw_vectors(adapter: AnyAdapter) -> dict[tuple, np.ndarray]:
    """(module, factor, shape) -> the factor flattened as stored (scale not applied)."""
    raw = adapter.raw if isinstance(adapter, CanonicalAdapter) else adapter
    if raw is None:
        raise IncompatibleError("RawCos needs the raw factors, but this canonical adapter has no .raw")
    out = {}
    for m in raw.modules:
        out[(m.name, "A", tuple(m.A.shape))] = np.asarray(m.A, np.float64).ravel()
        out[(m.name, "B", tuple(m.B.shape))] = np.asarray(m.B, np.float64).ravel()
    return out


def pairwise_rawcos(queries: Sequence[AnyAdapter], gallery: Sequence[AnyAdapter]) -> np.ndarray:
    """RawCos (W2T baseline): cosine of all raw factors A and B, flattened and concatenated.

    Factors whose (module, shape) differ between two adapters (e.g. different ranks) add 0 to
    the dot product but count in the norms. Not invariant under B→BG, A→G⁻¹A by design.
    """
    vq = [_raw_vectors(a) for a in queries]
    vg = [_raw_vectors(a) for a in gallery]
    nq = np.sqrt([sum(float(x @ x) for x in d.values()) for d in vq])
    ng = np.sqrt([sum(float(x @ x) for x in d.values()) for d in vg])
    dots = np.zeros((len(vq), len(vg)))
    where_q, where_g = defaultdict(list), defaultdict(list)
    for i, d in enumerate(vq):
        for key in d:
            where_q[key].append(i)
    for i, d in enumerate(vg):
        for key in d:
            where_g[key].append(i)
    for key in where_q.keys() & where_g.keys():
        qi, gi = where_q[key], where_g[key]
        Xq = np.stack([vq[i][key] for i in qi])
        Xg = np.stack([vg[i][key] for i in gi])
        dots[np.ix_(qi, gi)] += Xq @ Xg.T
    denom = np.outer(nq, ng)
    return np.clip(np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0), -1.0, 1.0)


# ---- query re-ranking (moved here from api.py; numpy only) -------------------------------------
def exact_cosines(query, others: list, norms: list) -> tuple[float, np.ndarray, np.ndarray]:
    """Exact Frobenius cosines of ΔW between one canonical query and many raw adapters.

    Returns (‖ΔW_query‖, cosines, ‖ΔW_other‖). ``norms`` may hold the others' norms from the
    catalog (``None`` where unknown). Why not ``delta_cosine`` per candidate: for an SD adapter
    (264 modules) that is 3 small float64 matmul pairs per module and candidate and took minutes
    for 20 candidates on a busy machine; here each module is one float32 GEMM per side against
    all candidates at once, ⟨ΔW_q, ΔW_c⟩ = Σ (L_qᵀ L_c) ⊙ (R_qᵀ R_c).
    """
    q = {}
    qsq = 0.0
    for m in query.modules:
        s = np.asarray(m.sigma, np.float32)
        qsq += float(np.sum(s.astype(np.float64) ** 2))
        if np.any(s):   # keyed by shape too: a same-named weight of another shape is another weight
            q[(m.name, m.U.shape[0], m.V.shape[0])] = ((np.asarray(m.U, np.float32) * s).T,
                                                       np.asarray(m.V, np.float32))  # [k,out], [in,k]
    by_module: dict[tuple, list] = {}
    for j, ad in enumerate(others):
        for m in ad.modules:
            key = (m.name, m.B.shape[0], m.A.shape[1])
            if key in q:
                by_module.setdefault(key, []).append((j, m))
    dots = np.zeros(len(others), np.float64)
    for key, items in by_module.items():
        LqT, Rq = q[key]
        L = np.concatenate([np.asarray(m.B, np.float32) * np.float32(m.scale) for _j, m in items], axis=1)
        A = np.concatenate([np.asarray(m.A, np.float32) for _j, m in items], axis=0)
        col = np.sum((LqT @ L) * (A @ Rq).T, axis=0, dtype=np.float64)          # [Σ ranks]
        starts = np.cumsum([0] + [m.A.shape[0] for _j, m in items[:-1]])
        np.add.at(dots, [j for j, _m in items], np.add.reduceat(col, starts))
    onorms = np.array([n if n is not None else delta_norm(o) for o, n in zip(others, norms)], np.float64)
    qnorm = float(np.sqrt(qsq))
    denom = qnorm * onorms
    cos = np.clip(np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0), -1.0, 1.0)
    return qnorm, cos, onorms
