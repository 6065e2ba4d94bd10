"""Residual encoder: the training-free sketch plus a learned part that only adds what helped.

    z = [√(1−α) · sketch(x) ; √α · learned(x)]      (both halves L2-normalized, so ‖z‖ = 1)
    cos(z_a, z_b) = (1−α) · cos_sketch + α · cos_learned

α = 0 is exactly the sketch; α is chosen on validation tasks (never the test folds) and recorded
in the checkpoint's ``config.json`` (``residual.alpha``), so the learned part can only move the
ranking where that helped on tasks it was not trained on. The checkpoint is an ordinary W2T or
GL-net folder (``--encoder w2t:PATH`` reads the learned half alone).

    --encoder residual:PATH
"""
from __future__ import annotations

import math

import numpy as np

from lorasearch.encoders.base import Encoder, l2_normalize, register
from lorasearch.errors import BadAdapterError, UsageError


class ResidualEncoder(Encoder):
    name = "residual"

    def __init__(self, base: Encoder, learned: Encoder, alpha: float, path: str | None = None):
        if not (0.0 <= alpha <= 1.0 and math.isfinite(alpha)):
            raise UsageError(f"residual alpha must be in [0, 1], not {alpha}")
        self.base, self.learned, self.alpha, self.path = base, learned, float(alpha), path
        self.dim = base.dim + learned.dim
        self.version = f"{base.version}-{learned.version}-a{alpha:g}"
        self.config = getattr(learned, "config", None)

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.path}" if self.path else self.name

    def encode(self, adapters) -> np.ndarray:
        if not adapters:
            return np.zeros((0, self.dim), np.float32)
        a = l2_normalize(self.base.encode(adapters)) * np.float32(math.sqrt(1.0 - self.alpha))
        b = l2_normalize(self.learned.encode(adapters)) * np.float32(math.sqrt(self.alpha))
        return l2_normalize(np.concatenate([a, b], axis=1))


@register("residual")
def _factory(arg: str | None) -> Encoder:
    from lorasearch.encoders import get_encoder
    from lorasearch.encoders.checkpoint import read_checkpoint

    if not arg:
        raise UsageError("encoder 'residual' needs a checkpoint: --encoder residual:PATH")
    config, _ = read_checkpoint(_resolve(arg))
    res = config.get("residual")
    if not isinstance(res, dict) or "alpha" not in res:
        raise BadAdapterError(arg, "checkpoint has no residual.alpha in config.json (train it with eval/learned.py)")
    learned = get_encoder(f"{config['encoder']}:{arg}")
    enc = ResidualEncoder(get_encoder(res.get("base", "sketch")), learned, float(res["alpha"]),
                          path=getattr(learned, "path", arg))
    # the query-path fusion weight chosen on validation for the residual mix, not for the learned half
    enc.config = {**config, "retrieval": {"fusion_weight": float(res.get("fusion_weight", 0.0))}}
    return enc


def _resolve(arg: str):
    from pathlib import Path

    from lorasearch.encoders.checkpoint import SHIPPED

    p = Path(arg)
    if not p.exists() and "/" not in arg:
        for cand in sorted(SHIPPED.glob(f"*-{arg}")):
            return cand
    return p
