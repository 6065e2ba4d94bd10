"""Subspace encoder: ΔW seen through the subspaces a family's adapters actually use, whitened
against what varies *within* a task (issue 11). numpy only: no torch on index/query.

Fitted on a collection of adapters of one base model (``fit``), three linear maps:

    x  = ⊕_s vec(U_sᵀ ΔW_s V_s) / ‖ΔW‖_F          per known slot s (e.g. layer.3 …value): k×k
    z  = x · P                                      P = T·Q   (D×m)
    y  = normalize( [ z/‖z‖·√(share inside) , sketch(residual)/‖·‖·√(share outside) ] )

- U_s, V_s: the top-k left/right singular subspaces of the training updates at slot s (eigenvectors
  of Σ ΔWΔWᵀ and Σ ΔWᵀΔW over the unit-norm training adapters). LoRA updates of one base share
  them (the base's activation and output statistics), so ⟨x₁, x₂⟩ keeps most of the dense cosine
  with k² numbers per slot where a data-independent sketch spreads the same budget over all
  384² entries (≈ 1/√dim noise on cosines of ~0.01: the sketch's candidate sets miss relevant ones).
- T = ((1−λ)·S_w + λ·I)^−½, S_w the within-task covariance of x over the training tasks (WCCN, as
  in speaker verification: directions along which one task's adapters differ — text pool, shots,
  rank — count less; tasks never seen in training benefit because the nuisance is shared). Q: the
  top-m principal directions of x·T on the training adapters, so the block fits the index's size
  (identity when the features already fit; otherwise what lies outside the training adapters' span
  is dropped — on language-x that cost nothing measurable, see eval/results/learned.md).
- The residual block is a small raw-weighted sketch of what the subspaces miss, scaled by its true
  share of ‖ΔW‖²: modules the collection never targeted (e.g. FFN layers) enter whole, as the sketch
  would see them, so adapters that touch them still compare; the part of a known slot outside
  U_s, V_s enters with weight β (validation on language-x found it mostly noise: β = 0.05). An
  update with no energy anywhere stays the zero vector.

Everything is a function of ΔW = sBA (computed from the factors, never dense): GL(r)- and
rank-padding-invariant by construction, like the sketch.

    --encoder subspace:minilm-x     (a shipped checkpoint)  or  subspace:PATH
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from lorasearch.encoders.base import Encoder, l2_normalize, register
from lorasearch.errors import BadAdapterError, UsageError
from lorasearch.types import LoraAdapter, LoraModule

VERSION = "1"
# what `fit` may hold: the per-slot left/right moment matrices, and the features it whitens densely
MAX_MOMENT_BYTES = 2 << 30
MAX_FEATURES = 8192


def _factors(adapter) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
    from lorasearch.similarity import factors

    return factors(adapter)


def slot_key(name: str, out: int, inn: int) -> str:
    return f"{name}|{out}x{inn}"


def _sq_norm(L: np.ndarray, R: np.ndarray) -> float:
    v = float(np.sum((L.T @ L) * (R.T @ R)))
    return v if v != v else max(0.0, v)     # NaN stays NaN: `embed` refuses the adapter


class SubspaceEncoder(Encoder):
    name = "subspace"

    def __init__(self, slots: list[str], U: np.ndarray, V: np.ndarray, P: np.ndarray, res_dim: int,
                 beta: float, path: str = "", version: str = VERSION, config: dict | None = None):
        self.slots = list(slots)
        self._index = {s: i for i, s in enumerate(self.slots)}
        # per slot: U_s [out, k_s], V_s [in, k_s] (k_s = min(k, out, in)); features k_s² each
        self.U = [np.asarray(u, np.float64) for u in U]
        self.V = [np.asarray(v, np.float64) for v in V]
        sizes = [u.shape[1] * v.shape[1] for u, v in zip(self.U, self.V)]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self.P = np.asarray(P, np.float64)       # [n_slots·k², m]
        self.k = max((u.shape[1] for u in self.U), default=0)
        self.res_dim, self.beta = int(res_dim), float(beta)
        self.dim = int(self.P.shape[1]) + self.res_dim
        self.path, self.version = path, version
        self.config = config or {}
        self._sketch = None

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.path}" if self.path else self.name

    def _residual_sketch(self):
        if self._sketch is None:
            from lorasearch.encoders.sketch import SketchEncoder

            self._sketch = SketchEncoder(dim=max(self.res_dim, 1), weighting="raw", seed=17)
        return self._sketch

    # -- the features ------------------------------------------------------------------------
    def features(self, fac: dict) -> tuple[np.ndarray, list[LoraModule], float, float]:
        """(x, residual modules, ‖ΔW‖², weighted residual energy) of one adapter's factors
        {(name, out, in): (L, R)}. The residual of a known slot (ΔW outside U, V) is weighted by β
        (it is mostly what the collection showed to be noise); modules of no known slot enter whole,
        as the sketch would see them."""
        beta, off = self.beta, self._offsets
        x = np.zeros(int(off[-1]))
        rest: list[LoraModule] = []
        total = res = 0.0
        for (name, out, inn), (L, R) in fac.items():
            sq = _sq_norm(L, R)
            total += sq
            i = self._index.get(slot_key(name, out, inn))
            if i is None:
                res += sq
                rest.append(LoraModule(name, R.T.astype(np.float32), L.astype(np.float32), 1.0, shape=(out, inn)))
                continue
            U, V = self.U[i], self.V[i]
            UL, VR = U.T @ L, V.T @ R                              # [k, r] each
            S = UL @ VR.T
            x[off[i]:off[i + 1]] = S.ravel()
            if beta > 0:
                # ΔW − UUᵀΔWVVᵀ = (I−UUᵀ)L Rᵀ + UUᵀL ((I−VVᵀ)R)ᵀ: rank ≤ 2r, still factored
                res += beta ** 2 * max(0.0, sq - float(np.sum(S * S)))
                Lr = np.concatenate([L - U @ UL, U @ UL], axis=1) * beta
                Rr = np.concatenate([R, R - V @ VR], axis=1)
                rest.append(LoraModule(name, Rr.T.astype(np.float32), Lr.astype(np.float32), 1.0, shape=(out, inn)))
        return x, rest, total, res

    def _embed_factors(self, fac: dict, path: str = "") -> np.ndarray:
        x, rest, total, res = self.features(fac)
        out = np.zeros(self.dim)
        if total <= 0.0 or not np.isfinite(total):
            return out
        # each block carries its share of ‖ΔW‖²; the whitening only turns the learned block's
        # direction (its gain would otherwise drown the modules only the residual block sees)
        z = x @ self.P
        nz, inside = float(np.linalg.norm(z)), float(x @ x)
        if nz > 0:
            out[:self.P.shape[1]] = z / nz * np.sqrt(min(inside / total, 1.0))
        if self.res_dim and res > 0 and rest:
            vec, _n = self._residual_sketch()._embed_one(LoraAdapter(path or "residual", "memory", "", "", rest))
            nv = float(np.linalg.norm(vec))
            if nv > 0:
                out[self.P.shape[1]:] = vec / nv * np.sqrt(res / total)
        return out

    def encode(self, adapters) -> np.ndarray:
        if not adapters:
            return np.zeros((0, self.dim), np.float32)
        return l2_normalize(np.stack([self._embed_factors(_factors(a)) for a in adapters]))

    def embed(self, adapters: list[LoraAdapter], device="auto") -> tuple[np.ndarray, list[float]]:
        """From the raw factors (numpy; ``device`` accepted for the common interface)."""
        if not adapters:
            return np.zeros((0, self.dim), np.float32), []
        vecs, norms = [], []
        for a in adapters:
            fac = _factors(a)
            where = str(getattr(a, "path", None) or getattr(a, "source", None) or "adapter")   # raw or canonical
            with np.errstate(over="ignore", invalid="ignore"):
                v = self._embed_factors(fac, where)
                n = float(np.sqrt(sum(_sq_norm(L, R) for L, R in fac.values())))
            if not (np.isfinite(n) and np.all(np.isfinite(v))):
                raise BadAdapterError(where, f"factor values too large: ΔW overflows (‖ΔW‖_F = {n:.3g}); "
                                      "cannot embed this adapter")
            vecs.append(v)
            norms.append(n)
        return l2_normalize(np.stack(vecs)), norms

    # -- persistence -------------------------------------------------------------------------
    def save(self, path, extra: dict | None = None, card: str | None = None) -> Path:
        from safetensors.numpy import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        # P in float16 halves the shipped file; its rounding (~1e-3 relative) is far below the
        # cosine differences that decide rankings
        if len({u.shape for u in self.U} | {v.shape for v in self.V}) == 1:     # one shape: stacked
            uv = {"U": np.stack(self.U).astype(np.float32), "V": np.stack(self.V).astype(np.float32)}
        else:
            uv = {f"{n}.{i}": a.astype(np.float32) for n, arrs in (("U", self.U), ("V", self.V))
                  for i, a in enumerate(arrs)}
        save_file({**uv, "P": self.P.astype(np.float16)}, str(path / "model.safetensors"),
                  metadata={"encoder": self.name, "version": VERSION})
        digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
        config = {"format": 1, "encoder": self.name, "version": VERSION, "weights_sha256": digest,
                  "hyperparameters": {"slots": self.slots, "k": self.k, "m": int(self.P.shape[1]),
                                      "res_dim": self.res_dim, "beta": self.beta}}
        config.update(extra or {})
        (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (path / "CARD.md").write_text(card or f"# {self.name} checkpoint\n")
        return path


# ----------------------------------------------------------------------------- fitting
def fit(facs: list[dict], labels, train: np.ndarray, k: int = 12, lam: float = 0.5, m: int = 768,
        res_dim: int = 256, beta: float = 0.05, slots: list[str] | None = None) -> SubspaceEncoder:
    """Fit U_s, V_s, T and Q on the adapters ``train`` (indices into ``facs``; ``labels`` = their
    task, e.g. the labelling function). ``slots``: which (name|shape) to learn (default: every
    one some training adapter targets)."""
    train = np.asarray(train)
    sides = {slot_key(n, o, i): (o, i) for f in (facs[j] for j in train) for (n, o, i) in f}
    if slots is not None:
        sides = {key: v for key, v in sides.items() if key in slots}
    # the fit holds two side×side moments per slot and whitens Σ k_s² features densely: bound both
    moment_bytes = sum(8 * (o * o + i * i) for o, i in sides.values())
    D = sum(min(k, o, i) ** 2 for o, i in sides.values())
    if moment_bytes > MAX_MOMENT_BYTES or D > MAX_FEATURES:
        raise UsageError(f"subspace fit: {len(sides)} adapted weights need {moment_bytes / 2**30:.1f} GiB of moments "
                         f"and {D} features (limits {MAX_MOMENT_BYTES / 2**30:.0f} GiB, {MAX_FEATURES}); "
                         "use a smaller k, or fit on a base model with fewer or narrower adapted weights")
    norms = [np.sqrt(sum(_sq_norm(L, R) for L, R in facs[i].values())) for i in train]
    moments: dict[str, list] = {}
    for i, nrm in zip(train, norms):
        if nrm <= 0:
            continue
        for (name, out, inn), (L, R) in facs[i].items():
            key = slot_key(name, out, inn)
            if slots is not None and key not in slots:
                continue
            Ln = L / nrm
            GL, GR = Ln.T @ Ln, R.T @ R
            acc = moments.setdefault(key, [np.zeros((out, out)), np.zeros((inn, inn))])
            acc[0] += Ln @ GR @ Ln.T
            acc[1] += R @ GL @ R.T
    keys = sorted(moments) if slots is None else [s for s in slots if s in moments]
    if not keys:
        raise UsageError("subspace fit: the training adapters target no module")
    def top(C, n):             # eigenvectors of the n largest eigenvalues, largest first
        return np.linalg.eigh(C)[1][:, ::-1][:, :n]

    ks = [min(k, moments[s][0].shape[0], moments[s][1].shape[0]) for s in keys]
    U = [top(moments[s][0], ks[j]) for j, s in enumerate(keys)]
    V = [top(moments[s][1], ks[j]) for j, s in enumerate(keys)]
    D = sum(kk * kk for kk in ks)
    enc = SubspaceEncoder(keys, U, V, np.eye(D), 0, 0.0)
    X = np.stack([enc.features(facs[i])[0] / max(n, 1e-300) for i, n in zip(train, norms)])
    T = wccn(X, np.asarray(labels)[train], lam)
    P = np.zeros((D, m))      # a fixed width (zero columns beyond what is kept)
    if D <= m:                # everything fits: the whitened features themselves
        P[:, :D] = T
    else:                     # the top principal directions of the whitened training features
        _, s, Vt = np.linalg.svd(X @ T, full_matrices=False)
        span = min(m, int(np.sum(s > s[0] * 1e-6)))
        P[:, :span] = T @ Vt[:span].T
    return SubspaceEncoder(keys, U, V, P, res_dim, beta)


def wccn(X: np.ndarray, labels: np.ndarray, lam: float) -> np.ndarray:
    """((1−λ)·S_w + λ·I)^−½ with S_w the within-class covariance of ``X`` scaled to mean
    eigenvalue 1, then scaled so the training vectors keep their mean squared norm."""
    Xc = X.copy()
    for c in set(labels.tolist()):
        sel = labels == c
        Xc[sel] -= Xc[sel].mean(0)
    Sw = Xc.T @ Xc / len(X)
    tr = np.trace(Sw)
    Sw = Sw / (tr / X.shape[1]) if tr > 0 else np.zeros_like(Sw)
    w, Q = np.linalg.eigh((1 - lam) * Sw + lam * np.eye(X.shape[1]))
    T = (Q / np.sqrt(np.maximum(w, 1e-12))) @ Q.T
    scale = np.sqrt(np.mean(np.sum(X ** 2, 1)) / max(np.mean(np.sum((X @ T) ** 2, 1)), 1e-300))
    return T * scale


# ----------------------------------------------------------------------------- loading
def load(path: Path, arg: str) -> SubspaceEncoder:
    from lorasearch.encoders.checkpoint import WEIGHTS, identity, read_checkpoint

    config, t = read_checkpoint(path, expect="subspace", numpy=True)
    hp = config.get("hyperparameters") or {}
    try:
        slots, res_dim, beta = list(hp["slots"]), int(hp["res_dim"]), float(hp["beta"])
        if "U" in t:
            U, V = list(t["U"]), list(t["V"])
        else:
            U, V = [t[f"U.{i}"] for i in range(len(slots))], [t[f"V.{i}"] for i in range(len(slots))]
        P = t["P"]
        ok = (P.ndim == 2 and len(U) == len(V) == len(slots)
              and all(u.ndim == 2 and v.ndim == 2 and u.shape[1] == v.shape[1] for u, v in zip(U, V))
              and P.shape[0] == sum(u.shape[1] ** 2 for u in U))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise BadAdapterError(path / WEIGHTS, "weights do not match config.json")
    recorded, digest = identity(path, arg)
    return SubspaceEncoder(slots, U, V, P, res_dim, beta, path=recorded,
                           version=f"{config.get('version', VERSION)}-{digest}", config=config)


@register("subspace")
def _factory(arg: str | None) -> Encoder:
    from lorasearch.encoders.checkpoint import resolve

    if not arg:
        raise UsageError("encoder 'subspace' needs a checkpoint: --encoder subspace:PATH (shipped: subspace:minilm-x)")
    return load(resolve("subspace", arg), arg)
