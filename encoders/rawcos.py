"""RawCos: the W2T paper's non-invariant baseline, as an index encoder.

It embeds the raw factors A and B exactly as stored (scale not applied), flattened, so inner
products of its vectors estimate the dot product of the concatenated raw factors — the quantity
``lorasearch.similarity.pairwise_rawcos`` computes exactly. It changes under B→BG, A→G⁻¹A although
ΔW does not; it exists so benchmarks can show what canonicalization buys.

Each factor is oriented as ``[big, r]`` (B as is, A transposed) and tensor-sketched into ``dim``
buckets: entry (i, j) goes to bucket (h₁(i) + h₂(j)) mod dim with sign s₁(i)·s₂(j). That is an
unbiased count sketch whose hash tables cost O(big + r) per factor instead of O(big·r); the
circular shift by h₂ is applied in the Fourier domain. Hashes are keyed by (module, factor,
shape), so factors of different shapes (e.g. different ranks) land independently and contribute
0 in expectation, as in ``pairwise_rawcos``.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from lorasearch.encoders.base import Encoder, l2_normalize, register
from lorasearch.canonical import single_thread
from lorasearch.encoders.sketch import buckets_and_signs, parse_args, stable_seed
from lorasearch.errors import UsageError
from lorasearch.types import CanonicalAdapter


@lru_cache(maxsize=65536)
def _hashes(name: str, factor: str, shape: tuple, dim: int, seed: int):
    big, small = (shape[1], shape[0]) if factor == "A" else shape
    h1, s1 = buckets_and_signs(stable_seed("rawcos.rows", name, factor, shape, dim, seed), big, dim)
    h2, s2 = buckets_and_signs(stable_seed("rawcos.cols", name, factor, shape, dim, seed), small, dim)
    return torch.from_numpy(h1), torch.from_numpy(s1), torch.from_numpy(h2), torch.from_numpy(s2)


@lru_cache(maxsize=8)
def _phases(dim: int) -> torch.Tensor:
    """exp(-2πi·k·h/dim) for k in the rfft frequencies and every shift h: ``[dim//2+1, dim]``."""
    k = torch.arange(dim // 2 + 1, dtype=torch.float64)[:, None]
    h = torch.arange(dim, dtype=torch.float64)[None, :]
    ang = -2 * torch.pi * k * h / dim
    return torch.polar(torch.ones_like(ang), ang)


class RawCosEncoder(Encoder):
    name = "rawcos"
    version = "1"
    needs_raw = True

    def __init__(self, dim: int = 512, seed: int = 0):
        if dim < 2:
            raise UsageError(f"rawcos dim must be at least 2 (got {dim})")
        self.dim, self.seed = int(dim), int(seed)

    @property
    def spec(self) -> str:
        args = [f"{k}={v}" for k, v, d in (("dim", self.dim, 512), ("seed", self.seed, 0)) if v != d]
        return self.name + (":" + ",".join(args) if args else "")

    def encode(self, adapters: list[CanonicalAdapter]) -> np.ndarray:
        dim, E = self.dim, _phases(self.dim)
        out = np.zeros((len(adapters), dim), np.float64)
        if any(ad.raw is None for ad in adapters):
            raise UsageError("the rawcos encoder needs raw factors, but a canonical adapter has no .raw")
        with single_thread():
            for ai, ad in enumerate(adapters):
                z = torch.zeros(dim // 2 + 1, dtype=torch.complex128)
                for m in ad.raw.modules:
                    for factor, X in (("A", m.A), ("B", m.B)):
                        h1, s1, h2, s2 = _hashes(m.name, factor, tuple(X.shape), dim, self.seed)
                        X = torch.as_tensor(np.asarray(X, np.float32))
                        X = X.T if factor == "A" else X                       # [big, r]
                        Y = torch.zeros(dim, X.shape[1], dtype=torch.float64)
                        Y.index_add_(0, h1, (X * s1[:, None]).double())      # count-sketch the rows
                        z += (torch.fft.rfft(Y, dim=0) * (E[:, h2] * s2.double())).sum(dim=1)
                out[ai] = torch.fft.irfft(z, n=dim).numpy()
        return l2_normalize(out)


@register("rawcos")
def _factory(arg: str | None) -> RawCosEncoder:
    return RawCosEncoder(**parse_args(arg, {"dim": int, "seed": int}))
