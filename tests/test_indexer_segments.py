"""Base snapshot + catalog deltas (O(1) writes), compaction, schema migration, re-rank blobs,
key lookups, incremental GPU copies, and atomic index creation."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap

import faiss
import numpy as np
import pytest

from lorasearch.errors import IncompatibleError, MissingError, UsageError
from lorasearch.indexer import LoraIndex
from lorasearch.indexer import catalog as cat
from lorasearch.indexer import segments
from lorasearch.indexer import snapshot as snap
from lorasearch.indexer.gpu import GpuMirror

DIM = 16


def rec(i, family="sd1", vec=None, **extra):
    if vec is None:
        vec = np.random.default_rng(i).normal(size=DIM)
    return dict(path=f"/adapters/{i}.safetensors", sha256=f"{i:064x}", family=family,
                embedding=np.asarray(vec, np.float32), size=1000 + i, mtime_ns=i, **extra)


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture
def ix(tmp_path):
    index = LoraIndex.open(tmp_path / "ix", create=True, device="cpu")
    index.check_encoder("sketch", "1", DIM)
    yield index
    index.close()


def brute(ix, family, q, k):
    """Exact answer from the catalog's embeddings (the source of truth)."""
    ids, vecs = ix.catalog.family_vectors(family, DIM)
    scores = vecs @ unit(q)
    order = np.argsort(-scores, kind="stable")[:k]
    return [int(ids[j]) for j in order]


def reopen(ix, **kw):
    return LoraIndex.open(ix.root, device="cpu", **kw)


class Counter:
    def __init__(self, monkeypatch):
        self.reads, self.writes = [], []
        real_read, real_write = snap.read, snap.write
        monkeypatch.setattr(snap, "read", lambda path, *a, **k: (self.reads.append(path.name), real_read(path, *a, **k))[1])
        monkeypatch.setattr(snap, "write", lambda index, path: (self.writes.append(path.name), real_write(index, path))[1])


def test_single_writes_touch_only_the_catalog_until_compaction(ix, monkeypatch):
    ix.upsert([rec(i) for i in range(500)])
    ix.close()
    io = Counter(monkeypatch)
    w = reopen(ix)
    for i in range(500, 550):                       # 50 writes: delta 50 <= 10 % of 500
        w.upsert([rec(i)])
    assert io.reads == [] and io.writes == []       # no base loaded, none written: O(1) per write
    st = w.stats()["snapshots"]["sd1"]
    assert st["delta"] == 50 and st["on_disk"] and st["base"] < st["generation"]
    w.upsert([rec(550)])                            # 51 > 50: compaction, reported separately
    assert len(io.writes) == 1 and w.compactions["sd1"]["vectors"] == 551
    assert w.stats()["snapshots"]["sd1"]["delta"] == 0 and w.check()["ok"]
    w.close()


def test_fresh_reader_replays_adds_updates_removals_and_family_moves(ix):
    rng = np.random.default_rng(0)
    ids = ix.upsert([rec(i, vec=rng.normal(size=DIM)) for i in range(200)])
    ix.upsert([rec(i, "sdxl") for i in range(1000, 1100)])
    with ix.writer():                               # small deltas: none of these compacts
        ix.upsert([rec(7, vec=np.eye(DIM)[3])])     # update in place (same id, new vector)
        ix.remove([ids[0], ids[1]])
        ix.upsert([rec(9, "sdxl")])                 # moves to another family, keeps its id
        ix.upsert([rec(300)])                       # new
    assert ix.stats()["snapshots"]["sd1"]["delta"] > 0
    q = rng.normal(size=(5, DIM))
    for ro in (True, False):
        with reopen(ix, readonly=ro) as r:
            assert r.check()["ok"] and r.repairs == {}
            for fam in ("sd1", "sdxl"):
                got = [[i for i, _ in row] for row in r.search(q, fam, 10)]
                assert got == [brute(r, fam, x, 10) for x in q]
            assert r.search(np.eye(DIM)[3], "sd1", 1)[0][0] == (ids[7], pytest.approx(1.0, abs=1e-6))
            assert ids[9] in [i for i, _ in r.search(np.ones(DIM), "sdxl", 200)[0]]


