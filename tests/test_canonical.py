"""Canonical form: equals the dense SVD of ΔW, is invariant to every reparameterization that
leaves ΔW unchanged (to the rounding of the precision involved), and follows the sign rule."""
import numpy as np
import pytest
import torch

from lorasearch.adapters.writers import quantize, random_adapter
from lorasearch.canonical import canonicalize, canonicalize_many, cholqr2_svd, dense_delta, qr_svd
from lorasearch.errors import BadAdapterError, UnavailableError
from lorasearch.types import LoraAdapter, LoraModule

EPS32 = np.finfo(np.float32).eps


def adapter(mods, family="test", path="mem"):
    return LoraAdapter(path=path, format="memory", sha256="", family=family, modules=mods)


def module(name, out, inn, r, seed, scale=0.5):
    rng = np.random.default_rng(seed)
    return LoraModule(name, rng.standard_normal((r, inn)).astype(np.float32) / np.sqrt(inn),
                      rng.standard_normal((out, r)).astype(np.float32) * 0.02, scale, shape=(out, inn))


def well_conditioned(r, seed):
    """Random invertible G with condition number ≤ ~10 (orthogonal × diag(1..10) × orthogonal)."""
    rng = np.random.default_rng(seed)
    q1, _ = np.linalg.qr(rng.standard_normal((r, r)))
    q2, _ = np.linalg.qr(rng.standard_normal((r, r)))
    return (q1 * np.geomspace(1, 10, r)) @ q2


def reparam(ad, seed):
    mods = []
    for i, m in enumerate(ad.modules):
        G = well_conditioned(m.rank, seed + i)
        mods.append(LoraModule(m.name, (np.linalg.inv(G) @ m.A).astype(np.float32),
                               (m.B @ G).astype(np.float32), m.scale, m.dtype, m.shape, m.alpha))
    return adapter(mods, ad.family)


def assert_same_canonical(c1, c2, rtol):
    for m1, m2 in zip(c1.modules, c2.modules):
        smax = float(m1.sigma[0])
        assert np.abs(m1.sigma - m2.sigma).max() <= rtol * smax
        # Each singular pair (σ u vᵀ) is unique given the sign rule; compare the scaled vectors.
        np.testing.assert_allclose(m1.U * m1.sigma, m2.U * m2.sigma, atol=rtol * smax * 4)
        np.testing.assert_allclose(m1.V * m1.sigma, m2.V * m2.sigma, atol=rtol * smax * 4)


@pytest.mark.parametrize("shape,r", [((120, 300), 8), ((400, 120), 32), ((64, 40), 4), ((30, 50), 64)])
def test_equals_float64_dense_svd(shape, r):
    m = module("m", *shape, r, seed=r, scale=0.7)
    c = canonicalize(adapter([m]), device="cpu").modules[0]
    D = dense_delta(m)
    U, S, Vt = np.linalg.svd(D, full_matrices=False)
    k = min(r, *shape)
    assert c.U.dtype == np.float32 and c.U.shape == (shape[0], k) and c.V.shape == (shape[1], k)
    assert np.all(np.diff(c.sigma) <= 0)
    np.testing.assert_allclose(c.sigma, S[:k], rtol=0, atol=50 * EPS32 * S[0])
    rec = dense_delta(c)
    assert np.linalg.norm(rec - D) / np.linalg.norm(D) < 50 * EPS32
    # singular vectors match the dense ones up to sign, and the W2T sign rule picks the sign
    for j in range(k):
        assert abs(abs(float(c.U[:, j] @ U[:, j])) - 1) < 1e-4
        col = c.U[:, j]
        assert col[np.argmax(np.abs(col))] > 0
    np.testing.assert_allclose(c.U.T @ c.U, np.eye(k), atol=1e-5)
    np.testing.assert_allclose(c.V.T @ c.V, np.eye(k), atol=1e-5)


