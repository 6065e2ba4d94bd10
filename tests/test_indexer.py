"""The vector store: persistence, incremental writes, families, encoder pinning, locking, repair, crash."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import faiss
import numpy as np
import pytest

from lorasearch.errors import (EXIT_LOCKED, EXIT_MISSING, EXIT_UNAVAILABLE, IncompatibleError,
                               IndexLockedError, MissingError, UnavailableError, UsageError)
from lorasearch.indexer import LoraIndex, gpu_count
from lorasearch.indexer import snapshot as snap
from lorasearch.indexer.gpu import GpuMirror

DIM = 16


def rec(i, family="sd1", vec=None, rng=None, **extra):
    if vec is None:
        vec = (rng or np.random.default_rng(i)).normal(size=DIM)
    return dict(path=f"/adapters/{family}/{i}.safetensors", sha256=f"{i:064x}", family=family,
                embedding=np.asarray(vec, np.float32), size=1000 + i, mtime_ns=i, format="kohya",
                ranks={"m": 4}, n_modules=3, delta_norm=1.5, metadata={"ss_x": str(i)}, info={"n": i}, **extra)


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture
def ix(tmp_path):
    index = LoraIndex.open(tmp_path / "ix", create=True, device="cpu")
    index.check_encoder("sketch", "1", DIM)
    yield index
    index.close()


def snapshot_files(index):
    return sorted(p.name for p in (index.root / "faiss").iterdir())


def test_missing_index_is_missing_error(tmp_path):
    with pytest.raises(MissingError) as e:
        LoraIndex.open(tmp_path / "nope")
    assert e.value.exit_code == EXIT_MISSING and str(tmp_path / "nope") in str(e.value)


def test_corrupt_catalog_is_refused_with_its_path(tmp_path):
    (tmp_path / "ix").mkdir()
    (tmp_path / "ix" / "catalog.sqlite").write_bytes(b"this is not sqlite" * 100)
    for readonly in (True, False):
        with pytest.raises(IncompatibleError, match="not a lorasearch catalog") as e:
            LoraIndex.open(tmp_path / "ix", readonly=readonly, device="cpu")
        assert str(tmp_path / "ix" / "catalog.sqlite") in str(e.value)


def test_persistence_across_reopen(ix, tmp_path):
    ids = ix.upsert([rec(i) for i in range(20)] + [rec(i, "sdxl") for i in range(20, 25)])
    assert ids == list(range(1, 26))
    q = np.random.default_rng(99).normal(size=(3, DIM))
    before = ix.search(q, "sd1", 5)
    ix.close()
    for readonly in (True, False):
        with LoraIndex.open(tmp_path / "ix", readonly=readonly, device="cpu") as again:
            assert again.count() == 25 and again.families() == {"sd1": 20, "sdxl": 5}
            assert again.search(q, "sd1", 5) == before
            assert again.repairs == {}                      # the snapshot on disk was valid
            r = again.get(3)
            assert r["path"] == "/adapters/sd1/2.safetensors" and r["ranks"] == {"m": 4}
            assert r["metadata"] == {"ss_x": "2"} and r["size"] == 1002 and r["delta_norm"] == 1.5
            assert again.by_path("/adapters/sd1/2.safetensors")["id"] == 3
            assert [x["id"] for x in again.by_sha256(f"{2:064x}")] == [3]
            assert [x["id"] for x in again.records("sdxl")] == [21, 22, 23, 24, 25]
            assert again.check()["ok"]
            assert again.fingerprints()["/adapters/sd1/2.safetensors"] == (3, 1002, 2, f"{2:064x}", "sd1")


def test_search_matches_numpy_brute_force(ix):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(300, DIM)).astype(np.float32)
    ids = ix.upsert([rec(i, vec=base[i]) for i in range(300)])
    queries = rng.normal(size=(25, DIM)).astype(np.float32)
    got = ix.search(queries, "sd1", 10)
    scores = unit(queries) @ unit(base).T
    for qi, row in enumerate(got):
        order = np.argsort(-scores[qi])[:10]
        assert [i for i, _ in row] == [ids[j] for j in order]
        np.testing.assert_allclose([s for _, s in row], scores[qi, order], atol=1e-5)
    # k larger than the family, a single 1-D query, a zero query
    assert len(ix.search(queries[0], "sd1", 1000)[0]) == 300
    assert all(abs(s) < 1e-6 for _, s in ix.search(np.zeros(DIM), "sd1", 3)[0])


def test_upsert_replaces_by_path_and_keeps_ids(ix):
    ids = ix.upsert([rec(i) for i in range(10)])
    target = np.eye(DIM, dtype=np.float32)[0]
    assert ix.upsert([rec(4, vec=target * 3)]) == [ids[4]]          # same path -> same id
    assert ix.count() == 10
    assert ix.search(target, "sd1", 1)[0][0] == (ids[4], pytest.approx(1.0, abs=1e-6))
    np.testing.assert_allclose(ix.embeddings([ids[4]])[0], target)  # stored normalized
    # a path whose family changes moves to the other family's index, keeping its id
    ix.upsert([rec(4, "sdxl", vec=target)])                          # a different path: new id
    assert ix.upsert([dict(rec(5, vec=target), family="sdxl")]) == [ids[5]]
    assert ix.by_path("/adapters/sd1/5.safetensors")["family"] == "sdxl"
    assert ix.families() == {"sd1": 9, "sdxl": 2}
    assert ids[5] not in [i for i, _ in ix.search(target, "sd1", 20)[0]]
    assert ix.check()["ok"]


def test_touch_refreshes_stat_only(ix):
    ids = ix.upsert([rec(1)])
    gen = ix.stats()["generation"]
    assert ix.touch(ids[0], size=77, mtime_ns=123) and not ix.touch(999, size=1)
    r = ix.get(ids[0])
    assert (r["size"], r["mtime_ns"], r["sha256"]) == (77, 123, f"{1:064x}")
    assert ix.stats()["generation"] == gen and ix.encoder_spec() == "sketch"


def test_remove_by_id_and_path_and_ids_never_reused(ix):
    ids = ix.upsert([rec(i) for i in range(6)] + [rec(9, "flux")])
    assert ix.remove([ids[0], "/adapters/sd1/1.safetensors", 12345, "/not/indexed"]) == 2
    assert ix.remove(ids[0]) == 0
    assert ix.count("sd1") == 4 and ix.get(ids[0]) is None
    left = {i for i, _ in ix.search(np.ones(DIM), "sd1", 10)[0]}
    assert left == set(ids[2:6])
    assert ix.remove(ids[6]) == 1 and "flux" not in ix.families()
    assert not any(f.startswith("flux") for f in snapshot_files(ix))   # empty family: snapshot pruned
    new = ix.upsert([rec(0)])                                        # same path re-added: fresh id
    assert new[0] > max(ids)
    res = ix.check()
    assert res["ok"] and res["families"]["sd1"] == {"catalog": 5, "faiss": 5, "generation": res["families"]["sd1"]["generation"], "on_disk": True}


def test_families_are_never_mixed(ix):
    v = np.ones(DIM)
    a = ix.upsert([rec(1, "sd1", vec=v)])[0]
    b = ix.upsert([rec(2, "sdxl", vec=v)])[0]
    assert ix.search(v, "sd1", 10) == [[(a, pytest.approx(1.0, abs=1e-6))]]
    assert ix.search(v, "sdxl", 10) == [[(b, pytest.approx(1.0, abs=1e-6))]]
    assert ix.search(v, "flux", 10) == [[]]
    assert len(snapshot_files(ix)) == 2


def test_encoder_is_pinned_by_first_writer(tmp_path):
    with LoraIndex.open(tmp_path / "ix", create=True, device="cpu") as ix:
        with pytest.raises(UsageError, match="check_encoder"):
            ix.upsert([rec(1)])
        with LoraIndex.open(tmp_path / "ix", readonly=True, device="cpu") as ro:
            ro.check_encoder("rawcos", "1", 8)      # read-only on an empty index records nothing
        assert ix.encoder is None
        ix.check_encoder("sketch", "2", DIM)
        ix.check_encoder("sketch", "2", DIM)
    with LoraIndex.open(tmp_path / "ix", device="cpu") as ix:
        for bad in (("rawcos", "2", DIM), ("sketch", "3", DIM), ("sketch", "2", DIM * 2)):
            with pytest.raises(IncompatibleError) as e:
                ix.check_encoder(*bad)
            assert "sketch v2" in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(IncompatibleError, match="dim"):
            ix.upsert([rec(1, vec=np.ones(DIM + 1))])
        with pytest.raises(IncompatibleError, match="dim"):
            ix.search(np.ones(DIM + 1), "sd1", 1)
        assert ix.stats()["encoder"] == {"spec": "sketch", "version": "2", "dim": DIM}


def test_bad_records_refused_without_side_effects(ix):
    bad_vec = np.ones(DIM)
    bad_vec[3] = np.nan
    with pytest.raises(UsageError, match="NaN"):
        ix.upsert([rec(1), rec(2, vec=bad_vec)])
    with pytest.raises(UsageError, match="twice"):
        ix.upsert([rec(1), rec(1)])
    with pytest.raises(UsageError, match="sha256"):
        ix.upsert([{k: v for k, v in rec(1).items() if k != "sha256"}])
    assert ix.count() == 0 and ix.stats()["generation"] == 0


def test_readonly_refuses_writes(ix, tmp_path):
    ix.upsert([rec(1)])
    with LoraIndex.open(tmp_path / "ix", readonly=True, device="cpu") as ro:
        with pytest.raises(UsageError, match="read-only"):
            ro.upsert([rec(2)])
        with pytest.raises(UsageError, match="read-only"):
            ro.remove(1)


def test_second_writer_refused_reader_not_blocked(ix, tmp_path):
    ix.upsert([rec(i) for i in range(5)])
    with LoraIndex.open(tmp_path / "ix", device="cpu") as other, \
            LoraIndex.open(tmp_path / "ix", readonly=True, device="cpu") as reader:
        with ix.writer():
            ix.upsert([rec(10)])
            with pytest.raises(IndexLockedError) as e:
                other.upsert([rec(11)])
            assert e.value.exit_code == EXIT_LOCKED
            assert f"pid {os.getpid()}" in str(e.value) and str(ix.root) in str(e.value)
            t0 = time.monotonic()
            assert len(reader.search(np.ones(DIM), "sd1", 10)[0]) == 6   # sees the committed write
            assert len(other.search(np.ones(DIM), "sd1", 10)[0]) == 6
            assert time.monotonic() - t0 < 2
        assert other.upsert([rec(11)]) == [7]      # lock released at the end of the block


def test_reader_not_blocked_by_open_write_transaction(ix, tmp_path):
    """WAL: a writer in the middle of a transaction never blocks readers (a rollback journal would)."""
    import sqlite3
    ix.upsert([rec(i) for i in range(3)])
    raw = sqlite3.connect(ix.root / "catalog.sqlite", isolation_level=None)
    raw.execute("BEGIN IMMEDIATE")
    raw.execute("DELETE FROM adapters")
    try:
        with LoraIndex.open(tmp_path / "ix", readonly=True, device="cpu") as ro:
            t0 = time.monotonic()
            assert ro.count() == 3 and len(ro.search(np.ones(DIM), "sd1", 5)[0]) == 3
            assert time.monotonic() - t0 < 1
    finally:
        raw.execute("ROLLBACK")
        raw.close()


def test_threads_share_one_index(ix):
    ix.upsert([rec(i) for i in range(50)])
    errors = []

    def reader():
        try:
            for _ in range(30):
                rows = ix.search(np.ones(DIM), "sd1", 5)[0]
                assert len(rows) == 5 and len({i for i, _ in rows}) == 5
        except Exception as e:           # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for start in range(50, 80, 5):
        ix.upsert([rec(i) for i in range(start, start + 5)])
    for t in threads:
        t.join(10)
    assert not errors and ix.check()["ok"] and ix.count() == 80


def test_lock_timeout_waits_for_release(ix, tmp_path):
    other = LoraIndex.open(tmp_path / "ix", device="cpu", lock_timeout=5)
    with ix.writer():
        done = []
        th = threading.Thread(target=lambda: done.append(other.upsert([rec(1)])))
        th.start()
        time.sleep(0.3)
        assert not done                             # still waiting for the lock
    th.join(5)
    assert done == [[1]]
    other.close()


HOLDER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from lorasearch.indexer import LoraIndex
    ix = LoraIndex.open(sys.argv[1], device="cpu")
    with ix.writer():
        ix.upsert([dict(path="/adapters/held.safetensors", sha256="ab" * 32, family="sd1",
                        embedding=np.ones({dim}, np.float32))])
        print("held", flush=True)
        if sys.argv[2] == "crash":
            import os; os._exit(3)              # committed, snapshot never written
        sys.stdin.read()                         # hold until the parent closes stdin
""").format(dim=DIM)