def test_cached_reader_catches_up_without_reloading(ix, monkeypatch):
    ix.upsert([rec(i) for i in range(300)])
    with reopen(ix, readonly=True) as ro:
        ro.search(np.ones(DIM), "sd1", 5)
        io = Counter(monkeypatch)
        ix.upsert([rec(400, vec=np.eye(DIM)[0])])
        ix.remove("/adapters/3.safetensors")
        top = ro.search(np.eye(DIM)[0], "sd1", 1)[0][0]
        assert io.reads == [] and ro.get(top[0])["path"] == "/adapters/400.safetensors"
        assert ro.check()["ok"] and ro.count() == 300


def test_kill_between_base_write_and_commit_leaves_a_pruned_orphan(ix, monkeypatch):
    ix.upsert([rec(i) for i in range(100)])
    base = ix.stats()["snapshots"]["sd1"]["base"]

    def die(*a, **k):
        raise KeyboardInterrupt                      # stands for a kill after the rename
    monkeypatch.setattr(cat.Catalog, "set_base", die)
    with pytest.raises(KeyboardInterrupt):
        ix.upsert([rec(i) for i in range(100, 120)])  # committed, then compaction dies
    monkeypatch.undo()
    with reopen(ix) as again:
        assert again.stats()["snapshots"]["sd1"]["base"] == base and again.count() == 120
        assert again.check()["ok"] and again.repairs == {}
        again.upsert([rec(500)])                     # the next compaction prunes the orphan
        names = sorted(p.name for p in (again.root / "faiss").iterdir())
        assert names == [snap.snapshot_path(again.root / "faiss", "sd1",
                                            again.stats()["snapshots"]["sd1"]["base"]).name]


def test_compaction_policy():
    assert segments.needs_compaction(1, 0) and not segments.needs_compaction(0, 0)
    assert not segments.needs_compaction(100, 1000) and segments.needs_compaction(101, 1000)
    assert not segments.needs_compaction(10**6, -1)       # legacy read-only catalog


def _downgrade_to_schema_1(path):
    conn = sqlite3.connect(path)
    conn.executescript("""
        DROP TABLE tombstones; DROP TABLE rerank; DROP INDEX adapters_family_gen;
        ALTER TABLE adapters DROP COLUMN gen; ALTER TABLE families DROP COLUMN base;
        ALTER TABLE families DROP COLUMN base_n; UPDATE meta SET value = '1' WHERE key = 'schema_version';""")
    conn.close()


def test_schema_1_catalog_reads_as_is_and_migrates_in_place(ix):
    ids = ix.upsert([rec(i) for i in range(20)])
    want = ix.search(np.ones(DIM), "sd1", 5)
    ix.compact()
    ix.close()
    _downgrade_to_schema_1(ix.root / "catalog.sqlite")
    with reopen(ix, readonly=True) as ro:             # read-only never writes: reads schema 1 as it is
        assert ro.search(np.ones(DIM), "sd1", 5) == want and ro.repairs == {}
        assert ro.rerank_blobs(ids) == {} and ro.catalog.version == 1
    with reopen(ix) as rw:                            # a writable open migrates in one transaction
        assert rw.catalog.version == 2 and rw.catalog.meta("schema_version") == "2"
        assert rw.search(np.ones(DIM), "sd1", 5) == want and rw.repairs == {}
        rw.upsert([rec(50, rerank=b"r" * 10)])
        rw.remove(ids[0])
        assert rw.check()["ok"] and rw.rerank_blobs([rw.by_path("/adapters/50.safetensors")["id"]])
    with reopen(ix, readonly=True) as ro:
        assert ro.count() == 20 and ro.check()["ok"] and ro.repairs == {}


def test_rerank_blobs_live_and_die_with_their_row(ix):
    a, b = ix.upsert([rec(1, rerank=b"\x00\x01abc"), rec(2)])
    assert ix.rerank_blobs([a, b, 999]) == {a: b"\x00\x01abc"}
    ix.upsert([rec(2, rerank=bytearray(b"xyz"))])
    assert ix.rerank_blobs([a, b]) == {a: b"\x00\x01abc", b: b"xyz"}
    ix.upsert([rec(1)])                                # new bytes without a blob: the old one is stale
    assert ix.rerank_blobs([a, b]) == {b: b"xyz"}
    ix.remove(b)
    assert ix.rerank_blobs([a, b]) == {}
    with pytest.raises(UsageError, match="rerank must be bytes"):
        ix.upsert([rec(3, rerank="text")])
    with pytest.raises(UsageError, match="exceeds"):
        ix.upsert([rec(3, rerank=b"x" * (cat.RERANK_MAX_BYTES + 1))])
    assert ix.count() == 1                             # refused before anything was written


