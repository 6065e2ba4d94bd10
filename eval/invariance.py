"""Invariance check (W2T Figure 5): does an embedding move when the factors are reparameterized?

B·A = (B·G)(G⁻¹·A) for every invertible r×r G, so the update is the same adapter. For growing
strength t we draw, per module, G = expm(t·X) (``mode="expm"``, X Gaussian / √r, so cond(G)
grows smoothly like e^{O(t)}) or G = I + t·N (``mode="additive"``), store B·G and G⁻¹·A in
float32 like a file would, and measure per method:

* drift = 1 − cos(embedding of the adapter, embedding of its reparameterized copy);
* top-k overlap = |top-k(q vs gallery) ∩ top-k(q vs reparameterized gallery)| / k, with every
  original adapter as a query against the gallery of all others.

Methods are encoder specs plus the references ``dense`` (exact ΔW cosine: invariant by
definition) and ``rawcos`` (raw factors: not invariant). Canonical encoders should stay at
float32 rounding (≈ cond(G)·1e-7); raw-factor methods degrade with t.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Sequence

import numpy as np
import torch

from lorasearch.errors import IncompatibleError, UsageError
from lorasearch.eval.retrieval import REFERENCE_METHODS, encoder_for
from lorasearch.results import JSON_VERSION
from lorasearch.types import LoraAdapter

DEFAULT_STRENGTHS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)


def random_g(r: int, t: float, rng: np.random.Generator, mode: str = "expm") -> np.ndarray:
    """An invertible r×r matrix at strength t (t = 0 gives the identity), float64."""
    if mode == "expm":
        # torch's matrix_exp: same result as scipy.linalg.expm here, ~20x faster on tiny matrices
        return torch.linalg.matrix_exp(torch.from_numpy(t * rng.standard_normal((r, r)) / np.sqrt(r))).numpy()
    if mode == "additive":
        return np.eye(r) + t * rng.standard_normal((r, r)) / np.sqrt(r)
    raise ValueError(f"mode must be 'expm' or 'additive', not {mode!r}")


def reparameterize(adapter: LoraAdapter, t: float, rng: np.random.Generator,
                   mode: str = "expm") -> tuple[LoraAdapter, float]:
    """The same ΔW with factors B·G, G⁻¹·A (an independent G per module), stored as float32.

    Returns the copy and the largest condition number of the G drawn.
    """
    mods, conds = [], [1.0]
    for m in adapter.modules:
        G = random_g(m.rank, t, rng, mode)
        conds.append(float(np.linalg.cond(G)))
        B = (m.B.astype(np.float64) @ G).astype(np.float32)
        A = np.linalg.solve(G, m.A.astype(np.float64)).astype(np.float32)
        mods.append(replace(m, A=A, B=B, dtype="F32"))
    return replace(adapter, modules=mods, sha256="", path=adapter.path + f"#G(t={t})"), max(conds)


def _embed(encoder, cs: list, cache: dict) -> np.ndarray:
    key = tuple(id(c) for c in cs)
    if key not in cache:
        cache[key] = np.asarray(encoder.encode(cs), dtype=np.float64)
    return cache[key]


def _similarity(method: str, encoder, q_canon: list, g_canon: list, cache: dict) -> np.ndarray:
    """[nq, ng] cosine under ``method`` (encoder embeddings are cached per list of adapters)."""
    if encoder is None:
        from lorasearch import similarity

        fn = similarity.pairwise_dense_cosine if method == "dense" else similarity.pairwise_rawcos
        return np.asarray(fn(q_canon, g_canon), dtype=np.float64)
    return _embed(encoder, q_canon, cache) @ _embed(encoder, g_canon, cache).T


def _topk(S: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-S, axis=1, kind="stable")[:, :k]


def drift_curves(adapters: Sequence[LoraAdapter], methods: Sequence[str] = ("sketch", "rawcos", "dense"),
                 strengths: Sequence[float] = DEFAULT_STRENGTHS, mode: str = "expm", k: int = 10,
                 seed: int = 0, device: str = "auto") -> dict:
    """Drift and top-k overlap per method and strength; one versioned object (``kind: invariance``).

    All adapters must share one family (they are compared with each other).
    """
    from lorasearch.canonical import canonicalize_many
    adapters = list(adapters)
    methods = list(dict.fromkeys(methods))   # a method named twice is measured once
    families = {a.family for a in adapters}
    if len(families) != 1:
        raise IncompatibleError(f"invariance needs adapters of one family, got {sorted(families)}")
    if len(adapters) < 2:
        raise UsageError("invariance needs at least 2 adapters")
    k = min(k, len(adapters) - 1)
    orig = canonicalize_many(adapters, device=device)     # .raw (for rawcos) is set by canonicalize_many
    encoders = {m: (None if m in REFERENCE_METHODS else encoder_for(m, orig)) for m in methods}
    caches = {m: {} for m in methods}
    off_diag = ~np.eye(len(adapters), dtype=bool)
    orig_key = tuple(id(c) for c in orig)
    base = {m: _similarity(m, encoders[m], orig, orig, caches[m]) for m in methods}
    result = {"version": JSON_VERSION, "kind": "invariance", "mode": mode, "k": k, "seed": seed,
              "n_adapters": len(adapters), "family": families.pop(), "strengths": list(map(float, strengths)),
              "cond_max": [], "methods": {m: {"spec": encoders[m].spec if encoders[m] else m,
                                                "drift_mean": [], "drift_max": [], "overlap": []}
                                            for m in methods}}
    t0 = time.perf_counter()
    for t in strengths:
        rng = np.random.default_rng([seed, int(round(t * 1000))])
        pairs = [reparameterize(a, t, rng, mode) for a in adapters]
        result["cond_max"].append(max(c for _, c in pairs))
        rep = canonicalize_many([p for p, _ in pairs], device=device)
        for m in methods:
            S1 = _similarity(m, encoders[m], orig, rep, caches[m])   # [original, reparameterized]
            drift = np.clip(1.0 - np.diag(S1), 0.0, None)
            S0 = base[m]
            # the query itself is not a neighbour: rank the other adapters only
            S0m, S1m = np.where(off_diag, S0, -np.inf), np.where(off_diag, S1, -np.inf)
            a, b = _topk(S0m, k), _topk(S1m, k)
            overlap = np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)])
            r = result["methods"][m]
            r["drift_mean"].append(float(drift.mean()))
            r["drift_max"].append(float(drift.max()))
            r["overlap"].append(float(overlap))
            # keep only the originals' embeddings: ids of freed copies may be reused next round
            caches[m] = {key: v for key, v in caches[m].items() if key == orig_key}
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def format_table(result: dict) -> str:
    """One row per method: mean drift at each strength, then top-k overlap at the largest."""
    ts = result["strengths"]
    head = ["method"] + [f"drift t={t:g}" for t in ts] + [f"top-{result['k']} overlap t={ts[-1]:g}"]
    rows = [[m] + [f"{d:.2e}" for d in r["drift_mean"]] + [f"{r['overlap'][-1]:.3f}"]
            for m, r in result["methods"].items()]
    rows.append(["cond(G) max"] + [f"{c:.1f}" for c in result["cond_max"]] + [""])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines) + "\n"
