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

Work is batched by shape: all modules with the same (out, in, r) across all adapters go through
one batched ``torch.linalg.qr`` / ``svd`` call, on CUDA when the device resolves to it.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import numpy as np
import torch

from lorasearch.errors import BadAdapterError, UnavailableError, UsageError
from lorasearch.types import CanonicalAdapter, CanonicalModule, LoraAdapter, LoraModule

# Upper bound on the elements of B and Aᵀ stacked into one batched call (float32: 4 B each), so
# canonicalizing thousands of large adapters does not need them all in memory at once.
_MAX_BATCH_ELEMENTS = 32 * 1024 * 1024

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` → cuda when available, else cpu; an explicit ``cuda`` without CUDA is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UnavailableError("device 'cuda' requested but torch reports no CUDA device")
    return dev


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
    """
    Q_b, R_b = torch.linalg.qr(B, mode="reduced")                  # [n,out,kb], [n,kb,r]
    Q_a, R_a = torch.linalg.qr(A.transpose(1, 2), mode="reduced")  # [n,in,ka], [n,ka,r]
    M = (R_b @ R_a.transpose(1, 2)) * scale[:, None, None]         # [n,kb,ka]
    Ut, S, Vth = torch.linalg.svd(M, full_matrices=False)
    U = Q_b @ Ut
    V = Q_a @ Vth.transpose(1, 2)
    # Numerical rank, numpy.linalg.matrix_rank's convention: σ ≤ σ_max·max(out, in)·eps.
    eps = torch.finfo(S.dtype).eps
    tol = S[:, :1] * (max(B.shape[1], A.shape[2]) * eps)
    keep = (S > tol) & (S > 0)
    S = torch.where(keep, S, torch.zeros_like(S))
    # Sign rule: largest-|·| entry of each U column positive, V column flipped with it.
    idx = U.abs().argmax(dim=1, keepdim=True)                     # [n,1,k]
    sign = torch.sign(torch.gather(U, 1, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    mask = sign * keep[:, None, :].to(U.dtype)                    # 0 zeroes undetermined columns
    return U * mask, S, V * mask


def _group_key(m: LoraModule) -> tuple[int, int, int]:
    return (m.out_features, m.in_features, m.rank)


def canonicalize_many(adapters: list[LoraAdapter], device="auto", dtype="float32") -> list[CanonicalAdapter]:
    """Canonical forms of many adapters, one batched QR/SVD per module shape (out, in, r).

    Outputs are numpy arrays in ``dtype`` (float32 by default; pass ``float64`` for a
    double-precision canonical form). Each result keeps ``raw`` = the input adapter.
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
    for (o, i, r), members in groups.items():
        step = max(1, _MAX_BATCH_ELEMENTS // max(1, (o + i) * r))
        for s in range(0, len(members), step):
            chunk = members[s:s + step]
            mods = [adapters[ai].modules[mi] for ai, mi in chunk]
            B = torch.from_numpy(np.stack([np.asarray(m.B, dtype=np_dt) for m in mods])).to(dev)
            A = torch.from_numpy(np.stack([np.asarray(m.A, dtype=np_dt) for m in mods])).to(dev)
            sc = torch.tensor([float(m.scale) for m in mods], dtype=tdt, device=dev)
            with single_thread(dev):
                U, S, V = (t.cpu().numpy() for t in qr_svd(B, A, sc))
            for j, ((ai, mi), m) in enumerate(zip(chunk, mods)):
                out[ai][mi] = CanonicalModule(
                    name=m.name, U=np.ascontiguousarray(U[j]), sigma=np.ascontiguousarray(S[j]),
                    V=np.ascontiguousarray(V[j]), shape=tuple(m.shape) or (o, i))
    return [CanonicalAdapter(family=ad.family, modules=mods, raw=ad) for ad, mods in zip(adapters, out)]


def canonicalize(adapter: LoraAdapter, device="auto", dtype="float32") -> CanonicalAdapter:
    """Canonical form of one adapter (see module docstring); ``raw`` keeps the input."""
    return canonicalize_many([adapter], device=device, dtype=dtype)[0]


def dense_delta(module: LoraModule | CanonicalModule) -> np.ndarray:
    """The dense ΔW ``[out, in]`` in float64 (conv kernels stay flattened): for references and tests."""
    if isinstance(module, CanonicalModule):
        U = np.asarray(module.U, np.float64)
        return (U * np.asarray(module.sigma, np.float64)) @ np.asarray(module.V, np.float64).T
    return float(module.scale) * (np.asarray(module.B, np.float64) @ np.asarray(module.A, np.float64))
