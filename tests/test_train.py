"""Training: objectives, augmentation, determinism, early stopping, the `train` command."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lorasearch.adapters.writers import random_adapter, write_adapter
from lorasearch.canonical import canonicalize_many
from lorasearch.data.manifest import write_manifest
from lorasearch.encoders import get_encoder
from lorasearch.encoders.augment import augment_canonical
from lorasearch.encoders.train import TrainConfig, distill_loss, embed, supcon_loss, train_encoder
from lorasearch.eval.retrieval import training_evaluator
from lorasearch.encoders.w2t import W2T
from lorasearch.similarity import pairwise_dense_cosine
from lorasearch.similarity import delta_cosine
from lorasearch.types import LoraAdapter, LoraModule

torch.set_num_threads(1)
TINY_W2T = {"proj_dim": 32, "hidden": 32}
TINY_GLNET = {"proj_dim": 32, "equiv_dim": 8, "hidden": 32, "inv_dim": 32}


def labelled_set(n_per: int = 10, n_labels: int = 3, seed: int = 0, noise: float = 0.6):
    """n_labels random base adapters (MiniLM q/v); each member = its base's factors + noise, rank 2–8."""
    rng = np.random.default_rng(seed)
    bases = [random_adapter("minilm", rank=4, seed=100 + k, targets=r"layer\.[0-2]\.attention\.self\.(query|value)$")
             for k in range(n_labels)]
    ads, labels, targets = [], [], []
    for k, base in enumerate(bases):
        for _ in range(n_per):
            r = int(rng.choice([2, 4, 8]))
            mods = []
            for m in base.modules:
                A = np.zeros((r, m.A.shape[1]), np.float32)
                B = np.zeros((m.B.shape[0], r), np.float32)
                A[:min(r, 4)], B[:, :min(r, 4)] = m.A[:r], m.B[:, :r]
                A += noise * rng.standard_normal(A.shape).astype(np.float32) / np.sqrt(A.shape[1])
                B += 0.02 * noise * rng.standard_normal(B.shape).astype(np.float32)
                mods.append(LoraModule(m.name, A, B, 1.0, shape=m.shape))
            ads.append(LoraAdapter("", "memory", "", base.family, mods))
            labels.append(f"task{k}")
            targets.append(float(k) + 0.1 * rng.standard_normal())
    return ads, labels, targets


@pytest.fixture(scope="module")
def data():
    ads, labels, targets = labelled_set()
    return canonicalize_many(ads, device="cpu"), labels, targets


def cfg(**kw):
    base = dict(encoder="w2t", epochs=8, batch_size=12, seed=0, device="cpu", val_frac=0.3, patience=50,
                augment=False, model=TINY_W2T)
    base.update(kw)
    return TrainConfig(**base)


def test_supcon_training_lowers_loss_and_improves_retrieval(data):
    canon, labels, _ = data
    res = train_encoder(canon, cfg(), labels=labels, log=lambda s: None, evaluator=training_evaluator())
    h = res["history"]
    assert h[-1]["train_loss"] < h[1]["train_loss"]
    s = res["summary"]
    assert s["final"]["val_ndcg@10"] > s["init"]["val_ndcg@10"] + 0.1   # held-out adapters retrieve better


def test_training_is_deterministic_with_a_seed(data):
    canon, labels, _ = data
    a = train_encoder(canon, cfg(epochs=2, augment=True), labels=labels, log=lambda s: None)
    b = train_encoder(canon, cfg(epochs=2, augment=True), labels=labels, log=lambda s: None)
    for k, v in a["model"].state_dict().items():
        torch.testing.assert_close(v, b["model"].state_dict()[k], rtol=0, atol=0)
    c = train_encoder(canon, cfg(epochs=2, augment=True, seed=1), labels=labels, log=lambda s: None)
    assert any(not torch.equal(v, c["model"].state_dict()[k]) for k, v in a["model"].state_dict().items())


@pytest.mark.parametrize("objective,encoder", [("classify", "glnet"), ("regress", "glnet"), ("supcon", "glnet")])
def test_other_objectives_and_glnet(data, objective, encoder):
    canon, labels, targets = data
    res = train_encoder(canon, cfg(encoder=encoder, objective=objective, model=TINY_GLNET, epochs=10),
                        labels=labels, targets=targets, log=lambda s: None)
    h = res["history"]
    assert np.isfinite(h[-1]["train_loss"]) and h[-1]["train_loss"] < h[1]["train_loss"]
    assert res["summary"]["final"]["val_loss"] < res["summary"]["init"]["val_loss"]


def test_distill_pulls_embeddings_towards_the_dense_geometry(data):
    canon, labels, _ = data
    dense = torch.from_numpy(pairwise_dense_cosine(canon, canon, device="cpu")).float()
    torch.manual_seed(0)
    before = distill_loss(embed(W2T(**TINY_W2T), canon, "cpu"), dense)
    res = train_encoder(canon, cfg(distill=5.0, epochs=6), labels=labels, log=lambda s: None,
                        evaluator=training_evaluator())
    after = distill_loss(embed(res["model"], canon, "cpu"), dense)
    assert after < 0.5 * before


