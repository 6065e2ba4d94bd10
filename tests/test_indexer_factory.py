"""Approximate indexes chosen by a faiss factory string: quality vs flat, persistence, removal,
pinning, flat fallback for small families, search knobs, GPU-copy routing."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from lorasearch.errors import IncompatibleError, UsageError
from lorasearch.indexer import LoraIndex
from lorasearch.indexer import factory as kinds
from lorasearch.indexer import snapshot as snap
from lorasearch.indexer.gpu import GpuMirror

DIM = 16
N = 1500
IVF = "IVF16,Flat"          # needs 16 * 39 = 624 vectors to train
HNSW = "HNSW16"


def clustered(n=N, clusters=30, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, DIM))
    x = centers[rng.integers(0, clusters, n)] + 0.25 * rng.normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def recs(vectors, start=0, family="sd1"):
    return [dict(path=f"/a/{family}/{start + i}.safetensors", sha256=f"{start + i:064x}", family=family,
                 embedding=v) for i, v in enumerate(vectors)]


def make(path, factory, vectors, **kw):
    ix = LoraIndex.open(path, create=True, device="cpu", factory=factory, **kw)
    ix.check_encoder("sketch", "1", DIM)
    ids = ix.upsert(recs(vectors))
    return ix, ids


def queries(base, n=60, seed=1):
    rng = np.random.default_rng(seed)
    q = base[rng.choice(len(base), n, replace=False)] + 0.1 * rng.normal(size=(n, DIM))
    return q.astype(np.float32)


def ids_only(rows):
    return [[i for i, _ in r] for r in rows]


def snapshot_index(ix, family="sd1"):
    gen = ix.stats()["snapshots"][family]["generation"]
    return faiss.read_index(str(snap.snapshot_path(ix.root / "faiss", family, gen)))


@pytest.mark.parametrize("factory,params", [(IVF, {"nprobe": 4}), (HNSW, {"ef_search": 32})])
def test_ann_matches_flat_on_clustered_data(tmp_path, factory, params):
    base = clustered()
    q = queries(base)
    flat, _ = make(tmp_path / "flat", None, base)
    ann, _ = make(tmp_path / "ann", factory, base, **params)
    want, got = ids_only(flat.search(q, "sd1", 10)), ids_only(ann.search(q, "sd1", 10))
    assert [r[0] for r in got] == [r[0] for r in want]                       # same top-1
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)])
    assert recall >= 0.9, recall
    assert ann.stats()["snapshots"]["sd1"]["index"] == factory and ann.stats()["faiss_factory"] == factory
    assert flat.stats()["faiss_factory"] == "Flat"
    kind = type(faiss.downcast_index(snapshot_index(ann))).__name__
    assert kind == ("IndexIVFFlat" if factory == IVF else "IndexIDMap2")
    flat.close()
    ann.close()


def test_ivf_with_every_list_probed_is_exact(tmp_path):
    base = clustered()
    q = queries(base)
    flat, _ = make(tmp_path / "flat", None, base)
    ivf, _ = make(tmp_path / "ivf", IVF, base, nprobe=1)
    exact = flat.search(q, "sd1", 10)
    assert ids_only(ivf.search(q, "sd1", 10, nprobe=16)) == ids_only(exact)   # per-call override
    one = ivf.search(q, "sd1", 10)                                           # session nprobe=1
    assert np.mean([len(set(a) & set(b)) for a, b in zip(ids_only(one), ids_only(exact))]) < 10


@pytest.mark.parametrize("factory", [IVF, HNSW])
def test_persistence_across_reopen(tmp_path, factory):
    base = clustered()
    q = queries(base)
    ix, _ = make(tmp_path / "ix", factory, base, nprobe=8, ef_search=40)
    before = ix.search(q, "sd1", 10)
    ix.close()
    for readonly in (True, False):
        with LoraIndex.open(tmp_path / "ix", readonly=readonly, device="cpu") as again:
            assert again.factory == factory and (again.nprobe, again.ef_search) == (8, 40)   # recorded at creation
            assert again.search(q, "sd1", 10) == before
            assert again.repairs == {} and again.check()["ok"]
    with LoraIndex.open(tmp_path / "ix", readonly=True, device="cpu", nprobe=2) as again:
        assert again.nprobe == 2                                             # a session may override


@pytest.mark.parametrize("factory", [IVF, HNSW])
def test_remove_and_reupsert(tmp_path, factory):
    base = clustered()
    ix, ids = make(tmp_path / "ix", factory, base)
    gone = ids[:200]
    assert ix.remove(gone) == 200
    hits = {i for row in ix.search(base[:200], "sd1", 5, nprobe=16, ef_search=200) for i, _ in row}
    assert not hits & set(gone)
    assert ix.check()["ok"] and ix.count() == N - 200
    assert ix.stats()["snapshots"]["sd1"]["index"] == factory
    # an upsert that replaces vectors (remove + add of the same ids) lands in the right place
    target = base[500] * -1
    ix.upsert([dict(recs(base[600:601], start=600)[0], embedding=target)])
    assert ix.search(target, "sd1", 1, nprobe=16, ef_search=200)[0][0][0] == ids[600]
    ix.close()
    with LoraIndex.open(tmp_path / "ix", device="cpu") as again:
        assert again.check()["ok"] and again.repairs == {}
        assert not set(snap.index_ids(again._family_index("sd1")[0])) & set(gone)


def test_hnsw_removal_rebuilds_from_catalog(tmp_path, monkeypatch):
    builds = []
    real = snap.build
    monkeypatch.setattr(snap, "build", lambda dim, ids, vectors, factory="Flat": (builds.append(len(ids)),
                                                                                 real(dim, ids, vectors, factory))[1])
    ix, ids = make(tmp_path / "ix", HNSW, clustered(800))
    builds.clear()
    with ix.writer():                   # several removes in one writer block: one rebuild, at flush
        ix.remove(ids[:10])
        ix.remove(ids[10:20])
        assert builds == []
    assert builds == [780] and ix.check()["ok"] and ix.repairs == {}


def test_factory_is_pinned_at_creation(tmp_path):
    ix, _ = make(tmp_path / "ix", IVF, clustered(50))
    ix.close()
    for other in ("Flat", "IVF32,Flat", HNSW):
        with pytest.raises(IncompatibleError) as e:
            LoraIndex.open(tmp_path / "ix", device="cpu", factory=other)
        msg = str(e.value)
        assert "\n" not in msg and IVF in msg and str(tmp_path / "ix") in msg
    with LoraIndex.open(tmp_path / "ix", device="cpu", factory=" IVF16, Flat ") as same:   # spacing ignored
        assert same.factory == IVF
    flat, _ = make(tmp_path / "flat", None, clustered(20))
    flat.close()
    with pytest.raises(IncompatibleError, match="'Flat', not 'HNSW16'"):
        LoraIndex.open(tmp_path / "flat", device="cpu", factory=HNSW)
    LoraIndex.open(tmp_path / "flat", device="cpu", factory="flat").close()


def test_index_without_recorded_factory_is_flat(tmp_path):
    ix, _ = make(tmp_path / "ix", None, clustered(20))
    ix.close()
    import sqlite3
    con = sqlite3.connect(tmp_path / "ix" / "catalog.sqlite")
    con.execute("DELETE FROM meta WHERE key = 'faiss_factory'")      # as written before the option existed
    con.commit()
    con.close()
    with LoraIndex.open(tmp_path / "ix", device="cpu") as again:
        assert again.factory == "Flat" and again.check()["ok"] and again.repairs == {}
    with pytest.raises(IncompatibleError):
        LoraIndex.open(tmp_path / "ix", device="cpu", factory=IVF)


def test_bad_factory_strings_are_refused(tmp_path):
    with pytest.raises(UsageError, match="IVF16,Flatt") as e:
        LoraIndex.open(tmp_path / "a", create=True, device="cpu", factory="IVF16,Flatt")
    assert "\n" not in str(e.value) and not (tmp_path / "a").exists()
    with pytest.raises(UsageError, match="IDMap"):
        LoraIndex.open(tmp_path / "b", create=True, device="cpu", factory="IDMap,HNSW32")
    with pytest.raises(UsageError, match="nprobe"):
        LoraIndex.open(tmp_path / "c", create=True, device="cpu", factory=IVF, nprobe=0)
    ix = LoraIndex.open(tmp_path / "d", create=True, device="cpu", factory="PQ5")   # fine for some dims
    with pytest.raises(IncompatibleError, match="dim 16"):
        ix.check_encoder("sketch", "1", DIM)                                  # 16 is not a multiple of 5
    assert ix.encoder is None
    ix.close()


def test_small_family_falls_back_to_flat_until_trainable(tmp_path):
    base = clustered(700)
    ix, ids = make(tmp_path / "ix", IVF, base[:300])
    ix.upsert(recs(base[:650], family="sdxl"))
    kind = ix.stats()["snapshots"]["sd1"]["index"]
    assert kind.startswith("Flat (fallback") and "624" in kind and "300" in kind
    assert ix.stats()["snapshots"]["sdxl"]["index"] == IVF
    assert kinds.is_flat(snapshot_index(ix)) and not kinds.is_flat(snapshot_index(ix, "sdxl"))
    q = queries(base[:300], 20)
    exact = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ base[:300].T
    assert [r[0][0] for r in ix.search(q, "sd1", 1)] == [ids[j] for j in exact.argmax(1)]   # exact while flat
    ix.upsert(recs(base[300:700], start=300))                   # 700 >= 624: trained on the catalog's vectors
    assert ix.stats()["snapshots"]["sd1"]["index"] == IVF
    assert isinstance(faiss.downcast_index(snapshot_index(ix)), faiss.IndexIVFFlat)
    assert ix.check()["ok"] and ix.count("sd1") == 700
    ix.close()
    with LoraIndex.open(tmp_path / "ix", readonly=True, device="cpu") as ro:
        assert ro.search(q, "sd1", 3) and ro.repairs == {}


def test_damaged_ivf_snapshot_is_rebuilt(tmp_path):
    base = clustered()
    q = queries(base)
    ix, _ = make(tmp_path / "ix", IVF, base, nprobe=16)
    want = ids_only(ix.search(q, "sd1", 5))
    gen = ix.stats()["snapshots"]["sd1"]["generation"]
    path = snap.snapshot_path(ix.root / "faiss", "sd1", gen)
    ix.close()
    snap.write(snap.build(DIM, *LoraIndex.open(tmp_path / "ix", readonly=True, device="cpu").catalog
                          .family_vectors("sd1", DIM)), path)  # a flat index where IVF is due
    with LoraIndex.open(tmp_path / "ix", device="cpu") as again:
        assert ids_only(again.search(q, "sd1", 5)) == want    # retrained; all lists probed: exact again
        assert "enough to train" in again.repairs["sd1"]
        assert isinstance(faiss.downcast_index(snapshot_index(again)), faiss.IndexIVFFlat)


class CpuStandInMirror(GpuMirror):
    """GpuMirror's routing with a CPU 'device': IVF copies are clones, nprobe set on the clone."""

    uploads: list = []

    def _make_resources(self):
        return None

    def _to_device(self, index):
        type(self).uploads.append(type(faiss.downcast_index(index)).__name__)
        return faiss.clone_index(index)

    def _set_nprobe(self, device_index, nprobe):
        faiss.ParameterSpace().set_index_parameter(device_index, "nprobe", nprobe)


