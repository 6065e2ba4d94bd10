"""Compact re-rank records (lorasearch.rerank): bounded size, exact or provably near-exact
re-scoring, and match kinds as reliable as re-reading the file, on SD1.5 kohya shapes."""
import numpy as np
import pytest

from lorasearch.adapters.writers import quantize, random_adapter
from lorasearch.rerank import (RerankRecord, build_record, exact_record, factor_cosines, match_kind,
                               rescore, svd_record)
from lorasearch.errors import BadAdapterError
from lorasearch.similarity import delta_cosine, delta_norm
from lorasearch.types import LoraAdapter, LoraModule


def decaying(seed, rank=8, dtype="float32", decay=0.6):
    """All 264 SD1.5 kohya-shaped modules with a decaying spectrum, as trained LoRAs have."""
    ad = random_adapter("sd15", rank=rank, seed=seed, dtype="float32")
    mods = []
    for m in ad.modules:
        B = m.B * (decay ** np.arange(rank, dtype=np.float32))
        mods.append(LoraModule(m.name, quantize(m.A, dtype), quantize(B, dtype), m.scale,
                               {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtype], m.shape, m.alpha))
    return LoraAdapter(f"ad{seed}", "kohya", "", ad.family, mods)


def reparam(ad, seed):
    rng = np.random.default_rng(seed)
    mods = []
    for m in ad.modules:
        G = rng.standard_normal((m.rank, m.rank)) / np.sqrt(m.rank) + 2 * np.eye(m.rank)
        mods.append(LoraModule(m.name, (np.linalg.inv(G) @ m.A).astype(np.float32), (m.B @ G).astype(np.float32),
                               m.scale, "F32", m.shape, m.alpha))
    return LoraAdapter("g", "kohya", "", ad.family, mods)


def scaled(ad, f):
    return LoraAdapter("x", "kohya", "", ad.family,
                       [LoraModule(m.name, m.A, m.B, m.scale * f, m.dtype, m.shape, m.alpha) for m in ad.modules])


def f16_copy(ad):
    return LoraAdapter("h", "kohya", "", ad.family,
                       [LoraModule(m.name, quantize(m.A, "F16"), quantize(m.B, "F16"), m.scale, "F16", m.shape, m.alpha)
                        for m in ad.modules])


@pytest.fixture(scope="module")
def base():
    return decaying(1)


# Below the 18.9 MB of float32 factors (forces the svd record) but room for every triplet in fp16:
# the residual is then only fp16 rounding and a copy is decided without re-reading the file.
BUDGET = 10 * 1024 * 1024


def kinds(query, others, budget=BUDGET, roundtrip=True):
    recs = [build_record(o, budget) for o in others]
    if roundtrip:
        recs = [RerankRecord.from_bytes(r.to_bytes()) for r in recs]
    qn, cos, bnd, cn = rescore(query, recs)
    return recs, cos, bnd, [match_kind(c, b, qn, n) for c, b, n in zip(cos, bnd, cn)]


def test_record_size_is_bounded_and_kinds_match_sd15(base):
    others = [base, f16_copy(base), reparam(base, 3), scaled(base, 2.0), decaying(7)]
    recs, cos, bnd, got = kinds(base, others)
    assert len(base.modules) == 264
    # the fp16 copy's factors fit the budget losslessly; the float32 ones are truncated to fp16 triplets
    assert [r.kind for r in recs] == ["svd", "exact", "svd", "svd", "svd"]
    assert all(len(r.to_bytes()) <= BUDGET + 64 * 1024 for r in recs)   # payload + npz/JSON header
    assert got == ["same-update", "same-update", "same-update", "similar", "similar"]
    # the bound holds against the exact cosine of the full updates
    exact = [delta_cosine(base, o) for o in others]
    assert np.all(np.abs(cos - exact) <= bnd + 1e-6)
    assert np.all(bnd < 0.05)


