"""Issue 11 training pieces: hard-negative batches (same pool, other LFs; same LF, other pools),
the residual encoder (sketch + α·learned, α = 0 is the sketch), and the validation choice helper."""
from __future__ import annotations

import numpy as np
import pytest

from lorasearch.adapters.writers import random_adapter
from lorasearch.canonical import canonicalize_many
from lorasearch.encoders import get_encoder
from lorasearch.encoders.base import Encoder
from lorasearch.encoders.residual import ResidualEncoder
from lorasearch.encoders.train import TrainConfig, _batches
from lorasearch.eval.learned import choose, query_path_scores


def test_hard_batches_pair_one_pool_under_many_lfs_with_the_same_lfs_elsewhere():
    rng = np.random.default_rng(0)
    lfs = [f"lf{i}" for i in range(12)]
    pools = [f"p{j}" for j in range(5)]
    labels = np.array([lf for lf in lfs for p in pools for _ in range(2)])
    groups = np.array([p for lf in lfs for p in pools for _ in range(2)])
    cfg = TrainConfig(batch_size=32, group_size=4)
    batches = _batches(np.arange(len(labels)), labels, cfg, rng, groups)
    assert len(batches) == len(labels) // 32
    for b in batches:
        lab, grp = labels[b], groups[b]
        # one pool shared by several LFs in the batch: hard negatives
        shared = max(set(grp.tolist()), key=lambda g: len(set(lab[grp == g])))
        assert len(set(lab[grp == shared])) >= 4
        # every LF in the batch also appears on another pool: positives across pools
        for lf in set(lab.tolist()):
            assert len(set(grp[lab == lf])) >= 2
    # without groups: the old same-label grouping
    plain = _batches(np.arange(len(labels)), labels, cfg, np.random.default_rng(0))
    assert sorted(np.concatenate(plain).tolist()) == list(range(len(labels)))


class Toy(Encoder):
    name, dim = "toy", 3

    def encode(self, adapters):
        x = np.array([[len(a.modules), a.modules[0].sigma[0], 1.0] for a in adapters], np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_residual_encoder_is_the_sketch_at_alpha_0_and_mixes_cosines():
    ads = canonicalize_many([random_adapter("minilm", rank=r, seed=s, targets=r"attention\.self\.value$")
                             for s, r in ((0, 2), (1, 4), (2, 8))])
    sk = get_encoder("sketch")
    S = sk.encode(ads)
    T = Toy().encode(ads)
    for a in (0.0, 0.3, 1.0):
        Z = ResidualEncoder(sk, Toy(), a).encode(ads)
        np.testing.assert_allclose(np.linalg.norm(Z, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(Z @ Z.T, (1 - a) * (S @ S.T) + a * (T @ T.T), atol=1e-5)
    with pytest.raises(Exception):
        ResidualEncoder(sk, Toy(), 1.5)


def test_choose_prefers_the_first_value_on_ties_and_query_path_scores_rerank_the_top():
    assert choose((0.0, 0.5, 1.0), lambda v: {0.0: 0.4, 0.5: 0.6, 1.0: 0.6}[v]) == (0.5, 0.6)
    assert choose((0.0, 1.0), lambda v: float("nan"))[0] == 0.0
    E = np.eye(4, dtype=np.float32)[[0, 0, 1, 2]] + 0.01
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    dense = np.array([[1, .2, .9, .1], [.2, 1, .3, .4], [.9, .3, 1, .5], [.1, .4, .5, 1]])
    S = query_path_scores(E, dense, np.array([0]), np.array([1, 2, 3]), w=0.0, depth=2)
    # top-2 by the encoder are 1 and (2 or 3); they are re-scored by dense, the third stays below
    assert S[0, 0] == pytest.approx(0.2) and S[0].max() <= 1.0 and sorted(S[0])[0] < -8


def test_sketch_residual_starts_as_the_sketch_and_learns_a_metric_that_carries_to_unseen_labels(tmp_path):
    import torch

    from lorasearch.encoders.checkpoint import save_model
    from lorasearch.encoders.sketch_residual import SketchResidual, train_sketch_residual
    from lorasearch.eval.learned import val_eval
    from lorasearch.query import ranking_weight

    rng = np.random.default_rng(0)
    n_cls, per, d = 30, 8, 32
    centers = np.zeros((n_cls, d))
    centers[:, :6] = rng.standard_normal((n_cls, 6))           # the label lives in 6 dims …
    labels = np.repeat([f"c{i}" for i in range(n_cls)], per)
    X = centers[np.repeat(np.arange(n_cls), per)] * 0.5 + rng.standard_normal((n_cls * per, d)) * \
        np.r_[np.full(6, 0.2), np.full(d - 6, 1.0)]            # … the pool-like nuisance in the rest
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    groups = np.array([f"p{i % 4}" for i in range(len(X))])
    tr, va = np.arange(20 * per), np.arange(20 * per, n_cls * per)   # validation labels never trained on
    res = train_sketch_residual(X, labels, groups, tr, va, val_eval, epochs=60, rank=8, patience=20)
    init, best = res["summary"]["init"]["val_ndcg@10"], res["summary"]["final"]["val_ndcg@10"]
    assert best > init + 0.05 and res["summary"]["best_epoch"] > 0
    fresh = SketchResidual(d, 8)
    np.testing.assert_array_equal(fresh(torch.from_numpy(X)).detach().numpy(), X)   # B = 0: the sketch itself
    # a checkpoint round trip through the registry; the query path treats it as learned
    save_model(tmp_path / "ck", "sketchres", SketchResidual(1024, 4), extra={"retrieval": {"fusion_weight": 0.5}})
    enc = get_encoder(f"sketchres:{tmp_path / 'ck'}")
    ads = canonicalize_many([random_adapter("minilm", rank=2, seed=s, targets=r"attention\.self\.value$") for s in (0, 1)])
    np.testing.assert_allclose(enc.encode(ads), get_encoder("sketch").encode(ads), atol=1e-6)
    assert ranking_weight(enc) == 0.5 and enc.spec == f"sketchres:{(tmp_path / 'ck').resolve()}"


def test_shipped_sketch_residual_and_its_residual_mix_load_by_name():
    from lorasearch.encoders.checkpoint import shipped
    from lorasearch.query import ranking_weight

    assert "sketchres:minilm-x" in shipped()
    enc, mix = get_encoder("sketchres:minilm-x"), get_encoder("residual:minilm-x")
    assert enc.spec == "sketchres:minilm-x" and mix.spec == "residual:minilm-x"
    assert mix.dim == enc.dim + get_encoder("sketch").dim and 0.0 <= mix.alpha <= 1.0
    assert ranking_weight(enc) == enc.config["retrieval"]["fusion_weight"]
    assert ranking_weight(mix) == mix.config["residual"]["fusion_weight"]
    ads = canonicalize_many([random_adapter("minilm", rank=2, seed=s, targets=r"attention\.self\.value$") for s in (0, 1)])
    Z = mix.encode(ads)
    np.testing.assert_allclose(np.linalg.norm(Z, axis=1), 1.0, atol=1e-5)
