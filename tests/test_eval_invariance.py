"""Invariance curves (W2T Fig. 5): canonical methods stay at rounding level, raw factors drift."""
import numpy as np
import pytest

from lorasearch.adapters.writers import delta_weight, random_adapter
from lorasearch.errors import IncompatibleError
from lorasearch.eval.invariance import drift_curves, format_table, random_g, reparameterize



TARGETS = r"layer\.[01]\.attention\.self\.(query|value)"


def test_reparameterize_keeps_delta_w_and_changes_factors():
    ad = random_adapter("minilm", rank=4, targets=TARGETS, seed=1)
    rep, cond = reparameterize(ad, 1.0, np.random.default_rng(0))
    assert 1.0 < cond < 1e3
    for m, r in zip(ad.modules, rep.modules):
        d0, d1 = delta_weight(m), delta_weight(r)
        assert np.linalg.norm(d1 - d0) / np.linalg.norm(d0) < 1e-5
        assert np.linalg.norm(r.B - m.B) / np.linalg.norm(m.B) > 0.1
    same, cond0 = reparameterize(ad, 0.0, np.random.default_rng(0))
    assert cond0 == pytest.approx(1.0) and np.array_equal(same.modules[0].A, ad.modules[0].A)
    assert np.allclose(random_g(3, 0.0, np.random.default_rng(0), "additive"), np.eye(3))
    with pytest.raises(ValueError):
        random_g(3, 1.0, np.random.default_rng(0), "bogus")


def test_drift_curves_shape():
    ads = [random_adapter("minilm", rank=4, targets=TARGETS, seed=i) for i in range(12)]
    ts = (0.0, 0.5, 1.0, 2.0)
    res = drift_curves(ads, ("sketch", "rawcos", "dense"), ts, k=5, seed=0)
    assert res["kind"] == "invariance" and res["strengths"] == list(ts)
    assert res["cond_max"][0] == pytest.approx(1.0) and res["cond_max"][-1] > res["cond_max"][1]
    m = res["methods"]
    for canon in ("sketch", "dense"):
        assert max(m[canon]["drift_max"]) < 1e-6, canon          # rounding level at every strength
        assert min(m[canon]["overlap"]) >= 0.95, canon
    raw = m["rawcos"]["drift_mean"]
    assert raw[0] < 1e-9                                         # t = 0: the identity
    assert raw[1] > 1e-3 and raw[3] > raw[2] > raw[1]            # grows with the strength
    assert raw[3] > 100 * max(m["sketch"]["drift_max"])
    text = format_table(res)
    assert "rawcos" in text and "cond(G) max" in text


def test_needs_one_family():
    a = random_adapter("minilm", rank=2, targets=TARGETS, seed=0)
    b = random_adapter("sd15", rank=2, targets=r"down_blocks\.0\.attentions\.0\..*attn2\.to_[kv]", seed=0)
    with pytest.raises(IncompatibleError):
        drift_curves([a, b], ("dense",))
