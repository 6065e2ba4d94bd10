"""Exact re-scoring without re-reading candidate files: a compact re-rank record per adapter.

Why: re-ranking used to re-read up to 50 candidate files per query (38–150 MB each for SD).
At index time ``build_record`` keeps, per adapter, what re-scoring needs in a bounded number of
bytes (``budget``, default 2 MiB), independent of the file's size:

* **exact** — the raw factors, losslessly in their stored precision (F16/BF16/F32), when they fit.
  Re-scoring is then exactly today's (float32 GEMMs on the same factors).
* **svd** — otherwise, the top singular triplets of ΔW_m = s·B_m·A_m chosen across all modules
  by σ² (global energy), U and V in fp16, σ in fp32, plus ``residual`` = ‖ΔW − ΔW_stored‖_F,
  which covers both what was dropped and the fp16 rounding of what was kept.

The SVDs come from the r×r Grams, not from a QR of the full factors (one GEMM pass each):

    BᵀB = P_B Λ_B P_Bᵀ,  AAᵀ = P_A Λ_A P_Aᵀ     ⇒  ΔW = s·Q_B (Λ_B^½ P_BᵀP_A Λ_A^½) Q_Aᵀ
    M = s·Λ_B^½ P_BᵀP_A Λ_A^½ = Ũ Σ Ṽᵀ        ⇒  U = B P_B Λ_B^-½ Ũ,   V = Aᵀ P_A Λ_A^-½ Ṽ

Squaring the Gram costs accuracy only in directions with σ below ~1e-8·σ_max (float64 Grams),
and nothing relies on the triplets being exact: ``residual`` is computed afterwards from the
factors and the rounded stored vectors, ‖ΔW − T‖² = ‖ΔW‖² − 2⟨ΔW, T⟩ + ‖T‖², all via small
Grams in float64. Re-scoring a query q against a record c then gives, by Cauchy–Schwarz,

    |cos(q, c) − ⟨q, T_c⟩/(‖q‖‖c‖)| ≤ residual_c / ‖c‖                 (``bound``)

``match_kind`` turns (cosine, bound, norms) into exact / same-update / similar as the query
does today, or "undecided" when the bound straddles the same-update threshold: the caller then
re-reads just that file.
"""
from __future__ import annotations

import io
import json
import threading
import zipfile
from dataclasses import dataclass, field

import numpy as np

from lorasearch.errors import BadAdapterError
from lorasearch.types import LoraAdapter

RECORD_VERSION = 1
DEFAULT_BUDGET = 2 * 1024 * 1024          # bytes of factor payload per adapter
SAME_UPDATE_COSINE = 0.999                # as lorasearch.api (issue 2)
SAME_UPDATE_NORM_TOL = 0.01
# float64 round-off of the residual (a difference of Gram sums of size ‖ΔW‖²): added, relative
# to ‖ΔW‖², so the bound stays an upper bound. Measured round-off is ~1e-15.
_RESIDUAL_SLACK = 1e-12
# Gram eigenvalues below this fraction of the largest are treated as zero (their directions
# carry σ ≲ 1e-7·σ_max; whatever they hold is counted in ``residual``).
_EIG_FLOOR = 1e-14
_STORE = {"F16": np.float16, "F32": np.float32}


# numpy parses each .npy header with ast.literal_eval; CPython 3.11 can raise "SystemError: AST
# constructor recursion depth mismatch" when two threads build ASTs at once (seen under the HTTP
# service's concurrent queries), so records are unpacked one thread at a time (a short section).
_NPZ_LOCK = threading.Lock()

@dataclass
class RerankModule:
    """ΔW_stored = L · diag(w) · Rᵀ with L ``[out, k]``, R ``[in, k]`` in the stored dtype."""

    name: str
    L: np.ndarray
    R: np.ndarray
    w: np.ndarray          # float32 [k]: the scale (exact) or σ (svd)

    @property
    def key(self) -> tuple:
        return (self.name, self.L.shape[0], self.R.shape[0])