def test_float64_option_is_exact_to_double_rounding():
    m = module("m", 200, 100, 8, seed=3)
    c = canonicalize(adapter([m]), device="cpu", dtype="float64").modules[0]
    assert c.sigma.dtype == np.float64
    S = np.linalg.svd(dense_delta(m), compute_uv=False)[:8]
    np.testing.assert_allclose(c.sigma, S, rtol=1e-12)


def test_invariant_under_gl_reparameterization():
    ad = random_adapter("minilm", rank=8, seed=1)
    c1, c2 = canonicalize(ad, device="cpu"), canonicalize(reparam(ad, seed=7), device="cpu")
    # κ(G) ≤ 10, so the factors of the reparameterized adapter carry ~10× float32 rounding
    assert_same_canonical(c1, c2, rtol=2000 * EPS32)


def test_invariant_under_moving_scalars_between_A_B_and_alpha():
    ad = random_adapter("minilm", rank=4, seed=2, targets=r"query|value")
    moved = adapter([LoraModule(m.name, m.A * np.float32(4.0), m.B * np.float32(0.125), m.scale * 2.0,
                                m.dtype, m.shape, m.alpha) for m in ad.modules])
    negated = adapter([LoraModule(m.name, -m.A, m.B, -m.scale, m.dtype, m.shape) for m in ad.modules])
    c = canonicalize(ad, device="cpu")
    assert_same_canonical(c, canonicalize(moved, device="cpu"), rtol=20 * EPS32)
    assert_same_canonical(c, canonicalize(negated, device="cpu"), rtol=20 * EPS32)
    for m, cm in zip(ad.modules, c.modules):  # the scale is folded into sigma
        np.testing.assert_allclose(dense_delta(cm), dense_delta(m), atol=1e-6 * np.abs(dense_delta(m)).max())


@pytest.mark.parametrize("dtype,eps", [("F16", 2.0 ** -11), ("BF16", 2.0 ** -8)])
def test_half_precision_storage_matches_to_that_rounding(dtype, eps):
    ad = random_adapter("minilm", rank=8, seed=3, targets=r"attention")
    half = adapter([LoraModule(m.name, quantize(m.A, dtype), quantize(m.B, dtype), m.scale, dtype, m.shape)
                    for m in ad.modules])
    c32, c16 = canonicalize(ad, device="cpu"), canonicalize(half, device="cpu")
    for m32, m16 in zip(c32.modules, c16.modules):
        # rounding A and B each perturbs ΔW by ≲ eps relative; σ moves by at most ‖δΔW‖₂
        assert np.abs(m32.sigma - m16.sigma).max() <= 4 * eps * m32.sigma[0]
        rel = np.linalg.norm(dense_delta(m32) - dense_delta(m16)) / np.linalg.norm(dense_delta(m32))
        assert rel < 3 * eps
    # and storing the half-precision factors in float32 changes nothing beyond float32 rounding
    up = adapter([LoraModule(m.name, m.A.astype(np.float32), m.B.astype(np.float32), m.scale, "F32", m.shape)
                  for m in half.modules])
    assert_same_canonical(c16, canonicalize(up, device="cpu"), rtol=0)


def test_batched_equals_unbatched():
    ads = [random_adapter("minilm", rank=r, seed=s, targets=t)
           for s, (r, t) in enumerate([(8, None), (8, r"query"), (4, r"value|query"), (16, None)])]
    many = canonicalize_many(ads, device="cpu")
    for ad, cm in zip(ads, many):
        one = canonicalize(ad, device="cpu")
        assert cm.raw is ad and [m.name for m in cm.modules] == [m.name for m in ad.modules]
        for a, b in zip(cm.modules, one.modules):
            np.testing.assert_allclose(a.sigma, b.sigma, rtol=1e-5)
            np.testing.assert_allclose(a.U * a.sigma, b.U * b.sigma, atol=1e-5 * a.sigma[0])