def test_training_without_an_evaluator_monitors_the_validation_loss(data):
    canon, labels, _ = data
    res = train_encoder(canon, cfg(epochs=2), labels=labels, log=lambda s: None)
    assert "val_loss" in res["summary"]["final"] and "val_ndcg@10" not in res["summary"]["final"]


def test_early_stopping_keeps_best_epoch(data):
    canon, labels, _ = data
    res = train_encoder(canon, cfg(epochs=30, patience=1, lr=5e-2), labels=labels, log=lambda s: None,
                        evaluator=training_evaluator())
    s = res["summary"]
    assert s["epochs_run"] < 30 and s["best_epoch"] <= s["epochs_run"]
    best = max(r["val_ndcg@10"] for r in res["history"] if r["epoch"] <= s["epochs_run"])
    assert s["final"]["val_ndcg@10"] == pytest.approx(best, abs=1e-6)


def test_supcon_loss():
    labels = torch.tensor([0, 0, 1, 1])
    good = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
    bad = good[[0, 2, 1, 3]]
    assert supcon_loss(good, labels) < supcon_loss(bad, labels)
    z = torch.randn(3, 4, requires_grad=True)            # one label only: no negatives, still finite
    loss = supcon_loss(torch.nn.functional.normalize(z, dim=1), torch.tensor([0, 0, 0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    ev = training_evaluator()
    assert ev(good.numpy(), good.numpy(), np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1]))["hit@1"] == 1.0


def test_augmentation_keeps_the_update(data):
    canon, _, _ = data
    rng = np.random.default_rng(0)
    aug = augment_canonical(canon[:6], rng, p=1.0)
    assert any(a is not c for a, c in zip(aug, canon[:6]))
    for a, c in zip(aug, canon[:6]):
        assert delta_cosine(a, c) > 0.999      # GL, padding and fp16/bf16 rounding leave ΔW


def test_train_command_writes_a_usable_checkpoint(tmp_path):
    ads, labels, targets = labelled_set(n_per=6)
    rows = []
    for i, (ad, lab, t) in enumerate(zip(ads, labels, targets)):
        ad.family = "minilm"
        write_adapter(ad, tmp_path / "coll" / f"a{i}.safetensors", "peft-file", dtype="F32")
        rows.append({"id": f"a{i}", "path": f"a{i}.safetensors", "label": lab, "role": "gallery", "accuracy": t})
    write_manifest(rows, tmp_path / "coll")
    from lorasearch.eval.train_cli import train

    out = tmp_path / "ck"
    r = CliRunner().invoke(train, ["--encoder", "w2t", "--collection", str(tmp_path / "coll"), "--out", str(out),
                                   "--epochs", "2", "--batch-size", "8", "--hidden", "32", "--device", "cpu",
                                   "--holdout", "task2", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["n_train"] + summary["n_val"] == 12 and summary["classes"] == ["task0", "task1"]
    cfgj = json.loads((out / "config.json").read_text())
    assert cfgj["encoder"] == "w2t" and cfgj["families"] == ["minilm"] and cfgj["training"]["holdout"] == ["task2"]
    assert len(json.loads((out / "loss_curve.json").read_text())) == 3 and "task0" in (out / "CARD.md").read_text()
    enc = get_encoder(f"w2t:{out}")
    X = enc.encode(canonicalize_many(ads[:3], device="cpu"))
    assert X.shape == (3, 32)
    r = CliRunner().invoke(train, ["--encoder", "flatvec_pca", "--collection", str(tmp_path / "coll"),
                                   "--out", str(tmp_path / "pca"), "--k", "4"])
    assert r.exit_code == 0, r.output
    assert get_encoder(f"flatvec_pca:{tmp_path / 'pca'}").encode(canonicalize_many(ads[:2], device="cpu")).shape == (2, 4)
    r = CliRunner().invoke(train, ["--encoder", "subspace", "--collection", str(tmp_path / "coll"),
                                   "--out", str(tmp_path / "sub"), "--json"])
    assert r.exit_code == 0, r.output
    sub = get_encoder(f"subspace:{tmp_path / 'sub'}")
    assert json.loads(r.stdout.strip().splitlines()[-1])["n_train"] == 18 and sub.config["families"] == ["minilm"]
    E, _ = sub.embed(ads[:3])
    assert E.shape == (3, 1024) and np.allclose(np.linalg.norm(E, axis=1), 1.0, atol=1e-5)
    r = CliRunner().invoke(train, ["--collection", str(tmp_path / "nope"), "--out", str(out)])
    assert r.exit_code == 66 and "no manifest" in r.stderr


@pytest.mark.gpu
def test_trains_on_cuda(data):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    canon, labels, _ = data
    res = train_encoder(canon, cfg(device="cuda", epochs=3), labels=labels, log=lambda s: None)
    assert res["summary"]["device"].startswith("cuda") and np.isfinite(res["history"][-1]["train_loss"])
