"""Canonical form of a LoRA update: the SVD of ΔW = scale·B·A computed from the factors.

Why: B·A = (B·G)(G⁻¹·A) for any invertible G, so raw factors are not an identity of the
update; the SVD of ΔW is (up to the sign rule below). Forming ΔW (out×in) and running a dense
SVD is the expensive way; the W2T path never forms it:

    B = Q_B R_B,  Aᵀ = Q_A R_A          (thin QR, R is r×r)
    M = scale · R_B R_Aᵀ                  (r×r core)
    M = Ũ Σ Ṽᵀ                            (small SVD)
    U = Q_B Ũ,  V = Q_A Ṽ                 ⇒ ΔW = U Σ Vᵀ

Sign rule (W2T): in each column of U the entry of largest |·| is made positive and the matching
V column is flipped with it. Singular directions whose σ is below the numerical-rank tolerance
are not determined by ΔW (a zero module has none), so their σ is set to 0 and their U/V columns
to 0: the canonical form then depends on ΔW only, and never carries NaN.

Thin QR of a tall float32 factor: on CPU by CholeskyQR2 (``cholqr2_svd``), not Householder.
With r = 32 LAPACK's Householder QR is a level-2 BLAS loop over the whole factor (r is one
panel) and was most of the indexing time; CholeskyQR2 is four float32 GEMM passes
(Gram → Q₁ = X R₁⁻¹ → Gram of Q₁ → U = Q₁ Y) plus r×r work in float64, and is as accurate as
Householder while κ(X) ≪ eps32^-½ (Yamamoto et al., ETNA 44, 2015; measured here to κ ≈ 3e3; it is
more accurate than float32 Householder, see below). Each module is checked
a posteriori (both Choleskys succeed, κ(R₁) small, Q₁ᵀQ₁ near I); a module that fails —
rank-deficient, zero or ill-conditioned factors — goes through Householder ``qr_svd`` instead.

Work is batched by shape: all modules with the same (out, in, r) across all adapters go through
one batched call, in chunks small enough to stay in cache (and be reused by the allocator),
on CUDA (Householder path) when the device resolves to it.
"""
from __future__ import annotations

import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch

from lorasearch.devices import torch_device
from lorasearch.errors import BadAdapterError, UsageError
from lorasearch.types import CanonicalAdapter, CanonicalModule, LoraAdapter, LoraModule

# Upper bound on the elements of B and Aᵀ stacked into one batched call (float32: 4 B each), so
# canonicalizing thousands of large adapters does not need them all in memory at once.
# 4M (16 MiB) measured 1.5-2x faster than 32M on the CPU path: temporaries stay under glibc's
# mmap threshold (reused, not page-faulted afresh) and mostly in L3.
_MAX_BATCH_ELEMENTS = 4 * 1024 * 1024
# CholeskyQR2 acceptance: κ_F(R₁) = ‖R₁‖_F‖R₁⁻¹‖_F (≥ κ₂, ~5κ₂ for geometric spectra) and
# ‖Q₁ᵀQ₁ − I‖_F. Above these the float32 Gram has lost too many digits; the module is redone by
# Householder QR. Measured: κ₂ ≤ 3e3 accepted and 3-8x closer to the float64 SVD than
# Householder float32; κ₂ ≥ 5e3 rejected.
_CHOLQR_MAX_COND = 1e4
_CHOLQR_MAX_DEPARTURE = 0.5
# Below this rank Householder is a short loop and beat CholeskyQR2 (r=8: 0.75x; r=16: 1.15x,
# r=32: 1.37x CPU time on SD1.5 shapes).
_CHOLQR_MIN_RANK = 16

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(device="auto") -> torch.device:
    """``lorasearch.devices.resolve_device`` as a ``torch.device`` (kept here for older callers)."""
    return torch_device(device)


@contextmanager
def single_thread(device: torch.device | None = None):
    """Run torch CPU work on one thread, restoring the previous count afterwards.

    The linear algebra here is many small matrices (one LAPACK call per module, skinny matmuls):
    threads gain little, and on a busy machine their OpenMP barriers made canonicalizing an SD1.5
    adapter take 1.5–33 s instead of 0.56 s (measured on a shared 2-core box). Parallelism belongs
    one level up (several adapters or processes at once). CUDA work is left alone.
    """
    if device is not None and torch.device(device).type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise UsageError(f"canonical dtype must be float32 or float64, not {dtype}")
        return dtype
    name = np.dtype(dtype).name
    if name not in _DTYPES:
        raise UsageError(f"canonical dtype must be float32 or float64, not {dtype!r}")
    return _DTYPES[name]


def qr_svd(B: torch.Tensor, A: torch.Tensor, scale: torch.Tensor):
    """Batched canonical SVD of ΔW = scale·B·A: B ``[n, out, r]``, A ``[n, r, in]``, scale ``[n]``.

    Returns U ``[n, out, k]``, sigma ``[n, k]`` (descending), V ``[n, in, k]`` with
    k = min(r, out, in), sign rule and rank tolerance applied. Everything stays on B's device.
    Householder QR: exact for any factors (the reference and fallback of ``cholqr2_svd``).
    """
    return _finish(*_qr_core(B, A, scale), B.shape[1], A.shape[2])


