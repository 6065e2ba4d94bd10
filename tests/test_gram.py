"""lorasearch.gram: the exact Gram matrix of ⟨ΔWᵢ, ΔWⱼ⟩_F from the factors equals the dense one."""
from __future__ import annotations

import numpy as np

from lorasearch import gram as G
from lorasearch.adapters.writers import delta_weight, random_adapter
from lorasearch.types import LoraAdapter, LoraModule


def _dense(ad) -> dict:
    return {(m.name, m.B.shape[0], m.A.shape[1]): delta_weight(m).reshape(m.B.shape[0], -1) for m in ad.modules}


def _dense_inner(a, b) -> float:
    da, db = _dense(a), _dense(b)
    return float(sum(np.sum(da[k] * db[k]) for k in da.keys() & db.keys()))


def test_gram_matches_dense_inner_products_across_ranks_scales_and_targets():
    ads = [random_adapter("minilm", rank=4, seed=0, targets=r"attention\.self\.(query|value)$"),
           random_adapter("minilm", rank=8, seed=1, alpha=16, targets=r"attention\.self\.query$"),
           random_adapter("minilm", rank=2, seed=2, alpha=1, targets=r"layer\.[0-2]\..*value$"),
           random_adapter("minilm", rank=4, seed=3, targets=r"output\.dense$")]   # shares nothing with 0..2
    Gm = G.gram(ads)
    want = np.array([[_dense_inner(a, b) for b in ads] for a in ads])
    np.testing.assert_allclose(Gm, want, rtol=1e-9, atol=1e-12)
    assert Gm[0, 3] == 0.0 and Gm[3, 3] > 0
    np.testing.assert_allclose(G.cross(ads[0], ads), want[0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose([G.sq_norm(a) for a in ads], np.diag(want), rtol=1e-9)


def test_same_name_other_shape_is_another_weight():
    rng = np.random.default_rng(0)
    m1 = LoraModule("x.v_proj", rng.standard_normal((2, 16)), rng.standard_normal((8, 2)), 1.0, shape=(8, 16))
    m2 = LoraModule("x.v_proj", rng.standard_normal((2, 16)), rng.standard_normal((4, 2)), 1.0, shape=(4, 16))
    a = LoraAdapter("a", "memory", "", "f", [m1])
    b = LoraAdapter("b", "memory", "", "f", [m2])
    Gm = G.gram([a, b])
    assert Gm[0, 1] == 0.0 and Gm[0, 0] > 0 and Gm[1, 1] > 0


def test_canonical_and_raw_factors_give_the_same_gram():
    from lorasearch.canonical import canonicalize_many

    ads = [random_adapter("minilm", rank=4 + 2 * i, seed=i, targets=r"attention\.self\.value$") for i in range(3)]
    canon = canonicalize_many(ads, device="cpu", dtype="float64")
    np.testing.assert_allclose(G.gram(canon), G.gram(ads), rtol=1e-7, atol=1e-12)