def test_lock_held_by_other_process(ix, tmp_path):
    ix.upsert([rec(1)])
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(ix.root), "hold"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(IndexLockedError, match=f"pid {proc.pid}"):
            ix.upsert([rec(2)])
        with LoraIndex.open(ix.root, device="cpu", lock_timeout=0.2) as patient:
            with pytest.raises(IndexLockedError, match="after waiting 0.2s"):
                patient.upsert([rec(2)])
        assert ix.count() == 2                                      # reader sees the other's commit
        assert len(ix.search(np.ones(DIM), "sd1", 5)[0]) == 2       # and searches without waiting
    finally:
        proc.stdin.close()
        proc.wait(10)
    assert ix.upsert([rec(2)]) == [3]


def test_crash_between_commit_and_snapshot(ix, tmp_path):
    ix.upsert([rec(i) for i in range(4)])
    out = subprocess.run([sys.executable, "-c", HOLDER, str(ix.root), "crash"], capture_output=True, text=True)
    assert out.returncode == 3 and out.stdout.strip() == "held"
    ix.close()
    with LoraIndex.open(tmp_path / "ix", device="cpu") as again:
        assert again.count() == 5                       # the acknowledged write survived
        top = again.search(np.ones(DIM), "sd1", 1)[0][0]
        assert again.get(top[0])["path"] == "/adapters/held.safetensors"
        assert again.repairs == {}                      # replayed from the catalog onto the base, no rebuild
        assert again.check()["ok"]
        assert again.stats()["snapshots"]["sd1"]["on_disk"]     # the delta (1 of 4) was compacted
        assert again.stats()["snapshots"]["sd1"]["delta"] == 0
        assert len(snapshot_files(again)) == 1                  # and the old base pruned
    with LoraIndex.open(tmp_path / "ix", device="cpu") as third:
        third.search(np.ones(DIM), "sd1", 1)
        assert third.repairs == {}