def _qr_core(B, A, scale):
    Q_b, R_b = torch.linalg.qr(B, mode="reduced")                  # [n,out,kb], [n,kb,r]
    Q_a, R_a = torch.linalg.qr(A.transpose(1, 2), mode="reduced")  # [n,in,ka], [n,ka,r]
    M = (R_b @ R_a.transpose(1, 2)) * scale[:, None, None]         # [n,kb,ka]
    Ut, S, Vth = torch.linalg.svd(M, full_matrices=False)
    return Q_b @ Ut, S, Q_a @ Vth.transpose(1, 2)


def _cholqr2(X: torch.Tensor):
    """X ``[n, m, r]`` float32, m ≥ r → Q₁ (float32), R₂, R = R₂R₁ (float64), accepted ``[n]``.

    X = Q₁R₁ from the Cholesky factor of XᵀX, then Q₁ = Q R₂ again; the caller forms Q = Q₁R₂⁻¹
    only as Q₁·(R₂⁻¹Ũ), so Q itself is never written.
    """
    G1 = (X.mT @ X).double()
    L1, info1 = torch.linalg.cholesky_ex(G1)
    eye = torch.eye(X.shape[2], dtype=G1.dtype, device=G1.device).expand_as(G1)
    R1inv = torch.linalg.solve_triangular(L1.mT, eye, upper=True)
    Q1 = X @ R1inv.to(X.dtype)
    G2 = (Q1.mT @ Q1).double()
    L2, info2 = torch.linalg.cholesky_ex(G2)
    cond = torch.linalg.matrix_norm(L1) * torch.linalg.matrix_norm(R1inv)
    departure = torch.linalg.matrix_norm(G2 - eye)
    # written so that NaN (a failed factorization) rejects the module
    ok = (info1 == 0) & (info2 == 0) & (cond <= _CHOLQR_MAX_COND) & (departure <= _CHOLQR_MAX_DEPARTURE)
    return Q1, L2.mT, L2.mT @ L1.mT, ok


def cholqr2_svd(B: torch.Tensor, A: torch.Tensor, scale: torch.Tensor):
    """``qr_svd`` for float32 factors of rank ≥ 16 by CholeskyQR2; other inputs, and modules it
    cannot take exactly, go through ``qr_svd`` (see the module docstring). Same arguments and results."""
    r = B.shape[2]
    if B.dtype != torch.float32 or r < _CHOLQR_MIN_RANK or B.shape[1] < r or A.shape[2] < r:
        return qr_svd(B, A, scale)
    Q_b, R2_b, R_b, ok_b = _cholqr2(B)
    Q_a, R2_a, R_a, ok_a = _cholqr2(A.mT)
    ok = ok_b & ok_a
    # rejected modules may hold inf/NaN: give them a harmless core; they are redone below
    eye = torch.eye(B.shape[2], dtype=R_b.dtype, device=R_b.device)
    R_b, R_a, R2_b, R2_a = (torch.where(ok[:, None, None], R, eye) for R in (R_b, R_a, R2_b, R2_a))
    M = (R_b @ R_a.mT) * scale.to(R_b.dtype)[:, None, None]
    Ut, S, Vth = torch.linalg.svd(M, full_matrices=False)
    # U = Q Ũ = Q₁ (R₂⁻¹ Ũ), V likewise: r×r solves in float64, one float32 GEMM each
    U = Q_b @ torch.linalg.solve_triangular(R2_b, Ut, upper=True).to(B.dtype)
    V = Q_a @ torch.linalg.solve_triangular(R2_a, Vth.mT, upper=True).to(B.dtype)
    S = S.to(B.dtype)
    if not bool(ok.all()):
        bad = torch.nonzero(~ok).flatten()
        U[bad], S[bad], V[bad] = _qr_core(B[bad], A[bad], scale[bad])
    return _finish(U, S, V, B.shape[1], A.shape[2])


