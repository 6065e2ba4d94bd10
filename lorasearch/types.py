"""The core types every stage passes along: plain data, no behaviour beyond small helpers.

adapter file ──► LoraAdapter (raw factors) ──► CanonicalAdapter (U, σ, V) ──► encoder ──► vector
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class LoraModule:
    """One adapted weight: ΔW = scale · B @ A.

    name   the adapted weight's path in the base model, normalized across formats
           (e.g. ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``,
           ``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``,
           ``encoder.layer.0.attention.self.query``); the same module gets the same
           name whichever file format it came from.
    A      float32 ``[r, in]`` (a conv kernel ``[r, in, kh, kw]`` is flattened to ``[r, in*kh*kw]``)
    B      float32 ``[out, r]`` (conv ``[out, r, 1, 1]`` flattened)
    scale  alpha / r resolved once at load time (rsLoRA: alpha / sqrt(r))
    dtype  the dtype as stored in the file (``F16``, ``BF16``, ``F32`` …)
    shape  the shape of the adapted weight: ``(out, in)`` or ``(out, in, kh, kw)``
    alpha  the alpha that produced ``scale`` (for display)
    """

    name: str
    A: np.ndarray
    B: np.ndarray
    scale: float
    dtype: str = "F32"
    shape: tuple = ()
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])


@dataclass
class LoraAdapter:
    """A whole adapter file or folder, parsed.

    family   the base model it applies to (``sd1``, ``sd2``, ``sdxl``, ``sd3``, ``flux``,
             ``minilm`` …), inferred from module paths and shapes, never from which
             modules are targeted: adapters with the same family are always comparable.
    modules  ordered by name; a module absent here has ΔW = 0.
    """

    path: str
    format: str                      # peft | diffusers | diffusers-old | kohya | ...
    sha256: str
    family: str
    modules: list[LoraModule]
    size: int = 0                    # bytes on disk (file, or sum over the folder's files)
    metadata: dict[str, str] = field(default_factory=dict)   # safetensors __metadata__
    config: dict[str, Any] | None = None                      # PEFT adapter_config.json
    trigger_words: list[str] = field(default_factory=list)
    unknown_keys: list[str] = field(default_factory=list)     # reported, not silently dropped
    warnings: list[str] = field(default_factory=list)
    # False when the file does not say its alpha (a bare PEFT weights file without adapter_config.json):
    # the direction of ΔW is known, its norm only up to the unknown alpha/r
    scale_known: bool = True
    # set when the layout fits more than one base model (e.g. a CLIP-L-only LoRA: SD1.x or SDXL's first
    # text encoder); ``family`` is then the likelier one and this says which others fit
    family_note: str | None = None

    def module(self, name: str) -> LoraModule | None:
        for m in self.modules:
            if m.name == name:
                return m
        return None

    @property
    def ranks(self) -> dict[str, int]:
        return {m.name: m.rank for m in self.modules}


@dataclass
class CanonicalModule:
    """SVD of one module's ΔW from its factors: ΔW = U diag(sigma) Vᵀ.

    U ``[out, r]``, sigma ``[r]`` descending with the LoRA scale folded in, V ``[in, r]``;
    sign rule: the largest-|·| entry of each U column is positive (V flipped with it).
    """

    name: str
    U: np.ndarray
    sigma: np.ndarray
    V: np.ndarray
    shape: tuple = ()

    @property
    def rank(self) -> int:
        return int(self.sigma.shape[0])


@dataclass
class CanonicalAdapter:
    """The canonical form of an adapter; ``raw`` keeps the parsed factors for the baselines
    that exist to show why raw factors are the wrong thing to compare (RawCos, FlatVec)."""

    family: str
    modules: list[CanonicalModule]
    raw: LoraAdapter | None = None

    def module(self, name: str) -> CanonicalModule | None:
        for m in self.modules:
            if m.name == name:
                return m
        return None