@pytest.mark.parametrize("damage", ["delete", "garbage", "truncate", "other-vectors", "extra-id"])
def test_damaged_snapshot_is_rebuilt(ix, tmp_path, damage):
    rng = np.random.default_rng(1)
    base = rng.normal(size=(40, DIM)).astype(np.float32)
    ids = ix.upsert([rec(i, vec=base[i]) for i in range(40)])
    q = rng.normal(size=(4, DIM))
    expected = ix.search(q, "sd1", 5)
    gen = ix.stats()["snapshots"]["sd1"]["generation"]
    path = snap.snapshot_path(ix.root / "faiss", "sd1", gen)
    ix.close()
    if damage == "delete":
        path.unlink()
    elif damage == "garbage":
        path.write_bytes(os.urandom(4096))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "other-vectors":
        snap.write(snap.build(DIM, np.array(ids, np.int64), unit(rng.normal(size=(40, DIM)))), path)
    elif damage == "extra-id":
        index = snap.build(DIM, np.array(ids, np.int64), unit(base))
        index.add_with_ids(unit(base[:1]), np.array([ids[0]], np.int64))   # FAISS accepts the duplicate
        snap.write(index, path)
    with LoraIndex.open(tmp_path / "ix", readonly=True, device="cpu") as ro:    # read-only: repairs in memory
        assert ro.search(q, "sd1", 5) == expected
        assert "sd1" in ro.repairs and ro.check()["ok"]
    with LoraIndex.open(tmp_path / "ix", device="cpu") as rw:                   # writable: repair persisted
        assert rw.search(q, "sd1", 5) == expected and "sd1" in rw.repairs
    with LoraIndex.open(tmp_path / "ix", readonly=True, device="cpu") as ro:
        assert ro.search(q, "sd1", 5) == expected and ro.repairs == {}