def test_bound_is_rigorous_when_much_is_truncated():
    """Flat spectra and a tiny budget: most energy dropped, the bound still holds, and a true copy
    is 'undecided' (re-read the file) rather than misjudged."""
    a = random_adapter("sd15", rank=8, seed=5)
    others = [a, random_adapter("sd15", rank=8, seed=6), scaled(a, 1.005)]
    recs, cos, bnd, got = kinds(a, others, budget=64 * 1024)
    exact = [delta_cosine(a, o) for o in others]
    assert np.all(np.abs(cos - exact) <= bnd + 1e-6)
    assert got[0] == "undecided" and got[1] == "similar" and got[2] == "undecided"
    assert recs[0].residual > 0.5 * recs[0].norm


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_exact_record_when_it_fits_is_lossless(dtype):
    a = decaying(2, rank=4, dtype=dtype)
    rec = build_record(a, budget=16 << 20)
    assert rec.kind == "exact" and rec.residual == 0.0
    assert rec.nbytes <= sum((m.out_features + m.in_features) * m.rank for m in a.modules) * (4 if dtype == "float32" else 2) + 4 * 264 * 4
    back = RerankRecord.from_bytes(rec.to_bytes())
    for m, r in zip(a.modules, back.modules):
        assert np.array_equal(r.L.astype(np.float32) if r.L.dtype != np.uint16 else (r.L.astype(np.uint32) << 16).view(np.float32), m.B)
    b = reparam(a, 1)
    qn, cos, bnd, cn = rescore(b, [back])
    assert bnd[0] == 0.0 and cos[0] == pytest.approx(delta_cosine(a, b), abs=2e-6)
    assert match_kind(cos[0], bnd[0], qn, cn[0]) == "same-update"
    assert cn[0] == pytest.approx(delta_norm(a), rel=1e-6)


def test_svd_record_of_full_rank_budget_only_rounds():
    a = decaying(3, rank=4)
    rec = svd_record(a, budget=1 << 30)
    assert sum(m.L.shape[1] for m in rec.modules) == 4 * 264
    assert rec.residual / rec.norm < 1e-3          # only fp16 rounding of U, V
    assert rec.norm == pytest.approx(delta_norm(a), rel=1e-6)


def test_factor_cosines_match_similarity(base):
    others = [reparam(base, 1), decaying(9), scaled(base, -1.0)]
    qn, cos, cn = factor_cosines(base, others, [None, delta_norm(others[1]), None])
    np.testing.assert_allclose(cos, [delta_cosine(base, o) for o in others], atol=2e-6)
    assert qn == pytest.approx(delta_norm(base), rel=1e-6)


def test_match_kind_rules():
    assert match_kind(0.2, 0.0, 1.0, 1.0, same_sha=True) == "exact"
    assert match_kind(0.9995, 0.0, 1.0, 1.005) == "same-update"
    assert match_kind(0.9995, 0.0, 1.0, 1.02) == "similar"        # norms differ > 1 %
    assert match_kind(0.9995, 0.0, 1.0, 2.0, scale_known=False) == "same-update"   # alpha unknown: direction only
    assert match_kind(0.9985, 0.0004, 1.0, 1.0) == "similar"
    assert match_kind(0.9985, 0.001, 1.0, 1.0) == "undecided"
    assert match_kind(1.0, 0.0, 0.0, 1.0) == "similar"


@pytest.mark.parametrize("blob", [b"", b"not a zip", b"PK\x03\x04garbage"])
def test_corrupt_record_is_one_line_error(blob):
    with pytest.raises(BadAdapterError, match="corrupt re-rank record"):
        RerankRecord.from_bytes(blob, "rec")


def test_truncated_payload_is_refused(base):
    import io
    rec = exact_record(decaying(4, rank=2))
    z = dict(np.load(io.BytesIO(rec.to_bytes())))
    z["payload"] = z["payload"][:-2]
    buf = io.BytesIO()
    np.savez(buf, **z)
    with pytest.raises(BadAdapterError, match="payload holds"):
        RerankRecord.from_bytes(buf.getvalue(), "rec")