@dataclass
class RerankRecord:
    kind: str              # "exact" | "svd"
    norm: float            # ‖ΔW‖_F of the whole adapter (float64, from the factors)
    residual: float        # ‖ΔW − ΔW_stored‖_F (0 for exact)
    modules: list[RerankModule] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(m.L.nbytes + m.R.nbytes + m.w.nbytes for m in self.modules)

    # -- storage: one npz blob (numpy's own reader validates it; no pickle) ------------------
    def to_bytes(self) -> bytes:
        dts = sorted({_dtype_name(m.L) for m in self.modules}) or ["F16"]
        if len(dts) != 1:
            raise ValueError(f"mixed payload dtypes {dts}")
        head = {"v": RECORD_VERSION, "kind": self.kind, "norm": self.norm, "residual": self.residual,
                "dtype": dts[0], "modules": [[m.name, m.L.shape[0], m.R.shape[0], m.L.shape[1]] for m in self.modules]}
        payload = [m.L.reshape(-1) for m in self.modules] + [m.R.reshape(-1) for m in self.modules]
        flat = np.concatenate([_raw(x) for x in payload]) if payload else np.zeros(0, np.uint8)
        w = np.concatenate([m.w for m in self.modules]).astype(np.float32) if self.modules else np.zeros(0, np.float32)
        buf = io.BytesIO()
        np.savez(buf, head=np.frombuffer(json.dumps(head).encode(), np.uint8), payload=flat, w=w)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes, where: str = "re-rank record") -> "RerankRecord":
        """Parse a stored record; anything malformed is a ``BadAdapterError`` naming ``where``."""
        try:
            with _NPZ_LOCK, np.load(io.BytesIO(blob), allow_pickle=False) as z:
                head = json.loads(z["head"].tobytes())
                flat, w = z["payload"], z["w"]
            if head.get("v") != RECORD_VERSION or head.get("kind") not in ("exact", "svd"):
                raise ValueError(f"unsupported record version/kind {head.get('v')!r}/{head.get('kind')!r}")
            dt = head["dtype"]
            item = 4 if dt == "F32" else 2
            if flat.dtype != np.uint8 or w.dtype != np.float32 or flat.ndim != 1 or w.ndim != 1:
                raise ValueError("payload arrays have the wrong dtype or shape")
            specs = [(str(n), int(o), int(i), int(k)) for n, o, i, k in head["modules"]]
            if any(o < 1 or i < 1 or k < 0 for _n, o, i, k in specs):
                raise ValueError("non-positive module shape")
            need = sum((o + i) * k for _n, o, i, k in specs)
            if flat.size != need * item or w.size != sum(k for *_x, k in specs):
                raise ValueError(f"payload holds {flat.size} bytes / {w.size} weights, header needs "
                                 f"{need * item} / {sum(k for *_x, k in specs)}")
            vals = _decode(flat, dt)
            mods, pos, wpos = [], 0, 0
            Ls = []
            for _n, o, _i, k in specs:
                Ls.append(vals[pos:pos + o * k].reshape(o, k))
                pos += o * k
            for (n, _o, i, k), L in zip(specs, Ls):
                mods.append(RerankModule(n, L, vals[pos:pos + i * k].reshape(i, k), w[wpos:wpos + k]))
                pos += i * k
                wpos += k
            return cls(head["kind"], float(head["norm"]), float(head["residual"]), mods)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError, OSError, EOFError,
                zipfile.BadZipFile) as e:
            raise BadAdapterError(where, f"corrupt re-rank record ({' '.join(str(e).split())[:160]})") from None


def _dtype_name(x: np.ndarray) -> str:
    return "BF16" if x.dtype == np.uint16 else {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}[x.dtype]


def _raw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(np.uint8)


def _decode(flat: np.ndarray, dt: str) -> np.ndarray:
    """Stored payload as typed values, no copy (bf16 stays uint16 bit patterns; see ``_as_float32``)."""
    if dt == "BF16":
        return flat.view(np.uint16)
    if dt not in _STORE:
        raise ValueError(f"unknown payload dtype {dt!r}")
    return flat.view(_STORE[dt])