def test_writer_batches_snapshot_writes(ix, monkeypatch):
    writes = []
    real_write = snap.write
    monkeypatch.setattr(snap, "write", lambda index, path: (writes.append(path.name), real_write(index, path)))
    with ix.writer():
        for start in range(0, 100, 10):
            ix.upsert([rec(i, "sd1" if i % 2 else "sdxl") for i in range(start, start + 10)])
        ix.remove([1, 2])
        assert writes == [] and not ix.stats()["snapshots"]["sd1"]["on_disk"]
    assert sorted(writes) == sorted(snapshot_files(ix)) and len(writes) == 2
    writes.clear()
    ix.upsert([rec(500)])                     # outside writer(): a small delta stays in the catalog
    assert writes == [] and ix.stats()["snapshots"]["sd1"]["delta"] == 1
    assert ix.check()["ok"] and ix.count() == 99


def test_writer_block_error_keeps_committed_work(ix, tmp_path):
    stray = ix.root / "faiss" / ".sd1.g7.faiss.tmp-4242"          # left by a writer killed mid-write
    stray.write_bytes(b"partial")
    with pytest.raises(RuntimeError, match="boom"):
        with ix.writer():
            ix.upsert([rec(i) for i in range(3)])
            raise RuntimeError("boom")
    assert not stray.exists() and ix.stats()["snapshots"]["sd1"]["on_disk"]
    with LoraIndex.open(tmp_path / "ix", readonly=True, device="cpu") as ro:
        assert ro.count() == 3 and ro.check()["ok"] and ro.search(np.ones(DIM), "sd1", 5) and ro.repairs == {}


