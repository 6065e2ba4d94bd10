"""The training-free default encoder ("sketch") and the RawCos baseline encoder: determinism,
GL(r) invariance (and RawCos's lack of it), agreement with the exact cosines they approximate,
and adapters with different target-module sets landing in one comparable space."""
import subprocess
import sys

import numpy as np
import pytest

from lorasearch.adapters.writers import random_adapter
from lorasearch.canonical import canonicalize, canonicalize_many
from lorasearch.encoders.base import available, get_encoder
from lorasearch.encoders.rawcos import RawCosEncoder
from lorasearch.encoders.sketch import SketchEncoder
from lorasearch.errors import UsageError
from lorasearch.similarity import delta_cosine, pairwise_dense_cosine, pairwise_rawcos
from lorasearch.types import LoraAdapter, LoraModule

TARGETS = r"layer\.[0-2]\..*(query|value|intermediate)"


def reparam(ad, seed):
    rng = np.random.default_rng(seed)
    mods = []
    for m in ad.modules:
        G = rng.standard_normal((m.rank, m.rank)) / np.sqrt(m.rank) + 2 * np.eye(m.rank)
        mods.append(LoraModule(m.name, (np.linalg.inv(G) @ m.A).astype(np.float32), (m.B @ G).astype(np.float32),
                               m.scale, m.dtype, m.shape, m.alpha))
    return LoraAdapter("g", "memory", "", ad.family, mods)


def mixture(a, b, t):
    """ΔW = cos t·ΔW_a + sin t·ΔW_b per module, as rank r_a + r_b factors (never dense)."""
    mods = []
    for ma in a.modules:
        mb = b.module(ma.name)
        A = np.concatenate([ma.A, mb.A])
        B = np.concatenate([ma.B * np.float32(np.cos(t) * ma.scale), mb.B * np.float32(np.sin(t) * mb.scale)], 1)
        mods.append(LoraModule(ma.name, A, B, 1.0, shape=ma.shape))
    return LoraAdapter("mix", "memory", "", a.family, mods)


@pytest.fixture(scope="module")
def pairs():
    """Pairs of adapters with dense cosines spread over [−1, 1]."""
    rng = np.random.default_rng(0)
    base = [random_adapter("minilm", rank=4, seed=s, targets=TARGETS) for s in range(4)]
    left, right = [], []
    for i in range(48):
        a, b = base[i % 4], base[(i + 1) % 4]
        left.append(a)
        right.append(mixture(a, b, rng.uniform(0, np.pi)))
    return canonicalize_many(left, device="cpu"), canonicalize_many(right, device="cpu")


def test_registered_and_spec_roundtrip():
    assert {"sketch", "rawcos"} <= set(available())
    enc = get_encoder("sketch")
    assert isinstance(enc, SketchEncoder) and enc.spec == "sketch" and enc.dim == 1024
    assert get_encoder().spec == "auto"          # the default routes every non-MiniLM family to the sketch
    enc = get_encoder("sketch:dim=256,weighting=raw")
    assert (enc.dim, enc.weighting, enc.spec) == (256, "raw", "sketch:dim=256,weighting=raw")
    assert get_encoder("rawcos").needs_raw and get_encoder("rawcos:dim=128").dim == 128
    with pytest.raises(UsageError):
        get_encoder("sketch:size=3")
    with pytest.raises(UsageError):
        get_encoder("sketch:weighting=cubic")


def test_sketch_is_deterministic_and_normalized():
    ad = random_adapter("minilm", rank=8, seed=1, targets=TARGETS)
    c = canonicalize(ad, device="cpu")
    e1 = SketchEncoder().encode([c])
    e2 = SketchEncoder().encode([c, c])
    assert e1.dtype == np.float32 and e1.shape == (1, 1024)
    assert np.linalg.norm(e1[0]) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(e2, np.vstack([e1, e1]), atol=1e-7)
    assert np.abs(SketchEncoder(seed=1).encode([c]) - e1).max() > 0.01