def _as_float32(x: np.ndarray) -> np.ndarray:
    """A stored factor as float32 (bf16 payload is kept as uint16 bit patterns)."""
    if x.dtype == np.uint16:
        return (x.astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32, copy=False)


def _lossless(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` (float32) in the file's dtype when that is lossless, else float32."""
    if dtype == "F16":
        y = x.astype(np.float16)
        if np.array_equal(y.astype(np.float32), x):
            return y
    elif dtype == "BF16":
        bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
        if not np.any(bits & np.uint32(0xFFFF)):
            return (bits >> np.uint32(16)).astype(np.uint16)
    return np.ascontiguousarray(x, np.float32)


def _sq_norm(B: np.ndarray, A: np.ndarray, scale: float) -> float:
    GB = (B.T @ B).astype(np.float64)
    GA = (A @ A.T).astype(np.float64)
    return max(0.0, float(np.sum(GB * GA))) * float(scale) ** 2


def adapter_norm(adapter: LoraAdapter) -> float:
    """‖ΔW‖_F from the factors via r×r Grams: s²·Σ (BᵀB) ⊙ (AAᵀ) per module."""
    return float(np.sqrt(sum(_sq_norm(m.B, m.A, m.scale) for m in adapter.modules)))


# --- building a record -------------------------------------------------------------------------

def build_record(adapter: LoraAdapter, budget: int = DEFAULT_BUDGET) -> RerankRecord:
    """The compact re-rank record of ``adapter`` (see the module docstring). Runs on one BLAS
    thread: hundreds of r×r eigh/SVD calls, where BLAS threads cost 5x (0.6 s vs 3.1 s at r32 on
    2 shared cores); parallelism belongs one level up (several adapters at once)."""
    from lorasearch.encoders.sketch import _single_thread_blas

    with _single_thread_blas():
        return _build_record(adapter, budget)


def _build_record(adapter: LoraAdapter, budget: int) -> RerankRecord:
    raw_bytes = sum((m.out_features + m.in_features) * m.rank * (4 if _store_dtype(adapter) == "F32" else 2)
                    for m in adapter.modules)
    if raw_bytes <= budget:
        return exact_record(adapter)
    return svd_record(adapter, budget)


def _store_dtype(adapter: LoraAdapter) -> str:
    kinds = {m.dtype for m in adapter.modules}
    return kinds.pop() if len(kinds) == 1 and next(iter(kinds), "F32") in ("F16", "BF16") else "F32"


def exact_record(adapter: LoraAdapter) -> RerankRecord:
    """All raw factors, lossless in the file's precision (one dtype for the whole record)."""
    dt = _store_dtype(adapter)
    mods = []
    for m in adapter.modules:
        L, R = _lossless(m.B, dt), _lossless(np.ascontiguousarray(m.A.T), dt)
        if L.dtype != R.dtype or (dt != "F32" and L.dtype == np.float32):
            return _exact_f32(adapter)
        mods.append(RerankModule(m.name, L, R, np.full(m.rank, m.scale, np.float32)))
    return RerankRecord("exact", adapter_norm(adapter), 0.0, mods)


def _exact_f32(adapter: LoraAdapter) -> RerankRecord:
    mods = [RerankModule(m.name, np.ascontiguousarray(m.B, np.float32), np.ascontiguousarray(m.A.T, np.float32),
                         np.full(m.rank, m.scale, np.float32)) for m in adapter.modules]
    return RerankRecord("exact", adapter_norm(adapter), 0.0, mods)


def _gram_svd(B: np.ndarray, A: np.ndarray, scale: float):
    """(σ [k] descending, CU [r, k], CV [r, k], GB, GA) with U = B·CU, V = Aᵀ·CV (module docstring)."""
    GB = B.T.astype(np.float64) @ B.astype(np.float64)   # float64 Grams: one module at a time
    GA = A.astype(np.float64) @ A.T.astype(np.float64)
    lb, PB = np.linalg.eigh(GB)
    la, PA = np.linalg.eigh(GA)
    kb = lb > max(lb[-1], 0.0) * _EIG_FLOOR
    ka = la > max(la[-1], 0.0) * _EIG_FLOOR
    if not kb.any() or not ka.any():
        r = B.shape[1]
        return np.zeros(0), np.zeros((r, 0)), np.zeros((r, 0)), GB, GA
    sb, sa = np.sqrt(lb[kb]), np.sqrt(la[ka])
    PB, PA = PB[:, kb], PA[:, ka]
    M = float(scale) * (sb[:, None] * (PB.T @ PA) * sa[None, :])
    Ut, S, Vth = np.linalg.svd(M, full_matrices=False)
    CU = (PB / sb[None, :]) @ Ut
    CV = (PA / sa[None, :]) @ Vth.T
    keep = S > 0
    return S[keep], CU[:, keep], CV[:, keep], GB, GA


def svd_record(adapter: LoraAdapter, budget: int = DEFAULT_BUDGET) -> RerankRecord:
    """Top singular triplets by global σ², within ``budget`` bytes (U, V fp16, σ fp32)."""
    parts, cands, total_sq = [], [], 0.0
    for mi, m in enumerate(adapter.modules):
        B, A = np.asarray(m.B, np.float32), np.asarray(m.A, np.float32)
        S, CU, CV, GB, GA = _gram_svd(B, A, m.scale)
        sq = max(0.0, float(np.sum(GB * GA))) * float(m.scale) ** 2
        total_sq += sq
        parts.append((m, S, CU, CV, sq))
        cost = 2 * (m.out_features + m.in_features) + 4
        cands += [(float(s) ** 2, mi, j, cost) for j, s in enumerate(S)]
    cands.sort(key=lambda c: -c[0])
    chosen: dict[int, list[int]] = {}
    left = budget
    for _e, mi, j, cost in cands:
        if cost <= left:
            chosen.setdefault(mi, []).append(j)
            left -= cost
    mods, res_sq = [], 0.0
    for mi, (m, S, CU, CV, sq) in enumerate(parts):
        cols = sorted(chosen.get(mi, []))
        if not cols:
            res_sq += sq
            continue
        B, A = np.asarray(m.B, np.float32), np.asarray(m.A, np.float32)
        U = (B @ CU[:, cols].astype(np.float32)).astype(np.float16)
        V = (A.T @ CV[:, cols].astype(np.float32)).astype(np.float16)
        sig = S[cols].astype(np.float32)
        res_sq += _residual_sq(B, A, m.scale, sq, U, V, sig)
        mods.append(RerankModule(m.name, U, V, sig))
    residual = float(np.sqrt(max(res_sq, 0.0) + _RESIDUAL_SLACK * total_sq))
    return RerankRecord("svd", float(np.sqrt(total_sq)), residual, mods)


def _residual_sq(B, A, scale, sq, U, V, sig) -> float:
    """‖sBA − U diag(σ) Vᵀ‖_F² for the stored (rounded) U, V, σ, from small float64 Grams."""
    U64, V64, s64 = U.astype(np.float64), V.astype(np.float64), sig.astype(np.float64)
    cross = float(np.sum((B.T.astype(np.float64) @ U64) * (A.astype(np.float64) @ V64) * s64)) * float(scale)
    tt = float(np.sum((U64.T @ U64) * (V64.T @ V64) * np.outer(s64, s64)))
    return max(0.0, sq - 2.0 * cross + tt)


# --- re-scoring ----------------------------------------------------------------------------------

def _query_factors(query: LoraAdapter) -> tuple[dict, float]:
    """(name, out, in) -> (L_qᵀ [r, out] float32 with the scale folded in, R_q = Aᵀ [in, r]); ‖ΔW_q‖."""
    q, sq = {}, 0.0
    for m in query.modules:
        B, A = np.asarray(m.B, np.float32), np.asarray(m.A, np.float32)
        msq = _sq_norm(B, A, m.scale)
        sq += msq
        if msq > 0:   # keyed by shape too: a same-named weight of another shape is another weight
            q[(m.name, B.shape[0], A.shape[1])] = ((B * np.float32(m.scale)).T, A.T)
    return q, float(np.sqrt(sq))


def rescore(query: LoraAdapter, records: list[RerankRecord]) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """(‖ΔW_q‖, cosines, bounds, ‖ΔW_c‖) of the query against every record.

    cos_c = ⟨ΔW_q, ΔW_c,stored⟩ / (‖ΔW_q‖·‖ΔW_c‖) with the true ‖ΔW_c‖ from the record; the true
    cosine lies within ``bounds`` of it (0 for exact records). Per module, all records' stored
    factors are concatenated so each side is one float32 GEMM against the query's factors.
    One BLAS thread: the GEMMs are skinny and many (as ``build_record``)."""
    from lorasearch.encoders.sketch import _single_thread_blas

    with _single_thread_blas():
        return _rescore(query, records)


def _rescore(query: LoraAdapter, records: list[RerankRecord]):
    q, qnorm = _query_factors(query)
    by_key: dict[tuple, list] = {}
    for j, rec in enumerate(records):
        for m in rec.modules:
            if m.key in q and m.L.shape[1] > 0:
                by_key.setdefault(m.key, []).append((j, m))
    dots = np.zeros(len(records), np.float64)
    for key, items in by_key.items():
        LqT, Rq = q[key]
        L = np.concatenate([_as_float32(m.L) * m.w for _j, m in items], axis=1)   # [out, Σk]
        R = np.concatenate([_as_float32(m.R) for _j, m in items], axis=1)          # [in, Σk]
        col = np.sum((LqT @ L) * (Rq.T @ R), axis=0, dtype=np.float64)
        starts = np.cumsum([0] + [m.L.shape[1] for _j, m in items[:-1]])
        np.add.at(dots, [j for j, _m in items], np.add.reduceat(col, starts))
    cnorms = np.array([r.norm for r in records], np.float64)
    resid = np.array([r.residual for r in records], np.float64)
    denom = qnorm * cnorms
    cos = np.clip(np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0), -1.0, 1.0)
    bounds = np.divide(resid, cnorms, out=np.zeros_like(resid), where=cnorms > 0)
    return qnorm, cos, bounds, cnorms


def factor_cosines(query: LoraAdapter, others: list[LoraAdapter], norms: list) -> tuple[float, np.ndarray, np.ndarray]:
    """Exact Frobenius cosines of ΔW between a raw query and raw candidates, numpy only: the
    query's re-scoring without its canonical form. Returns (‖ΔW_q‖, cosines, ‖ΔW_c‖); ``norms``
    may hold the candidates' norms from the catalog (None where unknown)."""
    recs = []
    for o, n in zip(others, norms):
        mods = [RerankModule(m.name, np.asarray(m.B, np.float32), np.asarray(m.A, np.float32).T,
                             np.full(m.rank, m.scale, np.float32)) for m in o.modules]
        recs.append(RerankRecord("exact", float(n) if n is not None else adapter_norm(o), 0.0, mods))
    qnorm, cos, _b, cnorms = rescore(query, recs)
    return qnorm, cos, cnorms


def match_kind(cos: float, bound: float, qnorm: float, cnorm: float, same_sha: bool = False,
               scale_known: bool = True) -> str:
    """exact / same-update / similar as the query decides them, or "undecided" when the bound
    straddles the same-update cosine (re-read that candidate's file to decide).

    ``scale_known=False`` (a side whose alpha is unknown): norms are not compared, direction only,
    as ``main``'s query does."""
    if same_sha:
        return "exact"
    if scale_known and not (qnorm > 0 and abs(cnorm / qnorm - 1.0) <= SAME_UPDATE_NORM_TOL):
        return "similar"
    if cos - bound >= SAME_UPDATE_COSINE:
        return "same-update"
    if cos + bound < SAME_UPDATE_COSINE:
        return "similar"
    return "undecided"