def test_mmapped_reader_survives_snapshot_replacement(ix, tmp_path):
    ix.upsert([rec(i) for i in range(10)])
    with LoraIndex.open(tmp_path / "ix", readonly=True, device="cpu") as ro:
        first = ro.search(np.ones(DIM), "sd1", 20)
        ix.upsert([rec(i) for i in range(10, 15)])          # replaces and prunes the file ro has mapped
        assert len(first[0]) == 10
        assert len(ro.search(np.ones(DIM), "sd1", 20)[0]) == 15    # the new generation is picked up
        assert ro.check()["ok"]


def test_embeddings_in_requested_order(ix):
    vecs = np.random.default_rng(5).normal(size=(3, DIM)).astype(np.float32)
    ids = ix.upsert([rec(i, vec=vecs[i]) for i in range(3)])
    np.testing.assert_allclose(ix.embeddings([ids[2], ids[0]]), unit(vecs[[2, 0]]), rtol=1e-6)
    with pytest.raises(MissingError, match="id 999"):
        ix.embeddings([ids[0], 999])


def test_device_cuda_without_gpu_is_unavailable(tmp_path):
    if gpu_count() > 0:
        pytest.skip("a GPU is present")
    with pytest.raises(UnavailableError) as e:
        LoraIndex.open(tmp_path / "ix", create=True, device="cuda")
    assert e.value.exit_code == EXIT_UNAVAILABLE
    with pytest.raises(UsageError):
        LoraIndex.open(tmp_path / "ix", create=True, device="tpu")