def test_zero_and_rank_deficient_modules_have_no_nan():
    rng = np.random.default_rng(0)
    zero = LoraModule("zero", rng.standard_normal((4, 30)).astype(np.float32), np.zeros((20, 4), np.float32), 1.0)
    b = rng.standard_normal((20, 2)).astype(np.float32)
    deficient = LoraModule("def", rng.standard_normal((4, 30)).astype(np.float32),
                           np.concatenate([b, b], axis=1), 1.0)   # rank 2 (B has repeated columns)
    c = canonicalize(adapter([zero, deficient]), device="cpu")
    for m in c.modules:
        assert np.isfinite(m.U).all() and np.isfinite(m.sigma).all() and np.isfinite(m.V).all()
    assert not c.modules[0].sigma.any() and not c.modules[0].U.any()
    s = c.modules[1].sigma
    assert s[2] == 0 and s[3] == 0 and s[1] > 0
    np.testing.assert_allclose(dense_delta(c.modules[1]), dense_delta(deficient), atol=1e-5)


def test_sign_rule_and_conv_shape_kept():
    ad = random_adapter("sd15", rank=4, seed=5, targets=r"down_blocks\.0\.attentions\.0\.proj_in")
    c = canonicalize(ad, device="cpu").modules[0]
    assert c.shape == (320, 320, 1, 1)
    idx = np.abs(c.U).argmax(axis=0)
    assert (c.U[idx, np.arange(c.rank)] > 0).all()


def test_qr_svd_batched_torch_matches_per_item():
    rng = np.random.default_rng(1)
    B = torch.from_numpy(rng.standard_normal((5, 40, 6)))
    A = torch.from_numpy(rng.standard_normal((5, 6, 30)))
    sc = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.0], dtype=torch.float64)
    U, S, V = qr_svd(B, A, sc)
    for i in range(5):
        D = sc[i] * B[i] @ A[i]
        torch.testing.assert_close(U[i] * S[i] @ V[i].T, D, atol=1e-10, rtol=0)


def test_bad_factor_shapes_name_the_file():
    bad = LoraModule("x", np.zeros((4, 10), np.float32), np.zeros((8, 3), np.float32), 1.0)
    with pytest.raises(BadAdapterError, match="some.safetensors: module x"):
        canonicalize(adapter([bad], path="some.safetensors"), device="cpu")


def test_cuda_request_without_cuda_is_unavailable():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(UnavailableError):
        canonicalize(adapter([module("m", 10, 10, 2, 0)]), device="cuda")


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    ad = random_adapter("sd15", rank=16, seed=4, targets=r"attn2")
    assert_same_canonical(canonicalize(ad, device="cpu"), canonicalize(ad, device="cuda"), rtol=100 * EPS32)


# ---- CholeskyQR2 path (rank ≥ 16 on CPU) and its Householder fallback ---------------------------

def conditioned_factor(out, r, cond, seed):
    """B [out, r] with singular values geomspace(1, 1/cond) (times 0.02, as LoRA B factors)."""
    rng = np.random.default_rng(seed)
    q1, _ = np.linalg.qr(rng.standard_normal((out, r)))
    q2, _ = np.linalg.qr(rng.standard_normal((r, r)))
    return ((q1 * np.geomspace(1, 1 / cond, r)) @ q2 * 0.02).astype(np.float32)


@pytest.fixture
def fallbacks(monkeypatch):
    """Counts the modules that the CholeskyQR2 path hands to Householder QR."""
    import lorasearch.canonical as canonical_mod
    seen = []
    real = canonical_mod._qr_core

    def counting(B, A, scale):
        seen.append(B.shape[0])
        return real(B, A, scale)
    monkeypatch.setattr(canonical_mod, "_qr_core", counting)
    return seen


