"""Issue 11: the subspace encoder (fitted projections + within-task whitening, numpy only) and the
``auto`` default that routes the MiniLM family to the shipped one and every other family to the sketch."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from lorasearch.adapters.writers import random_adapter
from lorasearch.canonical import canonicalize_many
from lorasearch.encoders import get_encoder
from lorasearch.encoders.subspace import SubspaceEncoder, fit, wccn
from lorasearch.errors import BadAdapterError, UsageError
from lorasearch.similarity import factors, pairwise_dense_cosine
from lorasearch.types import LoraAdapter, LoraModule

QV = r"attention\.self\.(query|value)$"


def combine(parts, name="mix"):
    """Σ_i c_i·ΔW_i as one adapter (factors concatenated, never dense)."""
    mods = []
    for m0 in parts[0][1].modules:
        As, Bs = [], []
        for c, ad in parts:
            m = ad.module(m0.name)
            As.append(m.A)
            Bs.append(m.B * np.float32(c * m.scale))
        mods.append(LoraModule(m0.name, np.concatenate(As).astype(np.float32),
                               np.concatenate(Bs, 1).astype(np.float32), 1.0, shape=m0.shape))
    return LoraAdapter(name, "memory", "", "minilm", mods)


def in_subspace(seed, rank=2, dim=8):
    """A MiniLM q/v adapter whose updates lie in fixed dim-dimensional left/right subspaces per module
    (LoRAs of one base share such subspaces; random 384-d directions would not)."""
    template = random_adapter("minilm", rank=rank, seed=0, targets=QV)
    rng = np.random.default_rng(seed)
    mods = []
    for i, m in enumerate(template.modules):
        base = np.random.default_rng(10_000 + i)
        Ub = np.linalg.qr(base.standard_normal((m.B.shape[0], dim)))[0]
        Vb = np.linalg.qr(base.standard_normal((m.A.shape[1], dim)))[0]
        B = Ub @ rng.standard_normal((dim, rank)) * 0.05
        A = rng.standard_normal((rank, dim)) @ Vb.T * 0.05
        mods.append(LoraModule(m.name, A.astype(np.float32), B.astype(np.float32), 1.0, shape=m.shape))
    return LoraAdapter(f"s{seed}", "memory", "", "minilm", mods)


@pytest.fixture(scope="module")
def collection():
    """Tasks with nuisance: adapter = task update + Σ_j c_j·n_j, three nuisance updates shared by
    every task with random coefficients ~2× the task's size (as a learning rate, text pool or shot
    count would move every task's update alike). Dense cosine is dominated by the nuisance."""
    tasks = [in_subspace(100 + t) for t in range(12)]
    nuis = [in_subspace(200 + j) for j in range(3)]
    rng = np.random.default_rng(0)
    ads, lab = [], []
    for t in range(12):
        for rep in range(6):
            c = rng.standard_normal(3) * 2.0
            ads.append(combine([(1.0, tasks[t])] + [(c[j], nuis[j]) for j in range(3)], f"t{t}r{rep}"))
            lab.append(f"t{t}")
    return ads, np.array(lab), None


@pytest.fixture(scope="module")
def fitted(collection):
    ads, lab, _ = collection
    train = np.flatnonzero(np.isin(lab, [f"t{t}" for t in range(8)]))
    return fit([factors(a) for a in ads], lab, train, k=8, lam=0.1, m=768, res_dim=32, beta=0.05)


def hit_at_1(E, lab, q):
    S = E[q] @ E.T
    S[np.arange(len(q)), q] = -np.inf
    return float(np.mean(lab[np.argmax(S, 1)] == lab[q]))


def test_unseen_tasks_retrieved_better_than_dense_cosine(collection, fitted):
    """Whitening learned on 8 tasks removes the pool nuisance for the 4 tasks it never saw."""
    ads, lab, _ = collection
    test = np.flatnonzero(np.isin(lab, [f"t{t}" for t in range(8, 12)]))
    E, _ = fitted.embed(ads)
    dense = pairwise_dense_cosine(ads, ads, device="cpu")
    S = dense[test].copy()
    S[np.arange(len(test)), test] = -np.inf
    dense_hit = float(np.mean(lab[np.argmax(S, 1)] == lab[test]))
    ours = hit_at_1(E, lab, test)
    assert ours >= 0.9 and ours > dense_hit + 0.2, (ours, dense_hit)


