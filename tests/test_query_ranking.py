"""Issue 11 cause 3: `query` keeps a learned encoder's order for `similar` results (or the fusion
``w·encoder + (1−w)·exact`` whose ``w`` the checkpoint records), while the exact ΔW cosine still
decides `exact` / `same-update`; the training-free default keeps exact re-ranking."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lorasearch.adapters.writers import random_adapter, write_adapter
from lorasearch.api import Lorasearch
from lorasearch.encoders.base import Encoder, register
from lorasearch.query import fused_score, ranking_weight

TARGETS = r"attention\.self\.(query|value)$"


class NormAngle(Encoder):
    """A toy 'learned' encoder whose order is not dense cosine's: the angle of the embedding is
    log ‖ΔW‖_F, so adapters of similar size look alike whatever their direction."""

    name = "toy-norm-angle"
    dim = 2

    def __init__(self, w):
        self.w = w
        self.config = {"encoder": "toy", "retrieval": {} if w is None else {"fusion_weight": w}}

    @property
    def spec(self):
        return f"{self.name}:{self.w}"

    def encode(self, adapters):
        norms = np.array([np.sqrt(sum(float(np.sum(m.sigma.astype(np.float64) ** 2)) for m in a.modules))
                          for a in adapters])
        th = np.log(np.maximum(norms, 1e-12))
        return np.stack([np.cos(th), np.sin(th)], 1).astype(np.float32)


register("toy-norm-angle")(lambda arg: NormAngle(None if arg in (None, "None") else float(arg)))


def _scaled(ad, factor, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    mods = []
    for m in ad.modules:
        B = m.B + noise * rng.standard_normal(m.B.shape).astype(m.B.dtype) * np.abs(m.B).mean()
        mods.append(dataclasses.replace(m, B=(factor * B).astype(m.B.dtype)))
    return dataclasses.replace(ad, modules=mods)


def _norm(ad):
    return np.sqrt(sum(float(np.sum((m.scale * m.B.astype(np.float64) @ m.A.astype(np.float64)) ** 2))
                       for m in ad.modules))


@pytest.fixture()
def folder(tmp_path):
    """q, its same-update copy in another format, `near` (dense cos ≈ 0.95, 5× the norm) and two
    unrelated adapters with q's norm (`far`) and twice it (`far2`)."""
    g = tmp_path / "g"
    g.mkdir()
    q = random_adapter("minilm", rank=4, seed=0, targets=TARGETS)
    n = _norm(q)
    far = random_adapter("minilm", rank=4, seed=1, targets=TARGETS)
    far2 = random_adapter("minilm", rank=4, seed=2, targets=TARGETS)
    for name, ad in (("q.safetensors", q), ("near.safetensors", _scaled(q, 5.0, noise=0.3)),
                     ("far.safetensors", _scaled(far, n / _norm(far))),
                     ("far2.safetensors", _scaled(far2, 2 * n / _norm(far2)))):
        write_adapter(ad, g / name, "peft-file", dtype="F32")
    write_adapter(q, g / "copy", "peft", dtype="F32")
    return g


def _query(tmp_path, folder, spec):
    with Lorasearch(tmp_path / f"idx-{spec}", encoder=spec, create=True) as ls:
        ls.index_dir(folder)
        return ls.query(folder / "q.safetensors", k=10)


def _names(res):
    return [h.path.rsplit("/", 1)[-1] for h in res.hits]


def test_learned_encoder_orders_similar_results_and_exact_cosine_keeps_match_kinds(tmp_path, folder):
    sketch = _query(tmp_path, folder, "sketch")
    learned = _query(tmp_path, folder, "toy-norm-angle")          # no weight recorded: encoder order
    # both: q itself is exact, its copy same-update (decided by the exact ΔW cosine)
    for res in (sketch, learned):
        assert [(n, h.match) for n, h in zip(_names(res), res.hits)][:2] == [("q.safetensors", "exact"),
                                                                            ("copy", "same-update")]
        assert all(h.match == "similar" and h.reranked for h in res.hits[2:])
    # sketch: exact re-ranking -> the dense-cosine order (near first)
    assert _names(sketch)[2:] == ["near.safetensors", "far.safetensors", "far2.safetensors"] or \
        _names(sketch)[2:] == ["near.safetensors", "far2.safetensors", "far.safetensors"]
    assert sketch.query.ranking == "exact"
    assert all(h.score == h.exact_cosine for h in sketch.hits)
    # learned: the encoder's order (same norm first, near last), scores are the encoder's cosines
    assert _names(learned)[2:] == ["far.safetensors", "far2.safetensors", "near.safetensors"]
    assert learned.query.ranking == "encoder"
    near = learned.hits[_names(learned).index("near.safetensors")]
    assert near.exact_cosine > 0.9 and near.score == pytest.approx(near.embedding_score, abs=1e-6)
    assert "exact_cosine" in learned.as_dict()["results"][0]


def test_fusion_weight_from_the_checkpoint_config(tmp_path, folder):
    res = _query(tmp_path, folder, "toy-norm-angle:0.3")
    assert res.query.ranking == "fusion w=0.3"
    assert [h.match for h in res.hits[:2]] == ["exact", "same-update"]
    for h in res.hits[2:]:
        assert h.score == pytest.approx(0.3 * h.embedding_score + 0.7 * h.exact_cosine, abs=2e-6)
    assert [h.score for h in res.hits[2:]] == sorted((h.score for h in res.hits[2:]), reverse=True)


def test_ranking_weight_rules():
    assert ranking_weight(object()) == 0.0                        # training-free: exact order
    assert ranking_weight(NormAngle(None)) == 1.0                 # learned, nothing recorded
    assert ranking_weight(NormAngle(0.25)) == 0.25
    assert ranking_weight(NormAngle(7.0)) == 1.0                  # clipped into [0, 1]
    assert fused_score(0.2, 0.8, 0.0) == 0.8
    np.testing.assert_allclose(fused_score(np.array([1.0, 0.0]), np.array([0.0, 1.0]), 0.25), [0.25, 0.75])


def test_default_auto_index_records_the_routed_checkpoint_and_keeps_match_kinds(tmp_path, folder):
    """The default (`auto`) sends MiniLM adapters to the shipped subspace encoder: the index records
    `auto` with that checkpoint's digest; `query` uses the checkpoint's fusion weight; the exact ΔW
    cosine still decides exact / same-update."""
    from lorasearch.encoders import get_encoder

    with Lorasearch(tmp_path / "idx", create=True) as ls:
        ls.index_dir(folder)
        res = ls.query(folder / "q.safetensors", k=10)
        recorded = ls.index.encoder
    sub = get_encoder("subspace:minilm-x")
    assert recorded["spec"] == "auto" and recorded["dim"] == 1024
    assert f"minilm=subspace:minilm-x@{sub.version}" in recorded["version"]
    w = sub.config["retrieval"]["fusion_weight"]
    assert res.query.encoder == "auto" and res.query.ranking == ("exact" if w == 0 else f"fusion w={w:g}")
    assert [(n, h.match) for n, h in zip(_names(res), res.hits)][:2] == [("q.safetensors", "exact"),
                                                                        ("copy", "same-update")]
    assert _names(res)[2] == "near.safetensors"       # dense cos ≈ 0.95: first of the similar ones