def test_cholesky_path_equals_householder_and_dense_svd(fallbacks):
    rng = np.random.default_rng(11)
    r, out, inn = 32, 640, 768
    B = np.stack([conditioned_factor(out, r, c, s) for s, c in enumerate([1, 10, 100, 500])])
    A = (rng.standard_normal((4, r, inn)) / np.sqrt(inn)).astype(np.float32)
    sc = torch.tensor([1.0, 0.5, -2.0, 1.0])
    U, S, V = (t.numpy() for t in cholqr2_svd(torch.from_numpy(B), torch.from_numpy(A), sc))
    assert sum(fallbacks) == 0                   # all four took the Cholesky path
    for i in range(4):
        D = float(sc[i]) * B[i].astype(np.float64) @ A[i].astype(np.float64)
        Sd = np.linalg.svd(D, compute_uv=False)
        np.testing.assert_allclose(S[i], Sd[:r], rtol=0, atol=10 * EPS32 * Sd[0])
        assert np.linalg.norm((U[i] * S[i]) @ V[i].T - D) / np.linalg.norm(D) < 10 * EPS32
        np.testing.assert_allclose(U[i].T @ U[i], np.eye(r), atol=1e-5)
        idx = np.abs(U[i]).argmax(axis=0)
        assert (U[i][idx, np.arange(r)] > 0).all()
    Uq, Sq, Vq = (t.numpy() for t in qr_svd(torch.from_numpy(B), torch.from_numpy(A), sc))
    np.testing.assert_allclose(S, Sq, rtol=0, atol=50 * EPS32 * float(Sq.max()))


def test_ill_conditioned_rank_deficient_and_zero_factors_fall_back_exactly(fallbacks):
    rng = np.random.default_rng(12)
    r, out, inn = 32, 320, 768
    b = rng.standard_normal((out, r // 2)).astype(np.float32) * 0.02
    good = conditioned_factor(out, r, 2, 1)
    Bs = [good, conditioned_factor(out, r, 1e5, 2), np.concatenate([b, b], axis=1),
          np.zeros((out, r), np.float32), good]
    A = (rng.standard_normal((5, r, inn)) / np.sqrt(inn)).astype(np.float32)
    A[4] = conditioned_factor(inn, r, 1e6, 3).T      # ill-conditioned A with a good B
    B, At, sc = torch.from_numpy(np.stack(Bs)), torch.from_numpy(A), torch.ones(5)
    U, S, V = (t.numpy() for t in cholqr2_svd(B, At, sc))
    assert fallbacks == [4]                      # all but the first module were redone by QR
    Uq, Sq, Vq = (t.numpy() for t in qr_svd(B, At, sc))
    np.testing.assert_array_equal(S[1:], Sq[1:])  # the fallback is the Householder result itself
    np.testing.assert_array_equal(U[1:], Uq[1:])
    assert np.isfinite(U).all() and np.isfinite(S).all() and np.isfinite(V).all()
    assert not S[3].any() and not U[3].any()     # zero module: no directions
    assert S[2][r // 2 - 1] > 0 and not S[2][r // 2:].any()   # rank r/2
    for i in (0, 1, 2, 4):
        D = Bs[i].astype(np.float64) @ A[i].astype(np.float64)
        assert np.linalg.norm((U[i] * S[i]) @ V[i].T - D) <= 1e-4 * np.linalg.norm(D)


def test_gl_invariance_holds_on_cholesky_path(fallbacks):
    ad = random_adapter("sd15", rank=32, seed=6, targets=r"down_blocks\.1\.attentions\.0")
    c1, c2 = canonicalize(ad, device="cpu"), canonicalize(reparam(ad, seed=9), device="cpu")
    assert sum(fallbacks) == 0
    assert_same_canonical(c1, c2, rtol=2000 * EPS32)


def test_worker_threads_give_identical_results():
    ads = [random_adapter("sd15", rank=16, seed=s, targets=r"attn2\.to_[kv]") for s in range(3)]
    serial, threaded = canonicalize_many(ads, device="cpu", workers=1), canonicalize_many(ads, device="cpu", workers=2)
    for a, b in zip(serial, threaded):
        for x, y in zip(a.modules, b.modules):
            assert x.name == y.name
            np.testing.assert_array_equal(x.U, y.U)
            np.testing.assert_array_equal(x.sigma, y.sigma)
            np.testing.assert_array_equal(x.V, y.V)