class CpuStandInMirror(GpuMirror):
    """Runs GpuMirror's bookkeeping (generation keys, id mapping, worker thread) with a CPU 'device'."""

    uploads = 0

    def _make_resources(self):
        return None

    def _to_device(self, flat):
        type(self).uploads += 1
        return faiss.clone_index(flat)


def test_gpu_mirror_bookkeeping_without_a_gpu(ix, monkeypatch):
    rng = np.random.default_rng(4)
    base = rng.normal(size=(200, DIM)).astype(np.float32)
    ids = ix.upsert([rec(i, vec=base[i]) for i in range(150)] + [rec(i, "sdxl", vec=base[i]) for i in range(150, 200)])
    q = rng.normal(size=(7, DIM))
    cpu = ix.search(q, "sd1", 10)
    ix._gpu = CpuStandInMirror(0)
    try:
        assert ix.search(q, "sd1", 10) == cpu and CpuStandInMirror.uploads == 1
        one = ix.search(q[:1], "sd1", 10)[0]          # single query: SIMD vs BLAS rounding, same order
        assert [i for i, _ in one] == [i for i, _ in cpu[0]] and CpuStandInMirror.uploads == 1   # copy reused
        ix.remove(ids[:100])                                              # new generation -> re-upload
        after = ix.search(q, "sd1", 200)
        assert CpuStandInMirror.uploads == 2 and all(len(r) == 50 and min(i for i, _ in r) > ids[99] for r in after)
        assert ix.search(q, "sdxl", 3)[0][0][0] in ids[150:] and CpuStandInMirror.uploads == 3
        assert set(ix.stats()["gpu_copies"]) == {"sd1", "sdxl"}
        monkeypatch.setattr("lorasearch.indexer.store.GPU_MAX_K", 5)      # large k is answered on CPU
        ix.upsert([rec(500)])
        ix.search(q, "sd1", 10)
        assert CpuStandInMirror.uploads == 3
    finally:
        ix._gpu.close()
        ix._gpu = None


@pytest.mark.gpu
def test_gpu_copy_matches_cpu(tmp_path):
    if gpu_count() == 0:
        pytest.skip("needs a GPU build of FAISS and a CUDA device")
    rng = np.random.default_rng(3)
    base = rng.normal(size=(2000, DIM)).astype(np.float32)
    with LoraIndex.open(tmp_path / "ix", create=True, device="cuda") as gix, \
            LoraIndex.open(tmp_path / "ix", device="cpu") as cix:
        gix.check_encoder("sketch", "1", DIM)
        gix.upsert([rec(i, vec=base[i]) for i in range(2000)])
        q = rng.normal(size=(50, DIM))
        assert gix.stats()["gpu"] and gix.stats()["device"] == "cuda:0"
        g, c = gix.search(q, "sd1", 10), cix.search(q, "sd1", 10)
        assert [[i for i, _ in r] for r in g] == [[i for i, _ in r] for r in c]
        np.testing.assert_allclose([[s for _, s in r] for r in g], [[s for _, s in r] for r in c], atol=1e-4)
        gix.remove(list(range(1, 1001)))                          # the GPU copy follows the generation
        assert all(i > 1000 for r in gix.search(q, "sd1", 10) for i, _ in r)
        assert len(gix.search(q[:1], "sd1", 3000)[0]) == 1000    # k > 2048 path falls back to CPU
