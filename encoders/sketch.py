"""The training-free default encoder: a seeded random sketch of every module's ΔW.

Why: it needs no checkpoint, works on any base model, and depends on ΔW only (Ωᵀ(sB)(AΨ) =
ΩᵀΔWΨ whatever the factorization, so it is GL(r)-invariant by construction; ``embed`` computes
it straight from the raw factors in numpy, ``encode`` from a canonical U, σ, V — same vectors). Inner products of its vectors
estimate, without bias, the Frobenius inner products of the updates:

    S_m = Ω_mᵀ ΔW_m Ψ_m = (Ω_mᵀ U)·diag(σ)·(Vᵀ Ψ_m)           p×q, never forming ΔW
    e   = Σ_m  CountSketch_m( w_m · vec S_m )                    one fixed D-dim space
    E⟨e₁, e₂⟩ = Σ_m w₁ₘ w₂ₘ ⟨ΔW₁ₘ, ΔW₂ₘ⟩_F                         (a missing module is 0)

``weighting="raw"`` (w = 1) approximates the dense cosine of the whole update;
``weighting="unit"`` (w = 1/‖ΔW_m‖_F, exact from σ) approximates the mean per-module cosine, so
a few large modules cannot drown the rest.

Randomness: Ω_m (n×p) is a window of n consecutive rows of one shared Rademacher pool
(2¹⁶ × p, 8 MB for p = 32), at an offset drawn from a blake2b digest of (module name, shape,
seed); likewise Ψ_m. Each Ω_m is a Rademacher matrix and different windows make the errors of
different modules uncorrelated, yet the cache holds one pool instead of one matrix per module
(an SDXL adapter has 986 modules; independent matrices would need ~450 MB), and Ω_mᵀU is a plain
matmul on a view. A side of size ≤ p is not sketched at all (Ω = I, exact). The count sketch
(bucket and sign of each of the p·q entries) is seeded per module the same way, so every adapter
of a family gets the same matrices in every process and on every machine.

Resolution: like any data-independent linear sketch, cosines carry an error of about 1/√dim
(≈ 0.045 at dim 512, 0.03 at the default 1024); the index therefore re-ranks its top candidates by the exact cosine
(``lorasearch.similarity``).
"""
from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np

from lorasearch.encoders.base import Encoder, l2_normalize, register
from lorasearch.errors import BadAdapterError, UsageError
from lorasearch.types import CanonicalAdapter, LoraAdapter

WEIGHTINGS = ("unit", "raw")


# --- stable randomness (shared with the rawcos encoder) --------------------------------------
# Python's ``hash`` is salted per process and numpy's Generator distributions may change between
# releases, so seeds are blake2b digests and numbers come from PCG64's raw 64-bit stream.

def stable_seed(*parts) -> int:
    key = "|".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=16).digest(), "little")


def raw_u64(seed: int, n: int) -> np.ndarray:
    return np.random.PCG64(seed).random_raw(n).astype(np.uint64)


def rademacher(seed: int, n: int) -> np.ndarray:
    """``n`` independent ±1 (float32), one bit of the raw stream each."""
    words = raw_u64(seed, (n + 63) // 64).astype("<u8")
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:n]
    return (1.0 - 2.0 * bits).astype(np.float32)