@pytest.mark.slow
def test_sketch_is_the_same_in_a_fresh_process():
    c = canonicalize(random_adapter("minilm", rank=8, seed=1, targets=TARGETS), device="cpu")
    e1 = SketchEncoder().encode([c])
    code = ("import numpy as np, sys;from lorasearch.adapters.writers import random_adapter;"
            "from lorasearch.canonical import canonicalize;from lorasearch.encoders.base import get_encoder;"
            f"c=canonicalize(random_adapter('minilm',rank=8,seed=1,targets={TARGETS!r}),device='cpu');"
            "sys.stdout.write(get_encoder('sketch').encode([c]).tobytes().hex())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "12345", "PATH": ""}).stdout
    np.testing.assert_allclose(np.frombuffer(bytes.fromhex(other), np.float32), e1[0], atol=1e-6)


def test_sketch_is_gl_invariant_and_rawcos_is_not():
    ad = random_adapter("minilm", rank=8, seed=2, targets=TARGETS)
    c1, c2 = canonicalize(ad, device="cpu"), canonicalize(reparam(ad, 3), device="cpu")
    for weighting in ("unit", "raw"):
        e = SketchEncoder(weighting=weighting).encode([c1, c2])
        assert np.abs(e[0] - e[1]).max() < 2e-5          # float32 rounding only
    r = RawCosEncoder().encode([c1, c2])
    assert float(r[0] @ r[1]) < 0.95                     # the raw factors moved, ΔW did not
    assert pairwise_rawcos([c1], [c2])[0, 0] < 0.95


def test_sketch_raw_weighting_approximates_dense_cosine(pairs):
    left, right = pairs
    exact = np.array([delta_cosine(a, b) for a, b in zip(left, right)])
    enc = SketchEncoder(weighting="raw")
    el, er = enc.encode(left), enc.encode(right)
    approx = np.sum(el * er, axis=1)
    assert exact.std() > 0.3                              # a real spread of similarities
    assert np.corrcoef(exact, approx)[0, 1] > 0.9
    assert np.abs(exact - approx).mean() < 0.1


def test_sketch_unit_weighting_approximates_mean_module_cosine(pairs):
    left, right = pairs
    ref = []
    for a, b in zip(left, right):   # mean over modules of the per-module dense cosine (all present)
        cos = [delta_cosine(_only(a, m.name), _only(b, m.name)) for m in a.modules]
        ref.append(np.mean(cos))
    enc = SketchEncoder(weighting="unit")
    approx = np.sum(enc.encode(left) * enc.encode(right), axis=1)
    assert np.corrcoef(ref, approx)[0, 1] > 0.9


def _only(c, name):
    return type(c)(family=c.family, modules=[c.module(name)], raw=None)


def test_different_target_sets_compare_as_missing_is_zero():
    full = random_adapter("minilm", rank=8, seed=4, targets=TARGETS)
    part = LoraAdapter("p", "memory", "", "minilm", [m for m in full.modules if "query" in m.name])
    other = random_adapter("minilm", rank=4, seed=5, targets=r"layer\.[0-2]\..*value")
    cf, cp, co = canonicalize_many([full, part, other], device="cpu")
    exact = pairwise_dense_cosine([cf], [cp, co], device="cpu")[0]
    e = SketchEncoder(weighting="raw", dim=2048).encode([cf, cp, co])
    assert exact[1] == pytest.approx(0.0, abs=1e-3)  # different random directions in value modules
    assert abs(float(e[0] @ e[1]) - exact[0]) < 0.08
    assert abs(float(e[0] @ e[2]) - exact[1]) < 0.08
    disjoint = SketchEncoder().encode([cp, canonicalize(LoraAdapter(
        "v", "memory", "", "minilm", [m for m in full.modules if "value" in m.name]), device="cpu")])
    assert abs(float(disjoint[0] @ disjoint[1])) < 0.15  # no shared module: ~0 up to sketch noise


def test_zero_adapter_encodes_to_zero_row():
    ad = random_adapter("minilm", rank=4, seed=6, targets=r"layer\.0\..*query")
    z = LoraAdapter("z", "memory", "", "minilm",
                    [LoraModule(m.name, m.A, np.zeros_like(m.B), 1.0, shape=m.shape) for m in ad.modules])
    cz = canonicalize(z, device="cpu")
    for enc in (SketchEncoder(), RawCosEncoder()):
        e = enc.encode([cz, canonicalize(ad, device="cpu")])
        assert np.isfinite(e).all()
    assert not SketchEncoder().encode([cz]).any()


def test_rawcos_encoder_approximates_exact_rawcos(pairs):
    left, right = pairs
    exact = np.diag(pairwise_rawcos(left, right))
    # left (rank 4) vs right (rank 8) share no factor shape; among the rank-8 mixtures it varies
    enc = RawCosEncoder()
    L = enc.encode(right[:24])
    ex = pairwise_rawcos(right[:24], right[:24])
    iu = np.triu_indices(24, 1)
    assert ex[iu].std() > 0.2
    assert np.corrcoef(ex[iu], (L @ L.T)[iu])[0, 1] > 0.9
    assert np.allclose(exact, 0.0)   # different ranks: no factor shape in common
    raw_only = LoraAdapter("x", "memory", "", "minilm", [])
    with pytest.raises(UsageError):
        enc.encode([type(left[0])(family="minilm", modules=[], raw=None)])
    assert not enc.encode([canonicalize(raw_only, device="cpu")]).any()
