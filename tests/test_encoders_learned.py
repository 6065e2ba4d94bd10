"""W2T, GL-net and the LoRA-WS baselines: invariance, mixed batches, checkpoints, dimensions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lorasearch.adapters.writers import random_adapter
from lorasearch.canonical import canonicalize, canonicalize_many
from lorasearch.encoders import get_encoder
from lorasearch.encoders.augment import gl_matrix
from lorasearch.encoders.baselines import FlatVec, FlatVecPCA, StatsFlatVec, StatsLayer, StatsLayerDense, stats
from lorasearch.encoders.checkpoint import save_model
from lorasearch.encoders.glnet import GLNet, GLNetEncoder
from lorasearch.encoders.tokenize import block_of, module_depths, module_type, tokenize
from lorasearch.encoders.w2t import W2T, W2TEncoder
from lorasearch.errors import BadAdapterError, IncompatibleError, MissingError, UsageError
from lorasearch.types import LoraAdapter, LoraModule

torch.set_num_threads(1)
SD_SMALL = r"down_blocks\.0\..*attn[12]\.to_[qv]$"     # 8 modules of SD1.5


def tiny_w2t(seed=0):
    torch.manual_seed(seed)
    m = W2T(proj_dim=64, hidden=32)
    with torch.no_grad():
        m.tokens.eps.fill_(0.7)   # let σ enter (the gate starts at 0 in training)
    return m


def tiny_glnet(seed=0):
    torch.manual_seed(seed)
    return GLNet(proj_dim=64, equiv_dim=8, n_layers=2, hidden=32, inv_dim=32)


def reparam(ad: LoraAdapter, seed: int, strength: float = 1.0) -> LoraAdapter:
    rng = np.random.default_rng(seed)
    mods = []
    for m in ad.modules:
        R = gl_matrix(m.rank, strength, rng)
        B = (m.B.astype(np.float64) @ R).astype(np.float32)
        A = np.linalg.solve(R, m.A.astype(np.float64)).astype(np.float32)
        mods.append(LoraModule(m.name, A, B, m.scale, m.dtype, m.shape, m.alpha))
    return LoraAdapter(ad.path, ad.format, ad.sha256, ad.family, mods)


@pytest.fixture(scope="module")
def mixed():
    ads = [random_adapter("minilm", rank=1, seed=1, targets=["query", "value"]),
           random_adapter("minilm", rank=16, seed=2),
           random_adapter("sd15", rank=4, seed=3, targets=SD_SMALL),
           random_adapter("minilm", rank=128, seed=4, targets=["layer.0.attention.self.query"])]
    return ads, canonicalize_many(ads, device="cpu")


def test_module_vocabulary_and_depth():
    assert module_type("unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_v") == "cross.v"
    assert module_type("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0") == "self.o"
    assert module_type("encoder.layer.3.attention.self.query") == "self.q"
    assert module_type("encoder.layer.3.output.dense") == "mlp.out"
    assert module_type("model.layers.2.mlp.gate_proj") == "mlp.gate"
    assert module_type("something.weird_thing").startswith("hash:")
    assert block_of("encoder.layer.3.attention.self.query") == "encoder.layer.3"
    names = [f"encoder.layer.{i}.attention.self.{p}" for i in (0, 2, 10) for p in ("query", "value")]
    assert module_depths(names) == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]   # natural order: 10 after 2


@pytest.mark.parametrize("make,cls", [(tiny_w2t, W2TEncoder), (tiny_glnet, GLNetEncoder)])
def test_shape_normalization_and_batch_independence(mixed, make, cls):
    _, canon = mixed
    enc = cls(make(), device="cpu")
    X = enc.encode(canon)
    assert X.shape == (4, 32) and X.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)
    alone = np.concatenate([enc.encode([c]) for c in canon])       # padding and masks change nothing
    np.testing.assert_allclose(X, alone, atol=2e-5)
    assert len({tuple(np.round(x, 4)) for x in X}) == 4
    assert enc.encode([]).shape == (0, 32)


@pytest.mark.parametrize("make,cls", [(tiny_w2t, W2TEncoder), (tiny_glnet, GLNetEncoder)])
def test_invariant_under_gl_reparameterization(mixed, make, cls):
    ads, canon = mixed
    enc = cls(make(), device="cpu")
    X = enc.encode(canon[:3])
    for seed in range(2):
        Y = enc.encode(canonicalize_many([reparam(a, seed) for a in ads[:3]], device="cpu"))
        assert np.abs(X - Y).max() < 1e-3, np.abs(X - Y).max()
        assert (X * Y).sum(1).min() > 0.99999


@pytest.mark.parametrize("make,cls", [(tiny_w2t, W2TEncoder), (tiny_glnet, GLNetEncoder)])
def test_invariant_under_rank_padding(mixed, make, cls):
    """B → [B, 0], A → [A; noise] is the same ΔW at a higher rank: the σ = 0 directions are dropped."""
    from lorasearch.encoders.augment import pad_rank

    ads, canon = mixed
    rng = np.random.default_rng(0)
    padded = [LoraAdapter(a.path, a.format, a.sha256, a.family,
                          [LoraModule(m.name, *reversed(pad_rank(m.B, m.A, 3, rng)), m.scale, shape=m.shape)
                           for m in a.modules]) for a in ads[:3]]
    assert padded[0].modules[0].rank == ads[0].modules[0].rank + 3
    enc = cls(make(), device="cpu")
    X, Y = enc.encode(canon[:3]), enc.encode(canonicalize_many(padded, device="cpu"))
    assert np.abs(X - Y).max() < 1e-3


def test_glnet_invariant_by_construction_on_raw_factors():
    """No canonical form: the features of (U R, V R⁻ᵀ) equal those of (U, V)."""
    net = tiny_glnet().double()
    rng = np.random.default_rng(0)
    U = torch.randn(5, 64, 6, dtype=torch.float64)
    V = torch.randn(5, 64, 6, dtype=torch.float64)
    R = torch.stack([torch.from_numpy(gl_matrix(6, 1.0, rng)) for _ in range(5)])
    t = torch.tensor([1, 2, 3, 3, 9])
    a = net.invariant_features(U, V, t)
    b = net.invariant_features(U @ R, V @ torch.linalg.inv(R).transpose(1, 2), t)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(net.invariant_features(U @ R, V @ R, t), a)   # a non-GL change is seen


def test_checkpoint_round_trip(tmp_path, mixed):
    _, canon = mixed
    model = tiny_w2t()
    before = W2TEncoder(model, device="cpu").encode(canon)
    save_model(tmp_path / "ck", "w2t", model, extra={"families": ["minilm", "sd1"]})
    assert {p.name for p in (tmp_path / "ck").iterdir()} >= {"config.json", "model.safetensors", "CARD.md"}
    enc = get_encoder(f"w2t:{tmp_path / 'ck'}")
    assert enc.spec == f"w2t:{tmp_path / 'ck'}" and enc.dim == 32
    np.testing.assert_array_equal(enc.encode(canon), before)
    g = tiny_glnet()
    save_model(tmp_path / "g", "glnet", g)
    np.testing.assert_array_equal(get_encoder(f"glnet:{tmp_path / 'g'}").encode(canon),
                                  GLNetEncoder(g, device="cpu").encode(canon))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(UsageError, match="needs a trained checkpoint"):
        get_encoder("w2t")
    with pytest.raises(MissingError, match="does not exist"):
        get_encoder(f"w2t:{tmp_path / 'nope'}")
    save_model(tmp_path / "g", "glnet", tiny_glnet())
    with pytest.raises(UsageError, match="not 'w2t'"):
        get_encoder(f"w2t:{tmp_path / 'g'}")
    (tmp_path / "g" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(BadAdapterError, match="safetensors"):
        get_encoder(f"glnet:{tmp_path / 'g'}")


def test_tokenize_is_width_independent(mixed):
    _, canon = mixed
    b = tokenize(canon, proj_dim=64)
    assert b.u.shape[-1] == b.v.shape[-1] == 64 and b.u.shape[1] == 128
    assert int(b.rank_mask.sum()) == sum(m.rank for c in canon for m in c.modules)


# ---- baselines ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_ws():
    """LoRA-WS layout: SD1.5, rank 1, alpha 1, to_q/to_v of all 32 attention blocks."""
    ads = [random_adapter("sd15", rank=1, seed=s, targets=r"attn[12]\.to_[qv]$") for s in range(6)]
    return canonicalize_many(ads, device="cpu")


def test_baseline_dimensions_match_the_paper(lora_ws):
    for cls, dim in ((FlatVec, 99648), (StatsFlatVec, 7), (StatsLayer, 896)):
        X = cls().encode(lora_ws)
        assert X.shape == (6, dim), cls.name
        np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)
    assert StatsLayerDense().fit(lora_ws).dim == 448     # encoding forms 47M-value ΔWs: see below
    small = canonicalize_many([random_adapter("sd15", rank=2, seed=s, targets=SD_SMALL) for s in range(2)],
                              device="cpu")
    X = StatsLayerDense().encode(small)
    assert X.shape == (2, 7 * 8) and np.isfinite(X).all()
    assert get_encoder("stats_layer").needs_raw


def test_flatvec_values_and_stats():
    x = np.array([1.0, 2.0, 3.0, 10.0])
    s = stats(x)
    assert s[:5].tolist() == pytest.approx([4.0, np.std(x), 2.0, 1.0, 10.0])   # lower median
    assert s[6] > 0   # right-skewed
    ad = random_adapter("minilm", rank=2, seed=0, targets=["layer.0.attention.self.query"], alpha=4.0)
    f = FlatVec().features([canonicalize(ad, device="cpu")])[0]
    m = ad.modules[0]
    np.testing.assert_allclose(f, np.concatenate([m.A.ravel(), (m.B * 2.0).ravel()]), rtol=1e-6)


def test_flatvec_pca_round_trip_and_errors(tmp_path, lora_ws):
    pca = FlatVecPCA(k=3, seed=0).fit(lora_ws)
    X = pca.encode(lora_ws)
    assert X.shape == (6, 3)
    pca.save(tmp_path / "pca")
    again = get_encoder(f"flatvec_pca:{tmp_path / 'pca'}")
    np.testing.assert_array_equal(again.encode(lora_ws), X)
    assert FlatVecPCA(k=3, seed=0).fit(lora_ws).encode(lora_ws) == pytest.approx(X, abs=1e-5)   # seeded
    with pytest.raises(UsageError, match="needs a fitted PCA"):
        get_encoder("flatvec_pca")
    other = canonicalize(random_adapter("minilm", rank=1, seed=0), device="cpu")
    with pytest.raises(IncompatibleError, match="family"):
        again.encode([other])
    no_raw = canonicalize(random_adapter("sd15", rank=1, seed=9, targets=SD_SMALL), device="cpu")
    no_raw.raw = None
    with pytest.raises(UsageError, match="raw"):
        FlatVec().encode([no_raw])


def test_raw_baselines_are_not_invariant(lora_ws):
    """What the canonical encoders avoid: FlatVec changes under B→BG, A→G⁻¹A (rank 4 here)."""
    ads = [random_adapter("minilm", rank=4, seed=s, targets=["query", "value"]) for s in range(2)]
    enc = FlatVec().fit(canonicalize_many(ads, device="cpu"))
    X = enc.encode(canonicalize_many(ads, device="cpu"))
    Y = enc.encode(canonicalize_many([reparam(a, 5) for a in ads], device="cpu"))
    assert (X * Y).sum(1).max() < 0.9


def test_shipped_checkpoint_names(tmp_path, monkeypatch, mixed):
    """`w2t:minilm` resolves to encoders/checkpoints/w2t-minilm when it is not a folder here."""
    from lorasearch.encoders import checkpoint

    monkeypatch.setattr(checkpoint, "SHIPPED", tmp_path)
    save_model(tmp_path / "w2t-toy", "w2t", tiny_w2t())
    monkeypatch.chdir(tmp_path / "w2t-toy")           # "toy" is not a folder from here
    assert checkpoint.shipped() == ["w2t:toy"]
    enc = get_encoder("w2t:toy")
    assert enc.spec == "w2t:toy" and enc.encode(mixed[1][:1]).shape == (1, 32)
    with pytest.raises(MissingError, match="shipped: w2t:toy"):
        get_encoder("w2t:other")


@pytest.mark.gpu
def test_cuda_matches_cpu(mixed):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = tiny_w2t()
    cpu = W2TEncoder(model, device="cpu").encode(mixed[1])
    gpu = W2TEncoder(model, device="cuda").encode(mixed[1])
    np.testing.assert_allclose(cpu, gpu, atol=1e-3)