def test_wccn_shrinks_within_class_directions():
    rng = np.random.default_rng(0)
    n = 400
    lab = rng.integers(0, 20, n)
    centers = rng.standard_normal((20, 2)) * [1.0, 0.0]        # classes differ along axis 0 only
    X = centers[lab] + rng.standard_normal((n, 2)) * [0.1, 3.0]  # big within-class spread on axis 1
    T = wccn(X, lab, 0.1)
    Y = X @ T
    within = lambda Z, ax: np.mean([Z[lab == c, ax].var() for c in range(20)])
    assert within(Y, 1) / within(Y, 0) < 0.1 * within(X, 1) / within(X, 0)


def test_invariances_and_paths_agree(collection, fitted):
    ad = collection[0][5]
    v = fitted.embed([ad])[0][0]
    rng = np.random.default_rng(1)
    mods = []
    for m in ad.modules:                              # B → BG, A → G⁻¹A, then pad the rank with zeros
        G = rng.standard_normal((m.rank, m.rank)) + 3 * np.eye(m.rank)
        A = np.concatenate([np.linalg.inv(G) @ m.A, np.zeros((2, m.A.shape[1]))]).astype(np.float32)
        B = np.concatenate([m.B @ G, rng.standard_normal((m.B.shape[0], 2))], 1).astype(np.float32)
        mods.append(LoraModule(m.name, A, B * np.float32(4.0), m.scale, shape=m.shape))
    same = dataclasses.replace(ad, modules=mods)
    assert np.allclose(fitted.embed([same])[0][0], v, atol=1e-4)
    assert np.allclose(fitted.encode(canonicalize_many([ad], device="cpu"))[0], v, atol=1e-4)
    assert np.allclose(fitted.embed(canonicalize_many([ad], device="cpu"))[0][0], v, atol=1e-4)
    assert fitted.embed([ad])[1][0] == pytest.approx(np.sqrt(sum(
        float(np.sum((m.scale * m.B.astype(np.float64) @ m.A) ** 2)) for m in ad.modules)), rel=1e-5)


def test_modules_it_never_saw_still_compare(fitted):
    """Only FFN modules (no training slot): the residual sketch carries them; disjoint modules ≈ 0."""
    ffn = random_adapter("minilm", rank=4, seed=7, targets=r"intermediate\.dense$")
    ffn2 = dataclasses.replace(ffn, modules=[dataclasses.replace(m, B=m.B * np.float32(2.0)) for m in ffn.modules])
    qv = random_adapter("minilm", rank=4, seed=8, targets=QV)
    E, norms = fitted.embed([ffn, ffn2, qv])
    assert np.linalg.norm(E[0]) == pytest.approx(1.0, abs=1e-5)
    # disjoint modules: dense cosine 0; the 32-d residual sketch adds noise of order 1/√32
    assert E[0] @ E[1] == pytest.approx(1.0, abs=1e-5) and abs(E[0] @ E[2]) < 0.2
    # q/v + FFN in one adapter: the FFN half is not drowned (it enters whole, not with weight β)
    part = in_subspace(9)
    f = np.float32(norms[0] / fitted.embed([part])[1][0])         # the q/v half as large as the FFN half
    both = dataclasses.replace(qv, modules=[dataclasses.replace(m, B=m.B * f) for m in part.modules] + list(ffn.modules))
    Eb, nb = fitted.embed([both])
    assert nb[0] ** 2 == pytest.approx(2 * norms[0] ** 2, rel=1e-4)
    assert Eb[0] @ E[0] > 0.35                     # FFN share of ‖ΔW‖² is ½; with weight β it would be ~0.05
    zero = dataclasses.replace(qv, modules=[dataclasses.replace(m, B=m.B * 0) for m in qv.modules])
    Ez, nz = fitted.embed([zero])
    assert not Ez.any() and nz == [0.0]


