"""The encoder interface and the registry by name.

An encoder turns canonical adapters into L2-normalized float32 vectors of a fixed size.
Encoders are named on the command line (``--encoder sketch``, ``--encoder w2t:PATH``);
``get_encoder`` resolves a spec to an instance. The index records ``encoder.spec`` and
``encoder.version`` and refuses to mix vectors from different encoders.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from lorasearch.errors import UsageError
from lorasearch.types import CanonicalAdapter


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


# name -> factory(arg or None) -> Encoder ; arg is the text after ':' in a spec like "w2t:PATH"
_REGISTRY: dict[str, Callable[[str | None], Encoder]] = {}

DEFAULT_ENCODER = "sketch"


def register(name: str):
    def deco(factory):
        _REGISTRY[name] = factory
        return factory
    return deco


def available() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_encoder(spec: str | None = None) -> Encoder:
    """Resolve ``"sketch"``, ``"rawcos"``, ``"w2t:/path/to/ckpt"`` … to an encoder instance."""
    _load_builtin()
    spec = spec or DEFAULT_ENCODER
    name, _, arg = spec.partition(":")
    if name not in _REGISTRY:
        raise UsageError(f"unknown encoder {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](arg or None)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def _load_builtin() -> None:
    # Importing the encoder modules registers them; kept lazy so `import lorasearch` stays light.
    import importlib

    for mod in ("sketch", "rawcos", "baselines", "w2t", "glnet", "residual", "sketch_residual"):
        try:
            importlib.import_module(f"lorasearch.encoders.{mod}")
        except ModuleNotFoundError as e:  # a module not written yet, not a missing dependency
            if e.name != f"lorasearch.encoders.{mod}":
                raise
