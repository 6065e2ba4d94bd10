"""The encoder interface and the registry by name.

An encoder turns adapters into L2-normalized float32 vectors of a fixed size. Its one entry
point is ``embed(adapters, device=...)`` on raw ``LoraAdapter``s, which also returns each
update's ‖ΔW‖_F: the default (here) canonicalizes first and calls ``encode`` on the canonical
forms (learned encoders); the sketch overrides it to work straight from the factors.
Encoders are named on the command line (``--encoder sketch``, ``--encoder w2t:PATH``);
``get_encoder`` resolves a spec to an instance. The index records ``encoder.spec`` and
``encoder.version`` and refuses to mix vectors from different encoders.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable

import numpy as np

from lorasearch.errors import UsageError
from lorasearch.types import CanonicalAdapter, LoraAdapter


class Encoder:
    name: str = "base"       # registry name
    version: str = "1"       # bump when the vectors change for the same input
    dim: int = 0
    needs_raw: bool = False  # True for baselines that read raw factors (CanonicalAdapter.raw)

    @property
    def spec(self) -> str:
        """What the index records and compares: the name plus any argument (e.g. a checkpoint)."""
        return self.name

    def encode(self, adapters: list[CanonicalAdapter]) -> np.ndarray:
        """float32 ``[len(adapters), dim]``, each row L2-normalized (a zero row stays zero)."""
        raise NotImplementedError

    def embed(self, adapters: list[LoraAdapter], device="auto") -> tuple[np.ndarray, list[float]]:
        """(float32 ``[n, dim]`` L2-normalized, ‖ΔW‖_F of each adapter) from raw adapters.

        Default: the canonical QR-SVD (``lorasearch.canonical``, torch) then ``encode``; the
        norm comes free from the canonical σ."""
        from lorasearch.canonical import canonicalize_many

        if not adapters:
            return np.zeros((0, self.dim), np.float32), []
        canon = canonicalize_many(adapters, device=device)
        norms = [float(np.sqrt(sum(float(np.sum(np.asarray(m.sigma, np.float64) ** 2)) for m in c.modules)))
                 for c in canon]
        return self.encode(canon), norms


# name -> factory(arg or None) -> Encoder ; arg is the text after ':' in a spec like "w2t:PATH"
_REGISTRY: dict[str, Callable[[str | None], Encoder]] = {}

DEFAULT_ENCODER = "auto"


def register(name: str):
    def deco(factory):
        _REGISTRY[name] = factory
        return factory
    return deco


def available() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_encoder(spec: str | None = None, device="auto") -> Encoder:
    """Resolve ``"sketch"``, ``"rawcos"``, ``"w2t:/path/to/ckpt"`` … to an encoder instance.

    ``device`` (auto, cpu, cuda, cuda:N) reaches factories that take it (the learned encoders
    place their model there). Only the named encoder's module is imported: the default sketch
    must not pull in torch through the learned encoders."""
    spec = spec or DEFAULT_ENCODER
    name, _, arg = spec.partition(":")
    if name not in _REGISTRY and name in _BUILTIN:
        _import_builtin(_BUILTIN[name])
    if name not in _REGISTRY:
        _load_builtin()
        if name not in _REGISTRY:
            raise UsageError(f"unknown encoder {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    factory = _REGISTRY[name]
    if "device" in inspect.signature(factory).parameters:
        return factory(arg or None, device=device)
    return factory(arg or None)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


# encoder name -> the module that registers it (imported on first use only)
_BUILTIN = {"sketch": "sketch", "rawcos": "rawcos", "flatvec_pca": "baselines", "w2t": "w2t", "glnet": "glnet",
            "residual": "residual", "sketchres": "sketch_residual", "subspace": "subspace", "auto": "auto"}


def _import_builtin(mod: str) -> None:
    try:
        importlib.import_module(f"lorasearch.encoders.{mod}")
    except ModuleNotFoundError as e:  # a module not written yet, not a missing dependency
        if e.name != f"lorasearch.encoders.{mod}":
            raise


def _load_builtin() -> None:
    # Importing the encoder modules registers them; kept lazy so `import lorasearch` stays light.
    for mod in dict.fromkeys(_BUILTIN.values()):
        _import_builtin(mod)