def _finish(U, S, V, out: int, inn: int):
    """Rank tolerance and sign rule, in place on U and V (see the module docstring)."""
    # Numerical rank, numpy.linalg.matrix_rank's convention: σ ≤ σ_max·max(out, in)·eps.
    eps = torch.finfo(S.dtype).eps
    tol = S[:, :1] * (max(out, inn) * eps)
    keep = (S > tol) & (S > 0)
    S = torch.where(keep, S, torch.zeros_like(S))
    # Sign rule: largest-|·| entry of each U column positive, V column flipped with it. For
    # k ≥ 16 the column max and min decide it without an |U| temporary (4-10x faster than
    # abs+argmax there; slower for k = 8); an exact tie between +x and −x (or a zero column) is
    # settled by argmax, which takes the first such entry, as the k < 16 route does.
    if U.shape[2] >= 16:
        hi, lo = U.amax(dim=1), -U.amin(dim=1)
        sign = torch.where(hi > lo, 1.0, -1.0).to(U.dtype)
        tie = ~((hi > lo) | (hi < lo))
    else:
        tie = torch.ones(U.shape[0], U.shape[2], dtype=torch.bool, device=U.device)
    if bool(tie.any()):
        idx = U.abs().argmax(dim=1, keepdim=True)
        first = torch.sign(torch.gather(U, 1, idx))[:, 0]
        first = torch.where(first == 0, torch.ones_like(first), first)
        sign = first if U.shape[2] < 16 else torch.where(tie, first, sign)
    mask = (sign * keep.to(U.dtype))[:, None, :]                  # 0 zeroes undetermined columns
    return U.mul_(mask), S, V.mul_(mask)


def _group_key(m: LoraModule) -> tuple[int, int, int]:
    return (m.out_features, m.in_features, m.rank)


def canonicalize_many(adapters: list[LoraAdapter], device="auto", dtype="float32",
                      workers: int | None = None) -> list[CanonicalAdapter]:
    """Canonical forms of many adapters, batched QR/SVD per module shape (out, in, r).

    Outputs are numpy arrays in ``dtype`` (float32 by default; pass ``float64`` for a
    double-precision canonical form). Each result keeps ``raw`` = the input adapter. ``workers``:
    CPU threads (default: the cores this process may use; CUDA always runs one).
    """
    dev = resolve_device(device)
    tdt = _resolve_dtype(dtype)
    np_dt = np.float32 if tdt == torch.float32 else np.float64
    groups: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
    for ai, ad in enumerate(adapters):
        for mi, m in enumerate(ad.modules):
            if m.A.ndim != 2 or m.B.ndim != 2 or m.A.shape[0] != m.B.shape[1]:
                raise BadAdapterError(ad.path, f"module {m.name} has factor shapes A{tuple(m.A.shape)} "
                                      f"B{tuple(m.B.shape)}, expected A [r, in] and B [out, r]")
            groups[_group_key(m)].append((ai, mi))

    out: list[list[CanonicalModule | None]] = [[None] * len(ad.modules) for ad in adapters]
    jobs = []
    for (o, i, r), members in groups.items():
        step = max(1, _MAX_BATCH_ELEMENTS // max(1, (o + i) * r))
        jobs += [((o, i), members[s:s + step]) for s in range(0, len(members), step)]

    def run(job):
        (o, i), chunk = job
        mods = [adapters[ai].modules[mi] for ai, mi in chunk]
        B = torch.from_numpy(np.stack([np.asarray(m.B, dtype=np_dt) for m in mods])).to(dev)
        A = torch.from_numpy(np.stack([np.asarray(m.A, dtype=np_dt) for m in mods])).to(dev)
        sc = torch.tensor([float(m.scale) for m in mods], dtype=tdt, device=dev)
        svd = cholqr2_svd if dev.type == "cpu" else qr_svd
        U, S, V = (t.cpu().numpy() for t in svd(B, A, sc))
        for j, ((ai, mi), m) in enumerate(zip(chunk, mods)):
            out[ai][mi] = CanonicalModule(
                name=m.name, U=np.ascontiguousarray(U[j]), sigma=np.ascontiguousarray(S[j]),
                V=np.ascontiguousarray(V[j]), shape=tuple(m.shape) or (o, i))

    # CPU: one Python thread per core, each running single-threaded torch (set once, around the
    # pool: the thread count is process-wide). Independent chunks need no OpenMP barriers, so a
    # busy core slows only its own worker (SD1.5 r=32 x8: 1.78 s → 0.95 s on 2 cores).
    workers = min(len(jobs), workers or _cpu_count()) if dev.type == "cpu" else 1
    with single_thread(dev):
        if workers <= 1:
            for job in jobs:
                run(job)
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="lorasearch-canon") as pool:
                list(pool.map(run, jobs))
    return [CanonicalAdapter(family=ad.family, modules=mods, raw=ad) for ad, mods in zip(adapters, out)]


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def canonicalize(adapter: LoraAdapter, device="auto", dtype="float32") -> CanonicalAdapter:
    """Canonical form of one adapter (see module docstring); ``raw`` keeps the input."""
    return canonicalize_many([adapter], device=device, dtype=dtype)[0]


def dense_delta(module: LoraModule | CanonicalModule) -> np.ndarray:
    """The dense ΔW ``[out, in]`` in float64 (conv kernels stay flattened): for references and tests."""
    if isinstance(module, CanonicalModule):
        U = np.asarray(module.U, np.float64)
        return (U * np.asarray(module.sigma, np.float64)) @ np.asarray(module.V, np.float64).T
    return float(module.scale) * (np.asarray(module.B, np.float64) @ np.asarray(module.A, np.float64))
