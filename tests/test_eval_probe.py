"""The LoRA-WS probe protocol on small synthetic features: it learns signal and not noise."""
import numpy as np
import pytest

from lorasearch.errors import LorasearchError
from lorasearch.eval.probe import macro_auroc, probe, probe_representations, split_70_10_20




def _features(n=90, d=12, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n // classes)
    centers = 1.5 * rng.standard_normal((classes, d))
    return centers[y] + rng.standard_normal((n, d)), np.array([f"c{i}" for i in y]), rng


def test_split_is_70_10_20_disjoint_and_stratified():
    y = np.repeat(np.arange(4), 50)
    tr, va, te = split_70_10_20(y, seed=3)
    assert (len(tr), len(va), len(te)) == (140, 19, 41)
    assert len(set(tr) | set(va) | set(te)) == 200
    assert set(np.bincount(y[tr])) == {35}


def test_probe_beats_chance_on_signal_and_not_on_noise():
    X, labels, rng = _features()
    kw = dict(hidden=64, max_epochs=30, patience=5, batch=64)
    res = probe_representations({"signal": X, "noise": rng.standard_normal(X.shape)}, labels, seeds=3, **kw)
    sig, noise = res["methods"]["signal"], res["methods"]["noise"]
    assert res["version"] == 1 and res["kind"] == "probe"
    assert sig["chance"] == pytest.approx(1 / 3)
    assert sig["accuracy"]["mean"] >= 0.8 and sig["auroc"]["mean"] >= 0.9 and sig["f1"]["mean"] >= 0.75
    assert noise["accuracy"]["mean"] < 0.65 and noise["auroc"]["mean"] < 0.75
    assert len(sig["runs"]) == 3 and all(r["n_test"] == 19 for r in sig["runs"])
    # each seed is deterministic
    again = probe(X, labels, seeds=1, **kw)
    assert again["runs"][0]["accuracy"] == sig["runs"][0]["accuracy"]


def test_macro_auroc_by_hand():
    y = np.array([0, 0, 1, 1, 2])
    proba = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    # class 0 vs rest: positives (0.9, 0.2), negatives (0.1, 0.6, 0.1): pairs won 3 + 2 of 6 → 5/6
    # class 1: positives (0.8, 0.3), negatives (0.05, 0.7, 0.1): 3 + 2 of 6 → 5/6
    # class 2: positive 0.8 above all four negatives → 1
    assert macro_auroc(y, proba, 3) == pytest.approx((5 / 6 + 5 / 6 + 1) / 3)


def test_probe_refuses_degenerate_input():
    with pytest.raises(LorasearchError):
        probe(np.zeros((20, 3)), ["a"] * 20)
    with pytest.raises(LorasearchError):
        probe(np.zeros((6, 3)), ["a", "b"] * 3)