def test_key_lookups(ix, tmp_path):
    ids = ix.upsert([rec(i, "sd1" if i % 2 else "flux") for i in range(10)])
    fp = ix.fingerprints_for(["/adapters/3.safetensors", "/adapters/4.safetensors", "/adapters/nope"])
    full = ix.fingerprints()
    assert fp == {p: full[p] for p in ("/adapters/3.safetensors", "/adapters/4.safetensors")}
    assert fp["/adapters/4.safetensors"] == (ids[4], 1004, 4, f"{4:064x}", "flux")
    many = ix.get_many([ids[5], 12345, ids[0]])
    assert set(many) == {ids[5], ids[0]} and many[ids[5]] == ix.get(ids[5])
    assert ix.fingerprints_for([]) == {} and ix.get_many([]) == {}
    brief = ix.get_many([ids[5]], brief=True)[ids[5]]
    assert brief == {k: v for k, v in many[ids[5]].items() if k not in ("ranks", "metadata", "info")}


class StandIn(GpuMirror):
    def _make_resources(self):
        return None

    def _to_device(self, flat):
        return faiss.clone_index(flat)


def test_gpu_copy_extended_by_adds_reuploaded_after_removals_and_updates(ix):
    ids = ix.upsert([rec(i) for i in range(100)])
    q = np.random.default_rng(2).normal(size=(4, DIM))
    ix._gpu = StandIn(0)
    try:
        ix._gpu_k = None
        ix.search(q, "sd1", 5)
        ix.upsert([rec(200, vec=np.eye(DIM)[1])])
        assert ix.search(np.eye(DIM)[1], "sd1", 1)[0][0][0] == ix.by_path("/adapters/200.safetensors")["id"]
        assert (ix._gpu.uploads, ix._gpu.appends) == (1, 1)
        ix.upsert([rec(200, vec=np.eye(DIM)[2])])            # update of the *last* id: same id map, new vector
        assert ix.search(np.eye(DIM)[2], "sd1", 1)[0][0][1] == pytest.approx(1.0, abs=1e-6)
        assert ix._gpu.uploads == 2
        ix.remove(ids[:10])
        got = ix.search(q, "sd1", 10)
        assert ix._gpu.uploads == 3 and [[i for i, _ in r] for r in got] == [brute(ix, "sd1", x, 10) for x in q]
    finally:
        ix._gpu.close()
        ix._gpu = None


# -- atomic creation ----------------------------------------------------------------------------
def test_unfinished_catalog_is_recreated_and_readers_say_so(tmp_path):
    root = tmp_path / "ix"
    root.mkdir()
    (root / "catalog.sqlite").write_bytes(b"")          # what a kill left behind before this fix
    with pytest.raises(MissingError, match="never finished"):
        LoraIndex.open(root, device="cpu")
    with pytest.raises(MissingError, match="never finished"):
        LoraIndex.open(root, readonly=True, device="cpu")
    with LoraIndex.open(root, create=True, device="cpu") as ix:
        ix.check_encoder("sketch", "1", DIM)
        ix.upsert([rec(1)])
    with LoraIndex.open(root, readonly=True, device="cpu") as ro:
        assert ro.count() == 1
    # an SQLite file with no tables at all (killed after the header, before the schema committed)
    sqlite3.connect(tmp_path / "empty.sqlite").execute("PRAGMA user_version = 0").connection.close()
    conn = sqlite3.connect(tmp_path / "hdr.sqlite")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    assert cat.classify(tmp_path / "hdr.sqlite") == "unfinished"