def test_save_load_roundtrip_and_damaged_checkpoint(fitted, collection, tmp_path):
    ads = collection[0][:6]
    fitted.config = {}
    fitted.save(tmp_path / "ck", extra={"retrieval": {"fusion_weight": 0.25}})
    enc = get_encoder(f"subspace:{tmp_path / 'ck'}")
    assert enc.spec == f"subspace:{(tmp_path / 'ck').resolve()}" and enc.dim == fitted.dim
    assert enc.version.startswith("1-") and enc.config["retrieval"]["fusion_weight"] == 0.25
    assert np.allclose(enc.embed(ads)[0], fitted.embed(ads)[0], atol=2e-3)   # P stored in float16
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["hyperparameters"]["slots"] = cfg["hyperparameters"]["slots"][:-1]
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadAdapterError, match="do not match"):
        get_encoder(f"subspace:{tmp_path / 'ck'}")
    with pytest.raises(UsageError, match="needs a checkpoint"):
        get_encoder("subspace")


def test_fit_refuses_nothing_to_learn():
    with pytest.raises(UsageError):
        fit([{}], np.array(["a"]), np.array([0]))


# ----------------------------------------------------------------------------- auto
def test_auto_routes_minilm_to_the_shipped_subspace_and_the_rest_to_the_sketch():
    auto = get_encoder()
    assert auto.spec == "auto" and auto.dim == 1024
    assert "minilm=subspace:minilm-x@" in auto.version
    mini = random_adapter("minilm", rank=4, seed=3, targets=QV)
    sd = random_adapter("sd15", rank=4, seed=3, targets=r"attn2\.to_[kv]")
    E, norms = auto.embed([sd, mini, sd])
    sub = get_encoder("subspace:minilm-x")
    assert isinstance(sub, SubspaceEncoder) and sub.dim == 1024
    assert np.allclose(E[1], sub.embed([mini])[0][0], atol=1e-6)
    assert np.allclose(E[0], get_encoder("sketch").embed([sd])[0][0], atol=1e-6) and np.allclose(E[0], E[2])
    assert np.allclose(auto.encode(canonicalize_many([sd, mini], device="cpu")), E[:2], atol=1e-4)
    assert auto.ranking_weight_for("sd1") == 0.0
    assert auto.ranking_weight_for("minilm") == sub.config["retrieval"]["fusion_weight"]
    with pytest.raises(UsageError):
        get_encoder("auto:x")


def test_hostile_values_fail_with_the_file_named(fitted):
    """Factors whose products overflow float32 in the residual sketch, or NaN: one-line error naming
    the adapter's file, never a vector with inf/NaN in the index."""
    ad = random_adapter("minilm", rank=4, seed=5, targets=QV)
    big = dataclasses.replace(ad, path="/data/big.safetensors",
                              modules=[dataclasses.replace(m, B=m.B * np.float32(1e30)) for m in ad.modules])
    with pytest.raises(BadAdapterError, match="big.safetensors"):
        fitted.embed([big])
    nan = dataclasses.replace(ad, path="/data/nan.safetensors",
                              modules=[dataclasses.replace(m, A=m.A * np.float32(np.nan)) for m in ad.modules])
    with pytest.raises(BadAdapterError, match="nan.safetensors"):
        fitted.embed([nan])


def test_mixed_shapes_fit_save_load_and_the_size_guard(tmp_path, monkeypatch):
    """Weights of several shapes (an SD UNet's attention): k_s = min(k, out, in) per weight, the
    checkpoint stores them one by one; a fit that would not fit in memory is refused up front."""
    import lorasearch.encoders.subspace as sub

    ads = [random_adapter("sd15", rank=2, seed=s, targets=r"down_blocks\.0\.attentions\.0\..*attn[12]\.to_[qk]$")
           for s in range(12)]
    assert len({m.shape for m in ads[0].modules}) > 1
    lab = np.array([f"c{s % 3}" for s in range(12)])
    enc = fit([factors(a) for a in ads], lab, np.arange(12), k=4, m=64, res_dim=16)
    enc.save(tmp_path / "ck")
    back = get_encoder(f"subspace:{tmp_path / 'ck'}")
    assert [u.shape for u in back.U] == [u.shape for u in enc.U]
    assert np.allclose(back.embed(ads[:3])[0], enc.embed(ads[:3])[0], atol=2e-3)
    monkeypatch.setattr(sub, "MAX_FEATURES", 8)
    with pytest.raises(UsageError, match="features"):
        fit([factors(a) for a in ads], lab, np.arange(12), k=4)