def buckets_and_signs(seed: int, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Count-sketch hash of ``n`` coordinates: a bucket in ``[0, dim)`` and a ±1 sign each."""
    raw = raw_u64(seed, n)
    bucket = (raw % np.uint64(dim)).astype(np.int64)
    sign = (1.0 - 2.0 * (raw >> np.uint64(63)).astype(np.float32)).astype(np.float32)
    return bucket, sign


# --- the sketch matrices, cached -------------------------------------------------------------

def _pool_rows(n: int) -> int:
    return max(1 << 16, 1 << (2 * n - 1).bit_length())


@lru_cache(maxsize=8)
def _pool(n_rows: int, rows: int, seed: int) -> np.ndarray:
    """A shared ``[N, p]`` Rademacher matrix scaled by 1/√p, from which modules take row windows."""
    omega = rademacher(stable_seed("sketch.pool", n_rows, rows, seed), n_rows * rows).reshape(n_rows, rows)
    omega /= np.float32(np.sqrt(rows))
    omega.flags.writeable = False
    return omega


@lru_cache(maxsize=65536)
def _module_random(name: str, n_out: int, n_in: int, rows: int, dim: int, seed: int):
    """Ω_mᵀ, Ψ_m (``[p, out]`` / ``[in, q]`` views into the shared pool, or None for a side ≤ p,
    which is not sketched) and the count-sketch (bucket, sign) of the module's p×q sketch."""
    sides = []
    for side, n in (("out", n_out), ("in", n_in)):
        if n <= rows:
            sides.append(None)
            continue
        N = _pool_rows(n)
        off = stable_seed("sketch.offset", side, name, n_out, n_in, seed) % (N - n + 1)
        sides.append(_pool(N, rows, seed)[off:off + n])
    p, q = min(n_out, rows), min(n_in, rows)
    bucket, sign = buckets_and_signs(stable_seed("sketch.cs", name, n_out, n_in, rows, dim, seed), p * q, dim)
    omega_t = None if sides[0] is None else sides[0].T
    return omega_t, sides[1], bucket, sign


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _single_thread_blas():
    """BLAS limited to one thread for the duration (threadpoolctl; a no-op without it)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        from contextlib import nullcontext
        return nullcontext()
    return threadpool_limits(1, user_api="blas")


def _f32(x) -> np.ndarray:
    """float32 view of a factor: no copy when it already is float32 (the reader's output); an
    fp16 array is converted here one module at a time, never as a whole-adapter copy."""
    return x if isinstance(x, np.ndarray) and x.dtype == np.float32 else np.asarray(x, np.float32)


class SketchEncoder(Encoder):
    """Seeded two-sided sketch of each module's ΔW, count-sketched into ``dim`` dimensions."""

    name = "sketch"
    # 2: default dim 1024 (was 512). Unchanged by computing from the factors (numpy, no canonical
    # form): the vectors equal the canonical path's to float32 rounding (tests/test_sketch_factors.py).
    version = "2"
    needs_raw = False

    def __init__(self, dim: int = 1024, rows: int = 32, weighting: str = "unit", seed: int = 0,
                 device: str = "auto"):
        if weighting not in WEIGHTINGS:
            raise UsageError(f"sketch weighting must be one of {', '.join(WEIGHTINGS)}, not {weighting!r}")
        if dim < 1 or rows < 1:
            raise UsageError(f"sketch dim and rows must be positive (got dim={dim}, rows={rows})")
        self.dim, self.rows, self.weighting, self.seed = int(dim), int(rows), weighting, int(seed)
        self.device = device
        self.workers: int | None = None   # threads for embed (default: the cores this process may use)

    @property
    def spec(self) -> str:
        args = [f"{k}={v}" for k, v, d in (("dim", self.dim, 1024), ("rows", self.rows, 32),
                                           ("weighting", self.weighting, "unit"), ("seed", self.seed, 0))
                if v != d]
        return self.name + (":" + ",".join(args) if args else "")

    # -- shared tail: the p×q sketches of one adapter -> its count-sketched vector ------------
    def _count_sketch(self, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
        """``parts``: (S [p, q] float32, bucket, sign) per module -> float64 ``[dim]`` (unnormalized)."""
        if not parts:
            return np.zeros(self.dim, np.float64)
        vals = np.concatenate([S.reshape(-1) * sign for S, _b, sign in parts]).astype(np.float64)
        idx = np.concatenate([b for _S, b, _s in parts])
        return np.bincount(idx, weights=vals, minlength=self.dim)

    def encode(self, adapters: list[CanonicalAdapter]) -> np.ndarray:
        """From canonical forms: S_m = (Ω_mᵀU)·diag(wσ)·(Vᵀ Ψ_m) (the reference path)."""
        rows, dim, seed = self.rows, self.dim, self.seed
        out = np.zeros((len(adapters), dim), np.float64)
        for ai, ad in enumerate(adapters):
            parts = []
            for m in ad.modules:
                s = np.asarray(m.sigma, np.float32)
                norm = float(np.linalg.norm(s.astype(np.float64)))
                if norm == 0.0:
                    continue
                w = s / np.float32(norm) if self.weighting == "unit" else s
                U, V = _f32(m.U), _f32(m.V)
                om_t, psi, bucket, sign = _module_random(m.name, U.shape[0], V.shape[0], rows, dim, seed)
                left = U if om_t is None else om_t @ U            # [p, k]
                right = V if psi is None else psi.T @ V           # [q, k]
                parts.append(((left * w) @ right.T, bucket, sign))
            out[ai] = self._count_sketch(parts)
        return l2_normalize(out)

    # -- the fast path: straight from the raw factors ------------------------------------------
    def embed(self, adapters: list[LoraAdapter], device="auto") -> tuple[np.ndarray, list[float]]:
        """Embeddings and ‖ΔW‖_F from the raw factors, never forming the canonical form:

            S_m = Ω_mᵀ (s B) (A Ψ_m) · w_m,     ‖ΔW_m‖² = s²·Σ (BᵀB) ⊙ (AAᵀ)

        Equal to ``encode(canonicalize(adapters))`` up to float32 rounding (ΔW = sBA = UΣVᵀ).
        numpy only. The big products (Ω_mᵀB, AΨ_m, the r×r Grams) read each factor in place,
        one module at a time (a factor of an SD module fits in L2; stacking them would copy the
        whole adapter first); the small r-sized products of all modules of one shape are then
        batched into one stacked matmul. Adapters run in parallel threads (numpy releases the GIL
        inside BLAS). ``device`` is accepted for the common interface; this path runs on CPU.
        """
        if not adapters:
            return np.zeros((0, self.dim), np.float32), []
        workers = min(len(adapters), self.workers or _cpu_count())
        if workers <= 1:
            res = [self._embed_one(a) for a in adapters]
        else:
            # one adapter per thread on single-threaded BLAS: these GEMMs are skinny, and BLAS
            # threads on top of ours oversubscribe the cores (measured on 2 shared cores: 4 r32
            # adapters 0.11 s like this, 0.25 s with both levels threaded, 0.21 s on one thread)
            with _single_thread_blas(), ThreadPoolExecutor(workers, thread_name_prefix="lorasearch-sketch") as pool:
                res = list(pool.map(self._embed_one, adapters))
        vecs = np.stack([v for v, _n in res])
        return l2_normalize(vecs), [n for _v, n in res]

    def _embed_one(self, ad: LoraAdapter) -> tuple[np.ndarray, float]:
        with np.errstate(over="ignore", invalid="ignore"):   # overflow is checked once, at the end
            return self._embed_one_unchecked(ad)

    def _embed_one_unchecked(self, ad: LoraAdapter) -> tuple[np.ndarray, float]:
        rows, dim, seed = self.rows, self.dim, self.seed
        groups: dict[tuple, list] = defaultdict(list)    # (p, r, q) -> [(left, right, gram2, scale, rnd)]
        for m in ad.modules:
            B, A = _f32(m.B), _f32(m.A)
            if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
                raise BadAdapterError(ad.path, f"module {m.name} has factor shapes A{tuple(A.shape)} "
                                      f"B{tuple(B.shape)}, expected A [r, in] and B [out, r]")
            om_t, psi, bucket, sign = _module_random(m.name, B.shape[0], A.shape[1], rows, dim, seed)
            left = B if om_t is None else om_t @ B              # [p, r]
            right = A if psi is None else A @ psi               # [r, q]
            groups[(left.shape[0], A.shape[0], right.shape[1])].append(
                (left, right, B.T @ B, A @ A.T, float(m.scale), bucket, sign))
        parts, sq_total = [], 0.0
        for (p, r, q), items in groups.items():
            GB = np.stack([it[2] for it in items]).astype(np.float64)
            GA = np.stack([it[3] for it in items]).astype(np.float64)
            sc = np.array([it[4] for it in items], np.float64)
            sq = np.maximum(np.einsum("nij,nij->n", GB, GA), 0.0) * sc ** 2     # ‖ΔW_m‖²
            sq_total += float(sq.sum())
            nrm = np.sqrt(sq)
            if self.weighting == "unit":
                w = np.divide(sc, nrm, out=np.zeros_like(sc), where=nrm > 0)
            else:
                w = np.where(nrm > 0, sc, 0.0)
            L = np.stack([it[0] for it in items])                               # [n, p, r]
            R = np.stack([it[1] for it in items])                               # [n, r, q]
            S = np.matmul(L, R) * w.astype(np.float32)[:, None, None]           # [n, p, q]
            parts += [(S[j], it[5], it[6]) for j, it in enumerate(items) if nrm[j] > 0]
        vec, norm = self._count_sketch(parts), float(np.sqrt(sq_total))
        if not (np.isfinite(norm) and np.all(np.isfinite(vec))):
            # finite factors whose float32 products overflow (hostile or corrupt values)
            raise BadAdapterError(ad.path, "factor values too large: ΔW overflows float32 "
                                  f"(‖ΔW‖_F = {norm:.3g}); cannot embed this adapter")
        return vec, norm


def parse_args(arg: str | None, allowed: dict[str, type]) -> dict:
    """``"dim=256,weighting=raw"`` -> ``{"dim": 256, "weighting": "raw"}`` (for encoder specs)."""
    kw = {}
    for part in filter(None, (arg or "").split(",")):
        k, eq, v = part.partition("=")
        k = k.strip()
        if not eq or k not in allowed:
            raise UsageError(f"bad encoder argument {part!r}; expected key=value with key in {', '.join(allowed)}")
        try:
            kw[k] = allowed[k](v.strip())
        except ValueError:
            raise UsageError(f"bad encoder argument {part!r}: {v.strip()!r} is not a {allowed[k].__name__}") from None
    return kw


@register("sketch")
def _factory(arg: str | None, device: str = "auto") -> SketchEncoder:
    return SketchEncoder(**parse_args(arg, {"dim": int, "rows": int, "weighting": str, "seed": int}), device=device)
