"""Exact ΔW similarity from factors against dense numpy references (missing modules, mixed
ranks, canonical vs raw), and the RawCos baseline against its definition."""
import numpy as np
import pytest

from lorasearch.adapters.writers import random_adapter
from lorasearch.canonical import canonicalize, dense_delta
from lorasearch.similarity import (delta_cosine, delta_inner, delta_norm, pairwise_dense_cosine,
                                   pairwise_rawcos, relative_difference)
from lorasearch.types import LoraAdapter, LoraModule

from lorasearch.adapters.writers import module_specs  # noqa: E402

# two of the six MiniLM layers keep the dense references small
L01 = r"layer\.[01]\."
SHAPES = {n: s for n, s in module_specs("minilm") if n.split(".")[2] in ("0", "1")}
NAMES = sorted(SHAPES)


def dense_vector(ad, names=NAMES):
    """Concatenated dense ΔW over a fixed module list (missing module = zeros)."""
    parts = []
    for n in names:
        m = ad.module(n)
        parts.append(dense_delta(m).ravel() if m is not None else np.zeros(int(np.prod(SHAPES[n]))))
    return np.concatenate(parts)


def raw_vector(ad):
    return {(m.name, f): getattr(m, f).astype(np.float64).ravel() for m in ad.modules for f in "AB"}


@pytest.fixture(scope="module")
def adapters():
    return [
        random_adapter("minilm", rank=8, seed=0, targets=L01),
        random_adapter("minilm", rank=4, seed=1, targets=r"layer\.[01]\..*(query|value)", alpha=8),
        random_adapter("minilm", rank=16, seed=2, targets=r"layer\.1\..*(value|intermediate)"),
        random_adapter("minilm", rank=8, seed=3, targets=r"layer\.0\."),
    ]


def cos(x, y):
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


@pytest.fixture(scope="module")
def vecs(adapters):
    return [dense_vector(a) for a in adapters]


def test_inner_norm_cosine_match_dense(adapters, vecs):
    for i, a in enumerate(adapters):
        assert delta_norm(a) == pytest.approx(np.linalg.norm(vecs[i]), rel=1e-10)
        for j, b in enumerate(adapters):
            assert delta_inner(a, b) == pytest.approx(float(vecs[i] @ vecs[j]), rel=1e-9, abs=1e-12)
            assert delta_cosine(a, b) == pytest.approx(cos(vecs[i], vecs[j]), abs=1e-10)


def test_canonical_and_mixed_inputs_agree_with_raw(adapters):
    can = [canonicalize(a, device="cpu") for a in adapters]
    for i in range(len(adapters)):
        assert delta_norm(can[i]) == pytest.approx(delta_norm(adapters[i]), rel=1e-5)
        for j in range(len(adapters)):
            ref = delta_cosine(adapters[i], adapters[j])
            assert delta_cosine(can[i], can[j]) == pytest.approx(ref, abs=1e-5)
            assert delta_cosine(adapters[i], can[j]) == pytest.approx(ref, abs=1e-5)


def test_pairwise_dense_cosine_matches_dense(adapters, vecs):
    ref = np.array([[cos(x, y) for y in vecs] for x in vecs[:2]])
    got = pairwise_dense_cosine(adapters[:2], adapters, device="cpu")
    assert got.shape == (2, 4)
    np.testing.assert_allclose(got, ref, atol=1e-10)
    can = [canonicalize(a, device="cpu") for a in adapters]
    np.testing.assert_allclose(pairwise_dense_cosine(can[:2], can, device="cpu"), ref, atol=1e-5)


