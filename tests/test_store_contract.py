"""One contract, every backend: the ``Store`` protocol and the CLI behaviours on faiss and milvus.

Milvus runs as milvus-lite inside this process: one database per test session (milvus-lite
starts in ~0.5-2 s), one collection per test, recorded in each test's index folder exactly as
``--store milvus --milvus-uri`` would record it — so every command below runs without flags.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lorasearch.adapters.writers import random_adapter, write_adapter
from lorasearch.api import Lorasearch
from lorasearch.cli import cli
from lorasearch.errors import (BadAdapterError, IncompatibleError, IndexLockedError, UnavailableError,
                               UsageError)
from lorasearch.indexer import Store, open_store
from lorasearch.indexer.base import CONFIG_FILE

pytest.importorskip("pymilvus")
DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
TARGETS = r"attention\.self\.(query|value)$"
_collections = itertools.count()


@pytest.fixture(scope="session")
def shared_db(tmp_path_factory):
    return str(tmp_path_factory.mktemp("milvus") / "shared.db")


@pytest.fixture(params=["faiss", "milvus"])
def backend(request):
    return request.param


@pytest.fixture()
def idx(tmp_path, backend, shared_db):
    """An index folder for ``backend`` (nothing created yet: the first writer creates it)."""
    path = tmp_path / "idx"
    if backend == "milvus":
        path.mkdir()
        (path / CONFIG_FILE).write_text(json.dumps({"version": 1, "store": "milvus", "uri": shared_db,
                                                    "collection": f"t{next(_collections)}"}))
    return path


def run(index: Path, *args):
    return CliRunner().invoke(cli, ["--index", str(index), *map(str, args)], catch_exceptions=False)


def vec(seed, dim=8):
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def rec(path, family="fam", seed=0, **extra):
    return {"path": str(path), "sha256": f"{seed:064x}", "family": family, "embedding": vec(seed),
            "size": 100 + seed, "mtime_ns": 10**18 + seed, "format": "peft", "ranks": [4, 8],
            "n_modules": 3, "delta_norm": 1.5, "metadata": {"k": "v", "n": seed}, "info": {"x": [1, 2]}, **extra}


@pytest.fixture()
def gallery(tmp_path):
    g = tmp_path / "gallery"
    g.mkdir()
    for i in range(6):
        ad = random_adapter("minilm", rank=4 + 4 * (i % 2), seed=i, targets=TARGETS)
        fmt = "peft" if i % 2 == 0 else "peft-file"
        write_adapter(ad, g / (f"ad{i}" if fmt == "peft" else f"ad{i}.safetensors"), fmt, dtype="F32")
    return g


# -- the Store protocol --------------------------------------------------------------------
def test_rerank_blobs_roundtrip_replace_and_remove(idx, tmp_path):
    """Both backends keep a MiB-sized re-rank record with its row (Milvus beside it, by sha256)."""
    big = bytes(range(256)) * (3 << 12)                        # 3 MiB: over any Milvus VARCHAR
    with open_store(idx, create=True) as s:
        s.check_encoder("toy", "1", 8)
        with s.writer():
            a, b, c = s.upsert([rec(tmp_path / "a", seed=1, rerank=big), rec(tmp_path / "b", seed=2, rerank=b"x"),
                                rec(tmp_path / "c", seed=3)])
        assert s.rerank_blobs([a, b, c, 999]) == {a: big, b: b"x"}
        with s.writer():
            s.upsert([rec(tmp_path / "b", seed=4, rerank=b"y")])   # new content: its own record
            s.remove([tmp_path / "a"])
        assert s.rerank_blobs([a, b, c]) == {b: b"y"}
        with pytest.raises(UsageError), s.writer():
            s.upsert([rec(tmp_path / "d", seed=5, rerank="not bytes")])
    with open_store(idx, readonly=True) as s:
        assert s.rerank_blobs([b]) == {b: b"y"}


def test_upsert_get_search_count_roundtrip(idx, tmp_path):
    with open_store(idx, create=True) as s:
        assert isinstance(s, Store)
        assert s.encoder is None and s.count() == 0 and s.search(vec(0), "fam") == [[]]
        s.check_encoder("toy", "1", 8)
        ids = s.upsert([rec(tmp_path / "a", seed=1), rec(tmp_path / "b", seed=2),
                        rec(tmp_path / "c", family="other", seed=3)])
        assert len(set(ids)) == 3
        # acknowledged = visible: no flush, no sleep
        assert s.count() == 3 and s.count("fam") == 2 and s.families() == {"fam": 2, "other": 1}
        hits = s.search(np.stack([vec(1), vec(3)]), "fam", k=10)
        assert [i for i, _ in hits[0]] [0] == ids[0] and hits[0][0][1] == pytest.approx(1.0, abs=1e-5)
        assert {i for i, _ in hits[1]} == {ids[0], ids[1]}            # never the other family
        assert hits[1][0][1] >= hits[1][1][1]
        r = s.get(ids[1])
        assert r["path"] == os.path.realpath(tmp_path / "b") and r["family"] == "fam"
        assert r["ranks"] == [4, 8] and r["metadata"] == {"k": "v", "n": 2} and r["info"] == {"x": [1, 2]}
        assert r["size"] == 102 and r["mtime_ns"] == 10**18 + 2 and r["delta_norm"] == 1.5
        assert s.by_path(tmp_path / "b")["id"] == ids[1] and s.by_path(tmp_path / "zz") is None
        assert set(s.get_many([ids[0], ids[2], 999999])) == {ids[0], ids[2]}
        np.testing.assert_allclose(s.embeddings([ids[2], ids[0]]), np.stack([vec(3), vec(1)]), atol=1e-6)
        fp = s.fingerprints()
        assert fp[os.path.realpath(tmp_path / "a")] == (ids[0], 101, 10**18 + 1, f"{1:064x}", "fam")
        assert [x["id"] for x in s.records("fam")] == sorted(ids[:2])
    with open_store(idx, readonly=True) as s:                     # persisted, reopened without flags
        assert s.count() == 3 and s.encoder == {"spec": "toy", "version": "1", "dim": 8}
        with pytest.raises(UsageError):
            s.upsert([rec(tmp_path / "d", seed=4)])


def test_ids_kept_per_path_never_reused_and_family_moves(idx, tmp_path):
    with open_store(idx, create=True) as s:
        s.check_encoder("toy", "1", 8)
        a, b = s.upsert([rec(tmp_path / "a", seed=1), rec(tmp_path / "b", seed=2)])
        added = s.get(a)["added_at"]
        assert s.upsert([rec(tmp_path / "a", seed=5)]) == [a]            # same path: same id
        assert s.get(a)["sha256"] == f"{5:064x}" and s.get(a)["added_at"] == added and s.count() == 2
        assert s.remove([b, tmp_path / "a", tmp_path / "nothing"]) == 2 and s.count() == 0
        assert s.search(vec(5), "fam") == [[]]
        (c,) = s.upsert([rec(tmp_path / "a", seed=1)])
        assert c not in (a, b)                                          # removed ids are not reused
        s.upsert([rec(tmp_path / "a", family="moved", seed=1)])         # a family change moves it
        assert s.search(vec(1), "fam") == [[]] and s.search(vec(1), "moved")[0][0][0] == c
        assert s.touch(c, size=7, mtime_ns=8) and s.get(c)["size"] == 7 and s.get(c)["mtime_ns"] == 8
        np.testing.assert_allclose(s.embeddings([c])[0], vec(1), atol=1e-6)
        assert not s.touch(123456, size=1, mtime_ns=1)


def test_encoder_recorded_and_others_refused(idx, tmp_path):
    with open_store(idx, create=True) as s:
        s.check_encoder("toy", "1", 8)
        s.upsert([rec(tmp_path / "a")])
    with open_store(idx) as s:
        for spec, version, dim in (("other", "1", 8), ("toy", "2", 8), ("toy", "1", 16)):
            with pytest.raises(IncompatibleError):
                s.check_encoder(spec, version, dim)
        with pytest.raises(IncompatibleError):
            s.upsert([dict(rec(tmp_path / "b"), embedding=np.ones(16, np.float32))])


def test_one_writer_at_a_time(idx, tmp_path):
    with open_store(idx, create=True) as s:
        s.check_encoder("toy", "1", 8)
    one, two = open_store(idx), open_store(idx)
    try:
        with one.writer():
            with pytest.raises(IndexLockedError):
                two.upsert([rec(tmp_path / "a")])
            one.upsert([rec(tmp_path / "a")])
            assert two.count() == 1                 # readers never wait for the lock
        two.upsert([rec(tmp_path / "b", seed=1)])
    finally:
        one.close()
        two.close()


# -- Milvus specifics ----------------------------------------------------------------------
def test_milvus_limits_and_hostile_paths(tmp_path, shared_db):
    from lorasearch.indexer.milvus_store import MAX_PATH

    with open_store(tmp_path / "m", milvus_uri=shared_db, collection="limits", create=True) as s:
        s.check_encoder("toy", "1", 8)
        long = "/" + "x" * (MAX_PATH + 10)
        with pytest.raises(BadAdapterError, match="path is .* bytes, over the Milvus store's limit"):
            s.upsert([rec(tmp_path / "ok"), rec(long)])
        assert s.count() == 0                                   # refused before anything was written
        with pytest.raises(BadAdapterError, match="metadata"):
            s.upsert([rec(tmp_path / "big", metadata={"blob": "y" * 70000})])
        odd = [tmp_path / 'q"uote', tmp_path / "back\\slash", tmp_path / "new\nline", tmp_path / "ctl\x01",
               tmp_path / "ünï ç😀"]
        ids = s.upsert([rec(p, seed=i) for i, p in enumerate(odd)])
        assert [s.by_path(p)["id"] for p in odd] == ids
        assert s.remove([odd[3]]) == 1 and s.by_path(odd[3]) is None and s.count() == 4


def test_milvus_unavailable_is_exit_69(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UnavailableError, match="unavailable"):
        open_store(tmp_path / "m", milvus_uri=str(blocker / "x.db"), create=True)
    assert not (tmp_path / "m" / CONFIG_FILE).exists()       # a failed creation records no choice
    res = run(tmp_path / "m2", "--milvus-uri", str(blocker / "y.db"), "add", DEMO / "gallery" / "parity-01")
    assert res.exit_code == 69 and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output
    # a server that is not there (nothing listens on port 1): a reader needs no local folder, only the URI
    res = run(tmp_path / "none", "--milvus-uri", "http://127.0.0.1:1", "query", DEMO / "gallery" / "parity-01")
    assert res.exit_code == 69 and "unavailable" in res.stderr and not (tmp_path / "none").exists()


def test_store_choice_recorded_and_mixing_refused(tmp_path, gallery):
    m, f = tmp_path / "m", tmp_path / "f"
    assert run(m, "--store", "milvus", "add", gallery / "ad1.safetensors").exit_code == 0
    cfg = json.loads((m / CONFIG_FILE).read_text())
    assert cfg["store"] == "milvus" and cfg["uri"] == str((m / "milvus.db").resolve())
    st = json.loads(run(m, "stats", "--json").stdout)             # no flags needed later
    assert st["store"] == "milvus" and st["count"] == 1
    assert run(f, "add", gallery / "ad1.safetensors").exit_code == 0
    assert json.loads((f / CONFIG_FILE).read_text())["store"] == "faiss"
    for index, args in ((m, ["--store", "faiss"]), (f, ["--store", "milvus"]),
                        (f, ["--milvus-uri", str(tmp_path / "o.db")]), (m, ["--milvus-uri", str(tmp_path / "o.db")])):
        res = run(index, *args, "stats")
        assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1 and "store" in res.stderr
    res = CliRunner().invoke(cli, ["--index", str(m), "stats"], env={"LORASEARCH_STORE": "faiss"})
    assert res.exit_code == 2
    assert run(m, "--faiss-factory", "HNSW32", "add", gallery / "ad2").exit_code == 2   # FAISS-only option
    for text in ('{"store": "milvus", "uri": 5}', '{"store": "milvus", "uri": "x.db", "collection": "a-b"}',
                 '{"store": "cassandra"}', "[1", ""):
        (m / CONFIG_FILE).write_text(text)                       # a hostile choice file: one line, exit 2
        res = run(m, "stats")
        assert res.exit_code == 2 and CONFIG_FILE in res.stderr and len(res.stderr.strip().splitlines()) == 1


# -- the CLI behaviours on both backends ---------------------------------------------------
def test_cli_index_query_match_kinds(idx, gallery, tmp_path):
    rep = json.loads(run(idx, "index", gallery, "--json").stdout)
    assert len(rep["added"]) == 6 and rep["errors"] == []
    out = json.loads(run(idx, "query", gallery / "ad1.safetensors", "-k", "3", "--json").stdout)
    assert [r["match"] for r in out["results"]] == ["exact", "similar", "similar"]
    assert out["results"][0]["path"].endswith("ad1.safetensors")
    ad = random_adapter("minilm", rank=8, seed=3, targets=TARGETS)
    for m in ad.modules:                    # same ΔW, other factors: B→BG, A→G⁻¹A
        g = np.eye(m.rank) + 0.3 * np.random.default_rng(0).standard_normal((m.rank, m.rank))
        m.B, m.A = (m.B @ g).astype(np.float32), np.linalg.solve(g, m.A).astype(np.float32)
    write_adapter(ad, tmp_path / "copy.safetensors", "peft-file", dtype="F16")
    out = json.loads(run(idx, "query", tmp_path / "copy.safetensors", "-k", "2", "--json").stdout)
    assert out["results"][0]["match"] == "same-update" and out["results"][0]["path"].endswith("ad3.safetensors")
    assert out["results"][1]["match"] == "similar"
    st = json.loads(run(idx, "stats", "--json").stdout)
    assert st["count"] == 6 and st["families"] == {"minilm": 6} and st["encoder"]["spec"] == "auto"


def test_cli_incremental_prune_add_remove(idx, gallery):
    assert run(idx, "index", gallery).exit_code == 0
    again = json.loads(run(idx, "index", gallery, "--json").stdout)
    assert again["added"] == [] and again["unchanged"] == 6
    time.sleep(0.01)
    write_adapter(random_adapter("minilm", rank=4, seed=99, targets=TARGETS), gallery / "ad1.safetensors",
                  "peft-file", dtype="F32")
    rep = json.loads(run(idx, "index", gallery, "--json").stdout)
    assert [Path(p).name for p in rep["updated"]] == ["ad1.safetensors"]
    shutil.rmtree(gallery / "ad0")
    assert json.loads(run(idx, "index", gallery, "--json").stdout)["removed"] == []
    rep = json.loads(run(idx, "index", gallery, "--prune", "--json").stdout)
    assert [Path(p).name for p in rep["removed"]] == ["ad0"]
    out = json.loads(run(idx, "query", gallery / "ad1.safetensors", "--json").stdout)
    assert len(out["results"]) == 5
    rid = [r["id"] for r in out["results"] if r["path"].endswith("ad2")][0]
    assert run(idx, "remove", rid).exit_code == 0
    assert run(idx, "remove", gallery / "ad4").exit_code == 0
    assert run(idx, "remove", "12345").exit_code == 66
    out = json.loads(run(idx, "query", gallery / "ad1.safetensors", "--json").stdout)
    assert sorted(Path(r["path"]).name for r in out["results"]) == ["ad1.safetensors", "ad3.safetensors",
                                                                     "ad5.safetensors"]
    assert run(idx, "add", gallery / "ad2").exit_code == 0
    (gallery / "bad.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{}")
    res = run(idx, "add", gallery / "bad.safetensors")
    assert res.exit_code == 65 and "bad.safetensors" in res.stderr


def test_cli_labels_on_every_store(idx, gallery):
    """tag / untag / label / query's labels behave alike on both stores (Milvus keeps them in
    tags.sqlite beside the collection); removing an adapter drops its labels; a re-indexed path keeps them."""
    assert run(idx, "index", gallery).exit_code == 0
    assert run(idx, "tag", gallery / "ad0", "style:a", "nsfw").exit_code == 0
    assert run(idx, "tag", gallery / "ad2", "style:a").exit_code == 0
    assert json.loads(run(idx, "tag", "--list", "--json").stdout)["labels"] == {"nsfw": 1, "style:a": 2}
    out = json.loads(run(idx, "query", gallery / "ad0", "--json").stdout)
    labels = {Path(r["path"]).name: r["labels"] for r in out["results"]}
    assert labels["ad0"] == ["nsfw", "style:a"] and labels["ad2"] == ["style:a"] and labels["ad4"] == []
    shutil.copytree(gallery / "ad0", gallery.parent / "ad0-copy")      # not indexed: predicted from ad0
    pred = json.loads(run(idx, "label", gallery.parent / "ad0-copy", "--json").stdout)
    assert sorted(pred["labels"]) == ["nsfw", "style:a"] and Path(pred["evidence"][0]["path"]).name == "ad0"
    assert json.loads(run(idx, "untag", gallery / "ad0", "nsfw", "--json").stdout)["removed"] == 1
    time.sleep(0.01)                                    # ad2 changes on disk: re-indexed, same id, labels kept
    write_adapter(random_adapter("minilm", rank=4, seed=77, targets=TARGETS), gallery / "ad2", "peft", dtype="F32")
    assert run(idx, "index", gallery).exit_code == 0
    assert json.loads(run(idx, "tag", "--list", "--json").stdout)["labels"] == {"style:a": 2}
    assert run(idx, "remove", gallery / "ad0").exit_code == 0
    assert json.loads(run(idx, "tag", "--list", "--json").stdout)["labels"] == {"style:a": 1}
    assert run(idx, "add", gallery / "ad0").exit_code == 0          # back with a new id: no labels
    out = json.loads(run(idx, "query", gallery / "ad0", "--json").stdout)
    assert {Path(r["path"]).name: r["labels"] for r in out["results"]}["ad0"] == []


def test_cli_families_and_encoder_refusal(idx, gallery, tmp_path):
    assert run(idx, "index", gallery).exit_code == 0
    sd = tmp_path / "sd.safetensors"
    write_adapter(random_adapter("sd15", rank=2, seed=0, targets=r"attn2\.to_(q|v)$"), sd, "kohya", dtype="F16")
    out = json.loads(run(idx, "query", sd, "--json").stdout)
    assert out["query"]["family"] == "sd1" and out["results"] == []
    assert run(idx, "add", sd).exit_code == 0
    out = json.loads(run(idx, "query", sd, "--json").stdout)
    assert [r["family"] for r in out["results"]] == ["sd1"]
    res = run(idx, "query", sd, "--encoder", "rawcos")
    assert res.exit_code == 2 and "encoder" in res.stderr


def test_watch_indexes_new_and_removed_files(idx, gallery):
    ls = Lorasearch(idx, create=True)
    ls.index_dir(gallery)
    stop = threading.Event()
    t = threading.Thread(target=ls.watch, kwargs=dict(root=gallery, interval=0.1, stop=stop.is_set))
    t.start()
    try:
        write_adapter(random_adapter("minilm", rank=4, seed=42, targets=TARGETS), gallery / "new.safetensors",
                      "peft-file", dtype="F32")
        shutil.rmtree(gallery / "ad2")
        deadline = time.time() + 20
        while time.time() < deadline:
            with Lorasearch(idx, readonly=True) as other:
                names = {Path(r["path"]).name for r in other.index.records()}
            if "new.safetensors" in names and "ad2" not in names:
                break
            time.sleep(0.1)
        assert "new.safetensors" in names and "ad2" not in names
    finally:
        stop.set()
        t.join(10)
        ls.close()


def test_demo_queries_equal_on_faiss_and_milvus(tmp_path, shared_db):
    """Same top-10 ids and scores for every demo query, with and without exact re-ranking."""
    gallery, queries = DEMO / "gallery", sorted((DEMO / "queries").iterdir())
    f = Lorasearch(tmp_path / "f", create=True)
    open_store(tmp_path / "m", milvus_uri=shared_db, collection="demo_eq", create=True).close()
    m = Lorasearch(tmp_path / "m")
    try:
        assert not f.index_dir(gallery, progress=False).errors
        assert not m.index_dir(gallery, progress=False).errors
        assert f.index.count() == m.index.count() == 28
        for q in queries:
            for rerank in (0, None):
                a = f.query(q, k=10, rerank=rerank)["results"]
                b = m.query(q, k=10, rerank=rerank)["results"]
                assert [r["id"] for r in a] == [r["id"] for r in b], (q.name, rerank)
                np.testing.assert_allclose([r["score"] for r in a], [r["score"] for r in b], atol=1e-5)
    finally:
        f.close()
        m.close()


# -- Ray ingest ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    from lorasearch.indexer.ray_ingest import start_ray

    _, started = start_ray(num_cpus=2)
    yield ray
    if started:
        ray.shutdown()


def _catalog(store) -> list[dict]:
    rows = store.records()
    for r in rows:
        r.pop("added_at"), r.pop("updated_at")
        r["embedding"] = np.round(store.embeddings([r["id"]])[0], 6).tolist()
    return rows


def test_ray_ingest_equals_plain_index_and_resumes(idx, gallery, tmp_path, local_ray, backend, shared_db):
    from lorasearch.indexer.ray_ingest import index_dir_ray

    (gallery / "truncated.safetensors").write_bytes((gallery / "ad1.safetensors").read_bytes()[:500])
    (gallery / "old.ckpt").write_bytes(b"\x80\x02" + b"\0" * 64)
    plain = Lorasearch(tmp_path / "plain", create=True,
                       **({"milvus_uri": str(tmp_path / "p.db")} if backend == "milvus" else {}))
    ray_ls = Lorasearch(idx, create=True)
    try:
        want = plain.index_dir(gallery, progress=False)
        got = index_dir_ray(ray_ls, gallery, batch_bytes=20_000, progress=False)   # several batches
        assert got.added == want.added and len(got.added) == 6
        assert sorted(got.errors) == sorted(want.errors) and len(got.errors) == 2   # same messages
        assert _catalog(ray_ls.index) == _catalog(plain.index)
        again = index_dir_ray(ray_ls, gallery, progress=False)                     # resumable
        assert again.added == [] and len(again.unchanged) == 6
        os.utime(gallery / "ad3.safetensors")                                      # same bytes, new time
        write_adapter(random_adapter("minilm", rank=4, seed=77, targets=TARGETS), gallery / "ad5.safetensors",
                      "peft-file", dtype="F32")
        rep = index_dir_ray(ray_ls, gallery, progress=False)
        assert [Path(p).name for p in rep.updated] == ["ad5.safetensors"]
        assert str((gallery / "ad3.safetensors").resolve()) in rep.unchanged
        assert ray_ls.index.by_path(gallery / "ad3.safetensors")["mtime_ns"] == \
            (gallery / "ad3.safetensors").stat().st_mtime_ns
        # the CLI: skipped files on stderr as without --ray; the Ray started above is reused
        res = run(tmp_path / "cli", "index", "--ray", gallery, "--json")
        assert res.exit_code == 0 and len(json.loads(res.stdout)["added"]) == 6
        assert "truncated.safetensors" in res.stderr and "old.ckpt" in res.stderr
        assert run(tmp_path / "cli", "index", "--ray-workers", "2", gallery).exit_code == 2
    finally:
        plain.close()
        ray_ls.close()
