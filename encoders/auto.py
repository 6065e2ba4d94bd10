"""The default encoder: per base-model family, the best encoder that ships for it.

    auto = subspace:minilm-x  for the ``minilm`` family   (won on held-out tasks, issue 11)
           sketch             for every other family     (training-free, any base model)

Both give 1024-d vectors, and an index searches one family at a time, so the two kinds of vector
never meet. The index records ``auto`` with a version naming the routed checkpoints (their config
carries the weights' digest), so a changed checkpoint is noticed the way a changed encoder is.
A family's checkpoint is loaded the first time an adapter of that family is embedded: indexing or
querying SD adapters never reads it.

A family gets a learned encoder here only when that encoder beat sketch+re-rank on held-out tasks
through the query path (eval/results/learned.md); the learned part of the order is then kept by
``query`` with the fusion weight chosen on validation (``ranking_weight_for``).
"""
from __future__ import annotations

import json

import numpy as np

from lorasearch.encoders.base import Encoder, get_encoder, register

DIM = 1024
# family -> shipped encoder spec; each must give DIM-d vectors
ROUTES = {"minilm": "subspace:minilm-x"}


def _shipped_config(spec: str) -> dict | None:
    from lorasearch.encoders.checkpoint import SHIPPED

    name, _, arg = spec.partition(":")
    path = SHIPPED / f"{name}-{arg}" / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class AutoEncoder(Encoder):
    name = "auto"
    dim = DIM

    def __init__(self, device: str = "auto"):
        self.device = device
        self.routes = {}
        parts = []
        for fam, spec in sorted(ROUTES.items()):
            cfg = _shipped_config(spec)
            if cfg is None:          # an install without the checkpoint: that family keeps the sketch
                continue
            self.routes[fam] = spec
            parts.append(f"{fam}={spec}@{cfg.get('version', '1')}-{str(cfg.get('weights_sha256', ''))[:12]}")
        self.version = "1+" + ",".join(parts) if parts else "1"
        self._encoders: dict[str, Encoder] = {}

    @property
    def spec(self) -> str:
        return self.name

    def encoder_for(self, family: str) -> Encoder:
        spec = self.routes.get(family, "sketch")
        if spec not in self._encoders:
            enc = get_encoder(spec, device=self.device)
            if enc.dim != DIM:
                raise RuntimeError(f"encoder {spec} gives {enc.dim}-d vectors, auto needs {DIM}")
            self._encoders[spec] = enc
        return self._encoders[spec]

    def ranking_weight_for(self, family: str) -> float:
        from lorasearch.query import ranking_weight

        return ranking_weight(self.encoder_for(family)) if family in self.routes else 0.0

    def _route(self, adapters, call) -> tuple[np.ndarray, list]:
        out = np.zeros((len(adapters), DIM), np.float32)
        extra: list = [None] * len(adapters)
        groups: dict[str, list[int]] = {}
        for i, a in enumerate(adapters):
            groups.setdefault(self.routes.get(a.family, "sketch"), []).append(i)
        for spec, idx in groups.items():
            fam = adapters[idx[0]].family
            vecs, more = call(self.encoder_for(fam), [adapters[i] for i in idx])
            out[idx] = vecs
            for j, i in enumerate(idx):
                extra[i] = more[j] if more is not None else None
        return out, extra

    def embed(self, adapters, device="auto") -> tuple[np.ndarray, list[float]]:
        if not adapters:
            return np.zeros((0, DIM), np.float32), []
        return self._route(adapters, lambda enc, ads: enc.embed(ads, device=device))

    def encode(self, adapters) -> np.ndarray:
        if not adapters:
            return np.zeros((0, DIM), np.float32)
        return self._route(adapters, lambda enc, ads: (enc.encode(ads), None))[0]


@register("auto")
def _factory(arg: str | None, device: str = "auto") -> Encoder:
    from lorasearch.errors import UsageError

    if arg:
        raise UsageError("encoder 'auto' takes no argument (it picks the shipped encoder per family)")
    return AutoEncoder(device)