def test_disjoint_modules_have_zero_inner_and_zero_adapter_is_handled():
    a = random_adapter("minilm", rank=4, seed=5, targets=r"query")
    b = random_adapter("minilm", rank=4, seed=6, targets=r"value")
    assert delta_inner(a, b) == 0.0 and delta_cosine(a, b) == 0.0
    z = LoraAdapter("z", "memory", "", "minilm",
                    [LoraModule(m.name, m.A, np.zeros_like(m.B), 1.0) for m in a.modules])
    assert delta_norm(z) == 0.0 and delta_cosine(a, z) == 0.0
    assert pairwise_dense_cosine([z], [a, z], device="cpu").tolist() == [[0.0, 0.0]]
    assert relative_difference(a, a) < 1e-12 and relative_difference(z, a) == float("inf")


def test_relative_difference_is_exact_even_for_nearly_equal_updates():
    a = random_adapter("minilm", rank=8, seed=7, targets=r"layer\.[01]\..*(query|key)")
    eps = 1e-9
    b = LoraAdapter("b", "memory", "", "minilm",
                    [LoraModule(m.name, m.A, m.B, m.scale * (1 + eps)) for m in a.modules])
    assert relative_difference(a, b) == pytest.approx(eps, rel=1e-3)
    c = random_adapter("minilm", rank=8, seed=8, targets=r"layer\.[01]\..*(query|value)")
    va, vc = dense_vector(a), dense_vector(c)
    assert relative_difference(a, c) == pytest.approx(np.linalg.norm(va - vc) / np.linalg.norm(va), rel=1e-10)
    assert relative_difference(a, canonicalize(a, device="cpu")) < 1e-6


def test_rawcos_matches_flattened_factors_and_ignores_mismatched_shapes(adapters):
    got = pairwise_rawcos(adapters, adapters)
    for i, a in enumerate(adapters):
        for j, b in enumerate(adapters):
            ra, rb = raw_vector(a), raw_vector(b)
            dot = sum(float(ra[k] @ rb[k]) for k in ra.keys() & rb.keys() if ra[k].shape == rb[k].shape
                      and a.module(k[0]).rank == b.module(k[0]).rank)
            na = np.sqrt(sum(float(v @ v) for v in ra.values()))
            nb = np.sqrt(sum(float(v @ v) for v in rb.values()))
            assert got[i, j] == pytest.approx(dot / (na * nb), abs=1e-10)
    assert got[0, 1] == 0.0   # rank 8 vs rank 4: no factor has a matching shape


def test_rawcos_is_not_invariant_but_dense_cosine_is():
    a = random_adapter("minilm", rank=8, seed=9)
    rng = np.random.default_rng(0)
    mods = []
    for m in a.modules:
        G = rng.standard_normal((8, 8)) + 3 * np.eye(8)
        mods.append(LoraModule(m.name, (np.linalg.inv(G) @ m.A).astype(np.float32), (m.B @ G).astype(np.float32),
                               m.scale))
    g = LoraAdapter("g", "memory", "", "minilm", mods)
    assert delta_cosine(a, g) == pytest.approx(1.0, abs=1e-6)
    assert pairwise_rawcos([a], [g])[0, 0] < 0.9


def test_same_name_other_shape_is_another_weight():
    """Llama-2 v_proj [4096, 4096] vs Llama-3 v_proj [1024, 4096] share a name and a family
    (llama-h4096) but are different weights: they add 0 to the inner product, count in norms."""
    a = random_adapter("minilm", rank=4, seed=1, targets=r"layer\.0\.attention\.self\.(query|value)")
    m = a.modules[0]
    other = LoraModule(m.name, np.ones((4, 10), np.float32), np.ones((7, 4), np.float32), 1.0)
    b = LoraAdapter("b", "memory", "", "minilm", [other, a.modules[1]])
    shared = LoraAdapter("s", "memory", "", "minilm", [a.modules[1]])
    assert delta_inner(a, b) == pytest.approx(delta_inner(a, shared), rel=1e-9)
    expected = delta_inner(a, shared) / (delta_norm(a) * delta_norm(b))
    assert delta_cosine(a, b) == pytest.approx(expected, rel=1e-6)
    assert pairwise_dense_cosine([a], [b], device="cpu")[0, 0] == pytest.approx(expected, rel=1e-6)
    assert relative_difference(a, b) > 0