@pytest.mark.parametrize("content", ["text", "sqlite-other"])
def test_foreign_file_is_never_overwritten(tmp_path, content):
    root = tmp_path / "ix"
    root.mkdir()
    target = root / "catalog.sqlite"
    if content == "text":
        target.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    else:
        conn = sqlite3.connect(target)
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.execute("INSERT INTO notes VALUES ('keep me')")
        conn.commit()
        conn.close()
    before = target.read_bytes()
    for create in (True, False):
        with pytest.raises(IncompatibleError, match="not a lorasearch catalog") as e:
            LoraIndex.open(root, create=create, device="cpu")
        assert e.value.exit_code == 2 and "root:x" not in str(e.value) and "\n" not in str(e.value)
    assert target.read_bytes() == before


def test_creation_leaves_no_partial_file_and_cleans_dead_temps(tmp_path):
    root = tmp_path / "ix"
    root.mkdir()
    dead = root / ".catalog.sqlite.creating-999999999-1"     # a creator killed mid-way (pid gone)
    dead.write_bytes(b"partial")
    with LoraIndex.open(root, create=True, device="cpu"):
        pass
    assert not dead.exists()
    assert sorted(p.name for p in root.iterdir() if "creating" in p.name) == []
    assert cat.classify(root / "catalog.sqlite") == "catalog"
    # published already in WAL mode: no first-open conversion whose kill would leave a hot rollback
    # journal that read-only openers cannot roll back (found by the kill trials)
    assert (root / "catalog.sqlite").read_bytes()[18:20] == b"\x02\x02"


KILLER = textwrap.dedent("""
    import os, sys
    from lorasearch.indexer import catalog
    real = catalog.Catalog.create
    def create(path, meta=None, wal=True):
        c = real(path, meta, wal)
        os.kill(os.getpid(), 9)                       # killed with the temp catalog complete, unpublished
    catalog.Catalog.create = staticmethod(create)
    from lorasearch.indexer import LoraIndex
    LoraIndex.open(sys.argv[1], create=True, device="cpu")
""")


def test_kill_during_creation_leaves_no_catalog(tmp_path):
    root = tmp_path / "ix"
    out = subprocess.run([sys.executable, "-c", KILLER, str(root)], capture_output=True, text=True)
    assert out.returncode == -9
    assert not (root / "catalog.sqlite").exists()
    with LoraIndex.open(root, create=True, device="cpu") as ix:    # and the next run just creates it
        assert ix.count() == 0
    assert [p.name for p in root.iterdir() if "creating" in p.name] == []


def test_hnsw_removal_by_a_cold_writer_is_compacted_not_left_to_readers(tmp_path):
    rng = np.random.default_rng(3)
    base = rng.normal(size=(1200, DIM)).astype(np.float32)
    with LoraIndex.open(tmp_path / "ix", create=True, device="cpu", factory="HNSW32") as ix:
        ix.check_encoder("sketch", "1", DIM)
        ids = ix.upsert([rec(i, vec=base[i]) for i in range(1200)])
    with LoraIndex.open(tmp_path / "ix", device="cpu") as cold:     # nothing cached: O(1) path
        cold.remove(ids[:3])
        cold.upsert([rec(5, vec=base[7])])                          # an update needs a removal too
        st = cold.stats()["snapshots"]["sd1"]
        assert st["delta"] == 0 and st["on_disk"] and cold.repairs == {}
    with LoraIndex.open(tmp_path / "ix", readonly=True, device="cpu") as ro:
        assert ro.count() == 1197 and ro.check()["ok"] and ro.repairs == {}
        assert type(faiss.downcast_index(ro._family_index("sd1")[0].index)).__name__ == "IndexHNSWFlat"


def test_reader_catches_up_across_a_family_that_emptied_and_came_back(ix, monkeypatch):
    ids = ix.upsert([rec(i) for i in range(30)])
    with reopen(ix, readonly=True) as ro:
        ro.search(np.ones(DIM), "sd1", 5)                  # cached at this generation
        monkeypatch.setattr(ix, "_compact", lambda family: None)   # as if killed before compacting
        ix.remove(ids)                                     # the family empties (row and base go)
        ix.upsert([rec(i) for i in range(100, 103)])       # and comes back with other adapters
        assert ro.catalog.family_state("sd1")[1] == 0      # no base: the reader must replay tombstones
        got = {i for i, _ in ro.search(np.ones(DIM), "sd1", 50)[0]}
        assert got == {r["id"] for r in ro.records("sd1")} and len(got) == 3
        assert ro.check()["ok"]