@pytest.mark.parametrize("factory,uploaded", [(IVF, ["IndexIVFFlat"]), (HNSW, [])])
def test_gpu_copy_only_for_gpu_types(tmp_path, factory, uploaded):
    base = clustered()
    q = queries(base)
    ix, _ = make(tmp_path / "ix", factory, base)
    ix.upsert(recs(base[:20], family="small"))                  # a flat fallback family (IVF)
    cpu = ix.search(q, "sd1", 10, nprobe=3)
    CpuStandInMirror.uploads = []
    ix._gpu = CpuStandInMirror(0)
    try:
        assert ix.search(q, "sd1", 10, nprobe=3) == cpu        # nprobe reaches the copy
        assert CpuStandInMirror.uploads == uploaded
        assert set(ix.stats()["gpu_copies"]) == ({"sd1"} if uploaded else set())
        ix.search(q, "small", 3)                                # IVF: flat fallback goes up; HNSW: stays
        assert CpuStandInMirror.uploads == (uploaded + ["IndexFlatIP"] if uploaded else [])
    finally:
        ix._gpu.close()
        ix._gpu = None
        ix.close()


@pytest.mark.gpu
def test_gpu_ivf_copy_matches_cpu(tmp_path):
    from lorasearch.indexer import gpu_count
    if gpu_count() == 0:
        pytest.skip("needs a GPU build of FAISS and a CUDA device")
    base = clustered()
    q = queries(base)
    with LoraIndex.open(tmp_path / "ix", create=True, device="cuda", factory=IVF) as gix:
        gix.check_encoder("sketch", "1", DIM)
        ids = gix.upsert(recs(base))
        with LoraIndex.open(tmp_path / "ix", device="cpu") as cix:
            for nprobe in (2, 16):
                g, c = gix.search(q, "sd1", 10, nprobe=nprobe), cix.search(q, "sd1", 10, nprobe=nprobe)
                assert np.mean([len(set(a) & set(b)) for a, b in zip(ids_only(g), ids_only(c))]) >= 9.5
        assert set(gix.stats()["gpu_copies"]) == {"sd1"}
        gix.remove(ids[:100])                                   # the GPU copy follows the generation
        assert not {i for r in gix.search(q, "sd1", 10, nprobe=16) for i, _ in r} & set(ids[:100])


def test_training_thresholds():
    assert kinds.min_train("Flat", DIM) == 0 and kinds.min_train(HNSW, DIM) == 0
    assert kinds.min_train(IVF, DIM) == 16 * 39
    assert kinds.min_train("IVF16,PQ4", DIM) == 256 * 39        # the PQ codebooks need more than the lists
    assert kinds.min_train("HNSW16,SQ8", DIM) == kinds.SMALL_TRAIN_MIN


@pytest.mark.parametrize("factory", ["IVF16,SQ8", "PCA8,IVF16,Flat"])
def test_lossy_and_pretransformed_types_round_trip(tmp_path, factory):
    base = clustered()
    ix, ids = make(tmp_path / "ix", factory, base)
    assert ix.stats()["snapshots"]["sd1"]["index"] == factory
    ix.remove(ids[:30])
    before = ix.search(queries(base), "sd1", 5, nprobe=16)
    assert not {i for r in before for i, _ in r} & set(ids[:30])
    ix.close()
    with LoraIndex.open(tmp_path / "ix", readonly=True, device="cpu") as ro:
        assert ro.search(queries(base), "sd1", 5, nprobe=16) == before
        assert ro.repairs == {} and ro.check()["ok"]
