"""The training-free default encoder: a seeded random sketch of every module's ΔW.

Why: it needs no checkpoint, works on any base model, and depends on ΔW only (it reads the
canonical U, σ, V, so it is GL(r)-invariant by construction). Inner products of its vectors
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
from functools import lru_cache

import numpy as np
import torch

from lorasearch.canonical import single_thread
from lorasearch.encoders.base import Encoder, l2_normalize, register
from lorasearch.errors import UsageError
from lorasearch.types import CanonicalAdapter

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
def _pool(n_rows: int, rows: int, seed: int) -> torch.Tensor:
    """A shared ``[N, p]`` Rademacher matrix scaled by 1/√p, from which modules take row windows."""
    omega = rademacher(stable_seed("sketch.pool", n_rows, rows, seed), n_rows * rows).reshape(n_rows, rows)
    return torch.from_numpy(omega / np.float32(np.sqrt(rows)))


@lru_cache(maxsize=65536)
def _module_random(name: str, n_out: int, n_in: int, rows: int, dim: int, seed: int):
    """Ω_m, Ψ_m (views into the shared pool, or the identity for a side ≤ p) and the
    count-sketch (bucket, sign) of the module's p×q sketch."""
    sides = []
    for side, n in (("out", n_out), ("in", n_in)):
        if n <= rows:
            sides.append(torch.eye(n, dtype=torch.float32))
            continue
        N = _pool_rows(n)
        off = stable_seed("sketch.offset", side, name, n_out, n_in, seed) % (N - n + 1)
        sides.append(_pool(N, rows, seed)[off:off + n])
    p, q = min(n_out, rows), min(n_in, rows)
    bucket, sign = buckets_and_signs(stable_seed("sketch.cs", name, n_out, n_in, rows, dim, seed), p * q, dim)
    return sides[0], sides[1], torch.from_numpy(bucket), torch.from_numpy(sign)


class SketchEncoder(Encoder):
    """Seeded two-sided sketch of each module's ΔW, count-sketched into ``dim`` dimensions."""

    name = "sketch"
    version = "2"   # 2: default dim 1024 (was 512)
    needs_raw = False

    def __init__(self, dim: int = 1024, rows: int = 32, weighting: str = "unit", seed: int = 0):
        if weighting not in WEIGHTINGS:
            raise UsageError(f"sketch weighting must be one of {', '.join(WEIGHTINGS)}, not {weighting!r}")
        if dim < 1 or rows < 1:
            raise UsageError(f"sketch dim and rows must be positive (got dim={dim}, rows={rows})")
        self.dim, self.rows, self.weighting, self.seed = int(dim), int(rows), weighting, int(seed)

    @property
    def spec(self) -> str:
        args = [f"{k}={v}" for k, v, d in (("dim", self.dim, 1024), ("rows", self.rows, 32),
                                           ("weighting", self.weighting, "unit"), ("seed", self.seed, 0))
                if v != d]
        return self.name + (":" + ",".join(args) if args else "")

    def encode(self, adapters: list[CanonicalAdapter]) -> np.ndarray:
        rows, dim, seed = self.rows, self.dim, self.seed
        vals, idx = [], []
        with single_thread():
            for ai, ad in enumerate(adapters):
                for m in ad.modules:
                    s = torch.from_numpy(np.asarray(m.sigma, np.float32))
                    norm = float(torch.linalg.vector_norm(s.double()))
                    if norm == 0.0:
                        continue
                    w = s / norm if self.weighting == "unit" else s
                    U = torch.from_numpy(np.asarray(m.U, np.float32))
                    V = torch.from_numpy(np.asarray(m.V, np.float32))
                    omega, psi, bucket, sign = _module_random(m.name, U.shape[0], V.shape[0], rows, dim, seed)
                    S = ((omega.T @ U) * w) @ (psi.T @ V).T          # Ω_mᵀ U diag(wσ) Vᵀ Ψ_m   [p, q]
                    vals.append(S.reshape(-1) * sign)
                    idx.append(bucket + ai * dim)
            out = torch.zeros(len(adapters) * dim, dtype=torch.float64)
            if vals:
                out.index_add_(0, torch.cat(idx), torch.cat(vals).double())
        return l2_normalize(out.reshape(len(adapters), dim).numpy())


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
def _factory(arg: str | None) -> SketchEncoder:
    return SketchEncoder(**parse_args(arg, {"dim": int, "rows": int, "weighting": str, "seed": int}))
