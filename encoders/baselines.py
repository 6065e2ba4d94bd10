"""The LoRA-WS baselines (Duszenko et al., "Towards weight-space interpretation of Low-Rank
Adapters for Diffusion Models"), each usable as an ``Encoder``.

    flatvec            every module's A then B (scale folded into B), flattened, concatenated
    flatvec_pca        FlatVecPCA@K: FlatVec projected on the top K principal components of a gallery
    stats_flatvec      7 statistics of the whole flat vector (mean, std, median, min, max, kurtosis, skew)
    stats_layer        the 7 statistics of every A and every B, concatenated (2·7 per module)
    stats_layer_dense  the 7 statistics of every dense ΔW = scale·B@A, concatenated (7 per module)

They read the *raw* factors (``needs_raw``): they exist to show what raw-factor features do
(they change under B→BG, A→G⁻¹A although ΔW does not). Each works on one family with a
fixed module list (the "layout": module names, ranks and shapes, sorted by name), taken from
``fit`` or, when not fitted, from the first adapters encoded. A module absent from an adapter
is zeros (ΔW = 0); a lower rank is zero-padded; a module or rank beyond the layout is an error.
With rank-1 to_q/to_v SD1.5 adapters the dims are the paper's: 99,648 / K / 7 / 896 / 448.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lorasearch.encoders.base import Encoder, l2_normalize, register
from lorasearch.errors import IncompatibleError, UsageError
from lorasearch.types import CanonicalAdapter, LoraAdapter, LoraModule

N_STATS = 7


def stats(x, n_stats: int = N_STATS) -> np.ndarray:
    """mean, std, median, min, max (+ excess kurtosis and skew when ``n_stats`` is 7) of all values.

    Written with torch (a dense SD1.5 ΔW set is 47M values per adapter; numpy's float64 median
    is ~10× slower) rather than scipy, to keep the base install light. Population (biased)
    moments; the lower median for an even count; kurtosis and skew are 0 for a constant input.
    """
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).reshape(-1).float()
    if x.numel() == 0:
        return np.zeros(n_stats, np.float32)
    mean = x.double().mean()                 # float64 mean; the centred moments in float32 are ample
    c = x - mean.float()
    c2 = c * c
    var = c2.double().mean()
    std = var.sqrt()
    out = [mean, std, x.median().double(), x.min().double(), x.max().double()]
    if n_stats == 7:
        if std > 0:
            out += [(c2 * c2).double().mean() / var ** 2 - 3.0, (c2 * c).double().mean() / std ** 3]
        else:
            out += [torch.zeros((), dtype=torch.float64)] * 2
    return torch.stack(out).float().numpy()


def _raw(adapter: CanonicalAdapter | LoraAdapter, who: str) -> LoraAdapter:
    if isinstance(adapter, LoraAdapter):
        return adapter
    if adapter.raw is None:
        raise UsageError(f"encoder {who} reads the raw LoRA factors, but this canonical adapter has none "
                         "(canonicalize with raw kept)")
    return adapter.raw


class LayoutBaseline(Encoder):
    """Shared machinery: the fixed module list and the per-adapter feature function."""

    needs_raw = True

    def __init__(self, layout: list | None = None, family: str | None = None, path: str | None = None):
        self.layout = [tuple(x) for x in layout] if layout else None   # (name, rank, out, in)
        self.family = family
        self.path = path
        if self.layout:
            self.dim = self.feature_dim()

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.path}" if self.path else self.name

    # --- layout ---------------------------------------------------------------------------
    def fit(self, adapters) -> "LayoutBaseline":
        """Fix the module list from these adapters (the union of their modules, max rank)."""
        raws = [_raw(a, self.name) for a in adapters]
        if not raws:
            raise UsageError(f"{self.name}: fitting needs at least one adapter")
        fams = sorted({r.family for r in raws})
        if len(fams) > 1:
            raise IncompatibleError(f"{self.name}: one layout per family, got {', '.join(fams)}")
        mods: dict[str, tuple] = {}
        for r in raws:
            for m in r.modules:
                prev = mods.get(m.name)
                rank = max(m.rank, prev[1] if prev else 0)
                mods[m.name] = (m.name, rank, m.out_features, m.in_features)
        self.layout = sorted(mods.values())
        self.family = fams[0]
        self.dim = self.feature_dim()
        return self

    def _check(self, raw: LoraAdapter) -> dict[str, LoraModule]:
        if self.family and raw.family != self.family:
            raise IncompatibleError(f"{raw.path or 'adapter'}: family {raw.family!r}, but {self.name} "
                                    f"was fitted on {self.family!r}")
        known = {name: (rank, o, i) for name, rank, o, i in self.layout}
        mods = {}
        for m in raw.modules:
            if m.name not in known:
                raise IncompatibleError(f"{raw.path or 'adapter'}: module {m.name} is not in the "
                                        f"{self.name} layout ({len(known)} modules)")
            rank, o, i = known[m.name]
            if m.rank > rank or m.out_features != o or m.in_features != i:
                raise IncompatibleError(f"{raw.path or 'adapter'}: module {m.name} is rank {m.rank} "
                                        f"{m.out_features}x{m.in_features}; layout has rank {rank} {o}x{i}")
            mods[m.name] = m
        return mods

    # --- features ---------------------------------------------------------------------------
    def feature_dim(self) -> int:
        raise NotImplementedError

    def adapter_features(self, mods: dict[str, LoraModule]) -> np.ndarray:
        raise NotImplementedError

    def features(self, adapters) -> np.ndarray:
        """Unnormalized features ``[n, dim]`` (the probes standardize these themselves)."""
        raws = [_raw(a, self.name) for a in adapters]
        if self.layout is None:
            self.fit(raws)
        out = np.zeros((len(raws), self.dim), np.float32)
        for k, r in enumerate(raws):
            out[k] = self.adapter_features(self._check(r))
        return out

    def encode(self, adapters: list[CanonicalAdapter]) -> np.ndarray:
        if not adapters:
            return np.zeros((0, self.dim), np.float32)
        return l2_normalize(self.features(adapters))

    # --- persistence (a layout checkpoint; FlatVecPCA adds its PCA) ---------------------------------
    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {"layout_rank": torch.tensor([r for _, r, _, _ in self.layout], dtype=torch.int64)}

    def save(self, path, card: str | None = None) -> Path:
        from lorasearch.encoders.checkpoint import save_checkpoint

        if self.layout is None:
            raise UsageError(f"{self.name}: nothing to save before fit()")
        self.path = str(path)
        return save_checkpoint(path, self.name, self.extra_tensors(), self.hyperparameters(),
                               version=self.version, extra={"families": [self.family], "layout": self.layout},
                               card=card or f"# {self.name}\n\nLayout of {len(self.layout)} modules "
                                            f"of family {self.family}, dim {self.dim}.\n")

    def hyperparameters(self) -> dict:
        return {}

    @classmethod
    def load(cls, path) -> "LayoutBaseline":
        from lorasearch.encoders.checkpoint import read_checkpoint

        config, tensors = read_checkpoint(path, expect=cls.name)
        enc = cls(layout=config["layout"], family=(config.get("families") or [None])[0], path=str(path),
                  **config.get("hyperparameters", {}))
        enc.load_tensors(tensors)
        import hashlib   # the fitted state's hash in the version: a refit at the same path is noticed
        enc.version = f"{enc.version}-{hashlib.sha256((Path(path) / 'model.safetensors').read_bytes()).hexdigest()[:12]}"
        return enc

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass


def _padded(m: LoraModule | None, rank: int, o: int, i: int) -> tuple[np.ndarray, np.ndarray]:
    A = np.zeros((rank, i), np.float32)
    B = np.zeros((o, rank), np.float32)
    if m is not None:
        A[: m.rank] = m.A.reshape(m.rank, -1)
        B[:, : m.rank] = m.B.reshape(o, m.rank) * np.float32(m.scale)
    return A, B


class FlatVec(LayoutBaseline):
    name = "flatvec"

    def feature_dim(self) -> int:
        return sum(r * (o + i) for _, r, o, i in self.layout)

    def adapter_features(self, mods):
        parts = []
        for name, r, o, i in self.layout:
            A, B = _padded(mods.get(name), r, o, i)
            parts += [A.ravel(), B.ravel()]
        return np.concatenate(parts)


class FlatVecPCA(FlatVec):
    """FlatVec centred on the gallery mean and projected on its top-K principal axes."""

    name = "flatvec_pca"

    def __init__(self, layout=None, family=None, path=None, k: int = 200, seed: int = 0):
        self.k, self.seed = int(k), int(seed)
        self.mean = self.components = None
        super().__init__(layout, family, path)

    def feature_dim(self) -> int:
        return self.k

    def hyperparameters(self) -> dict:
        return {"k": self.k, "seed": self.seed}

    def fit(self, adapters) -> "FlatVecPCA":
        """Fix the layout, then PCA of the gallery's flat vectors (randomized SVD, seeded)."""
        super().fit(adapters)
        X = torch.from_numpy(self._flat(adapters_as_raw(adapters, self.name)))
        if self.k > min(X.shape):
            raise UsageError(f"flatvec_pca: K={self.k} is more than min(n adapters, dim) = {min(X.shape)}")
        mean = X.mean(0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            _, S, V = torch.svd_lowrank(X - mean, q=min(self.k + 10, min(X.shape)), niter=6)
        comps = V[:, : self.k].T.contiguous()                       # [k, d]
        signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
        self.components = comps * torch.where(signs == 0, 1.0, signs)   # deterministic signs
        self.mean = mean
        self.explained = (S[: self.k] ** 2 / max(1, X.shape[0] - 1))
        return self

    def features(self, adapters) -> np.ndarray:
        if self.components is None:
            raise UsageError("flatvec_pca needs a fitted PCA: --encoder flatvec_pca:PATH "
                             "(fit one with `lorasearch train --encoder flatvec_pca`)")
        flat = self._flat(adapters_as_raw(adapters, self.name))
        return ((torch.from_numpy(flat) - self.mean) @ self.components.T).numpy()

    def _flat(self, raws: list[LoraAdapter]) -> np.ndarray:
        out = np.zeros((len(raws), FlatVec.feature_dim(self)), np.float32)
        for k, r in enumerate(raws):
            out[k] = FlatVec.adapter_features(self, self._check(r))
        return out

    def extra_tensors(self):
        t = super().extra_tensors()
        t.update(mean=self.mean, components=self.components, explained_variance=self.explained)
        return t

    def load_tensors(self, tensors):
        self.mean, self.components = tensors["mean"], tensors["components"]
        self.explained = tensors.get("explained_variance")


def adapters_as_raw(adapters, who: str) -> list[LoraAdapter]:
    return [_raw(a, who) for a in adapters]


class StatsFlatVec(LayoutBaseline):
    """Statistics of all the adapter's raw values; needs no layout (dim is always 7)."""

    name = "stats_flatvec"

    def __init__(self, layout=None, family=None, path=None, n_stats: int = N_STATS):
        self.n_stats = n_stats
        super().__init__(layout, family, path)
        self.dim = n_stats

    def feature_dim(self) -> int:
        return self.n_stats

    def features(self, adapters) -> np.ndarray:
        out = np.zeros((len(adapters), self.n_stats), np.float32)
        for k, r in enumerate(adapters_as_raw(adapters, self.name)):
            vals = [m.A.ravel() for m in r.modules] + [(m.B * np.float32(m.scale)).ravel() for m in r.modules]
            out[k] = stats(np.concatenate(vals) if vals else np.zeros(0), self.n_stats)
        return out


class StatsLayer(LayoutBaseline):
    name = "stats_layer"

    def __init__(self, layout=None, family=None, path=None, n_stats: int = N_STATS):
        self.n_stats = n_stats
        super().__init__(layout, family, path)

    def hyperparameters(self):
        return {"n_stats": self.n_stats}

    def feature_dim(self) -> int:
        return 2 * self.n_stats * len(self.layout)

    def adapter_features(self, mods):
        parts = []
        for name, _, _, _ in self.layout:
            m = mods.get(name)
            if m is None:
                parts.append(np.zeros(2 * self.n_stats, np.float32))
            else:   # the stats of the stored matrices (zero padding would bias them)
                parts += [stats(m.A, self.n_stats), stats(m.B * np.float32(m.scale), self.n_stats)]
        return np.concatenate(parts)


class StatsLayerDense(StatsLayer):
    name = "stats_layer_dense"

    def feature_dim(self) -> int:
        return self.n_stats * len(self.layout)

    def adapter_features(self, mods):
        parts = []
        for name, _, _, _ in self.layout:
            m = mods.get(name)
            if m is None:
                parts.append(np.zeros(self.n_stats, np.float32))
            else:
                B = torch.from_numpy(np.ascontiguousarray(m.B.reshape(m.out_features, m.rank), np.float32))
                A = torch.from_numpy(np.ascontiguousarray(m.A.reshape(m.rank, -1), np.float32))
                parts.append(stats(float(m.scale) * (B @ A), self.n_stats))
        return np.concatenate(parts)


def _factory(cls):
    def make(arg: str | None) -> Encoder:
        return cls.load(arg) if arg else cls()
    return make


for _cls in (FlatVec, StatsFlatVec, StatsLayer, StatsLayerDense):
    register(_cls.name)(_factory(_cls))


@register("flatvec_pca")
def _pca_factory(arg: str | None) -> Encoder:
    if not arg:
        raise UsageError("encoder 'flatvec_pca' needs a fitted PCA: --encoder flatvec_pca:PATH "
                         "(fit one with `lorasearch train --encoder flatvec_pca --collection DIR --out PATH`)")
    return FlatVecPCA.load(arg)
