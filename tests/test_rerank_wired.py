"""Re-ranking wired through ingest and query (issue 8): records stored at index time, a query
re-scores from them without opening any candidate file, on real SD1.5 kohya shapes (264 modules)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import lorasearch.ingest as ingest
import lorasearch.query as query_mod
from lorasearch.adapters.writers import random_adapter, write_adapter
from lorasearch.api import Lorasearch
from lorasearch.types import LoraAdapter, LoraModule

RANK = 4   # SD1.5 r4 in float32: 9.45 MB of factors per adapter, 4.7 MB of fp16 triplets


def _reparam(ad: LoraAdapter, seed: int) -> LoraAdapter:
    """B → BG, A → G⁻¹A: another factorization of the same ΔW (float64 solve, stored as float32)."""
    rng = np.random.default_rng(seed)
    mods = []
    for m in ad.modules:
        G = rng.standard_normal((m.rank, m.rank)) / np.sqrt(m.rank) + 2 * np.eye(m.rank)
        mods.append(LoraModule(m.name, np.linalg.solve(G, m.A.astype(np.float64)).astype(np.float32),
                               (m.B.astype(np.float64) @ G).astype(np.float32), m.scale, "F32", m.shape, m.alpha))
    return LoraAdapter("", "memory", "", ad.family, mods)


def _scaled(ad: LoraAdapter, f: float) -> LoraAdapter:
    return LoraAdapter("", "memory", "", ad.family, [LoraModule(m.name, m.A, m.B, m.scale * f, m.dtype, m.shape,
                                                                m.alpha * f) for m in ad.modules])


EXPECT = {"copy.safetensors": "same-update", "fp16.safetensors": "same-update", "diffusers.safetensors": "same-update",
          "reparam.safetensors": "same-update", "x2.safetensors": "similar", "other.safetensors": "similar"}


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """The query (kohya F32, outside the gallery) and a gallery of its relatives, SD1.5 shapes."""
    root = tmp_path_factory.mktemp("sd15")
    base = random_adapter("sd15", rank=RANK, seed=1, dtype="float16")   # fp16-exact values: fp16 copy is lossless
    gal = root / "gallery"
    gal.mkdir()
    q = write_adapter(base, root / "query.safetensors", "kohya", dtype="F32")
    write_adapter(base, gal / "copy.safetensors", "kohya", dtype="F32", metadata={"note": "a copy"})
    write_adapter(base, gal / "fp16.safetensors", "kohya", dtype="F16")
    write_adapter(base, gal / "diffusers.safetensors", "diffusers", dtype="F32")
    write_adapter(_reparam(base, 7), gal / "reparam.safetensors", "kohya", dtype="F32")
    write_adapter(_scaled(base, 2.0), gal / "x2.safetensors", "kohya", dtype="F32")
    write_adapter(random_adapter("sd15", rank=RANK, seed=2), gal / "other.safetensors", "kohya", dtype="F32")
    return q, gal


def _index(tmp_path: Path, gal: Path, monkeypatch, budget: int | None, records: bool = True) -> Path:
    monkeypatch.setattr(ingest, "RERANK_BUDGET", budget)
    if not records:   # an index built before re-rank records existed
        monkeypatch.setattr(ingest, "rerank_blob", lambda adapter: None)
    idx = tmp_path / "idx"
    with Lorasearch(idx, create=True) as ls:
        assert len(ls.index_dir(gal).added) == len(EXPECT)
        assert len(ls.index.rerank_blobs(range(1, 100))) == (len(EXPECT) if records else 0)
    return idx


def _query(idx: Path, q: Path):
    with Lorasearch(idx) as ls:
        return ls.query(q, k=10)


def _no_file_reads(monkeypatch) -> list:
    opened = []

    def refuse(rec):
        opened.append(rec["path"])
        raise AssertionError(f"candidate file {rec['path']} was re-read")
    monkeypatch.setattr(query_mod, "load_indexed", refuse)
    return opened


def _kinds(res) -> dict[str, str]:
    return {Path(h.path).name: h.match for h in res.hits}


@pytest.mark.parametrize("budget", [32 << 20, 6 << 20], ids=["lossless", "fp16-svd"])
def test_query_decides_from_records_without_reading_candidate_files(sd15, tmp_path, monkeypatch, budget):
    """32 MiB: lossless records, exact scores. 6 MiB: below the float32 factors (svd record) but every
    triplet fits in fp16, so copies are proven same-update with a small rigorous bound."""
    q, gal = sd15
    idx = _index(tmp_path, gal, monkeypatch, budget)
    moved = tmp_path / "gone"
    shutil.move(str(gal), moved)     # no candidate file exists at query time
    try:
        _no_file_reads(monkeypatch)
        res = _query(idx, q)
    finally:
        shutil.move(str(moved), gal)
    assert _kinds(res) == EXPECT
    assert res.query.reread == 0 and all(h.rescored_from == "record" and h.reranked for h in res.hits)
    bounds = [h.score_bound for h in res.hits]
    if budget == 32 << 20:
        assert bounds == [0.0] * len(bounds)
    else:
        assert max(bounds) < 1e-3 and any(b > 0 for b in bounds)   # fp16 rounding of the svd records only
    same = [h for h in res.hits if h.match == "same-update"]
    assert all(h.score >= 0.999 - h.score_bound for h in same)
    d = res.as_dict()
    assert d["query"]["reread"] == 0 and {"rescored_from", "score_bound"} <= set(d["results"][0])


def test_scores_from_records_match_file_rescoring(sd15, tmp_path, monkeypatch):
    """The same index queried from truncated records and from the files: every file-exact score lies
    within the record's reported bound."""
    q, gal = sd15
    idx = _index(tmp_path, gal, monkeypatch, 6 << 20)
    rec = {Path(h.path).name: h for h in _query(idx, q).hits}
    monkeypatch.setattr(query_mod, "_stored_records", lambda index, ids: {})   # force today's file path
    files = {Path(h.path).name: h for h in _query(idx, q).hits}
    assert all(h.rescored_from == "file" for h in files.values())
    for name, h in rec.items():
        assert abs(h.score - files[name].score) <= h.score_bound + 1e-6, name
        assert h.match == files[name].match


def test_truncated_record_leaves_near_copies_undecided_and_rereads_only_them(sd15, tmp_path, monkeypatch):
    """A 256 KiB budget keeps a small share of the triplets: the unrelated and ×2 candidates are still
    decided from their records, the near-copies are "undecided" and only their files are re-read."""
    q, gal = sd15
    idx = _index(tmp_path, gal, monkeypatch, 256 << 10)
    read = []
    real = query_mod.load_indexed
    monkeypatch.setattr(query_mod, "load_indexed", lambda rec: read.append(Path(rec["path"]).name) or real(rec))
    res = _query(idx, q)
    assert _kinds(res) == EXPECT
    near = {n for n, k in EXPECT.items() if k == "same-update"}
    assert set(read) == near and res.query.reread == len(near)
    src = {Path(h.path).name: h.rescored_from for h in res.hits}
    assert all(src[n] == "file" for n in near) and src["other.safetensors"] == src["x2.safetensors"] == "record"
    # at most REREAD_MAX files per query: the rest stay "similar" (never a same-update it cannot prove)
    monkeypatch.setattr(query_mod, "REREAD_MAX", 1)
    read.clear()
    res = _query(idx, q)
    assert len(read) == 1 and res.query.reread == 1
    kinds = _kinds(res)
    assert sum(k == "same-update" for k in kinds.values()) == 1
    assert kinds["x2.safetensors"] == kinds["other.safetensors"] == "similar"


def test_undecided_candidate_whose_file_changed_stays_similar_with_its_bound(sd15, tmp_path, monkeypatch):
    q, gal = sd15
    idx = _index(tmp_path, gal, monkeypatch, 256 << 10)
    monkeypatch.setattr(query_mod, "load_indexed", lambda rec: None)   # every file gone or changed since
    res = _query(idx, q)
    assert all(h.match == "similar" and h.rescored_from == "record" and h.score_bound > 0 for h in res.hits)


def test_old_index_without_records_rereads_files(sd15, tmp_path, monkeypatch):
    q, gal = sd15
    idx = _index(tmp_path, gal, monkeypatch, None, records=False)
    res = _query(idx, q)
    assert _kinds(res) == EXPECT
    assert res.query.reread == len(EXPECT) and all(h.rescored_from == "file" and h.score_bound == 0 for h in res.hits)


def test_corrupt_stored_record_falls_back_to_the_file(sd15, tmp_path, monkeypatch):
    q, gal = sd15
    idx = _index(tmp_path, gal, monkeypatch, 32 << 20)
    with Lorasearch(idx) as ls:
        cat = ls.index.catalog
        rid = ls.index.by_path(str((gal / "copy.safetensors").resolve()))["id"]
        with cat.conn:
            cat.conn.execute("UPDATE rerank SET blob = ? WHERE id = ?", (b"not an npz", rid))
    res = _query(idx, q)
    assert _kinds(res) == EXPECT and res.query.reread == 1
    assert {Path(h.path).name for h in res.hits if h.rescored_from == "file"} == {"copy.safetensors"}


def test_milvus_store_keeps_records_and_query_reads_no_file(sd15, tmp_path, monkeypatch):
    """The Milvus store keeps the MiB-sized records beside the collection (rerank.sqlite by sha256)."""
    pytest.importorskip("pymilvus")
    import json

    from lorasearch.indexer.base import CONFIG_FILE

    q, gal = sd15
    idx = tmp_path / "idx"
    idx.mkdir()
    (idx / CONFIG_FILE).write_text(json.dumps({"version": 1, "store": "milvus", "uri": str(tmp_path / "m.db"),
                                               "collection": "wired"}))
    monkeypatch.setattr(ingest, "RERANK_BUDGET", 32 << 20)
    with Lorasearch(idx, create=True) as ls:
        assert len(ls.index_dir(gal).added) == len(EXPECT)
    assert (idx / "rerank.sqlite").is_file()
    _no_file_reads(monkeypatch)
    res = _query(idx, q)
    assert _kinds(res) == EXPECT and res.query.reread == 0
    assert all(h.rescored_from == "record" and h.score_bound == 0 for h in res.hits)


def test_side_blobs_survive_a_corrupt_file(tmp_path):
    """The Milvus store's side file, overwritten with garbage: reads give nothing (queries re-read
    files), writes warn instead of failing the upsert."""
    from lorasearch.indexer.side_blobs import FILE, SideBlobs

    side = SideBlobs(tmp_path, readonly=False)
    side.put({"a" * 64: b"blob"})
    assert side.get(["a" * 64, "b" * 64]) == {"a" * 64: b"blob"}
    side.close()
    (tmp_path / FILE).write_bytes(b"not a database" * 100)
    for name in ("-wal", "-shm"):
        (tmp_path / (FILE + name)).unlink(missing_ok=True)
    side = SideBlobs(tmp_path, readonly=False)
    assert side.get(["a" * 64]) == {}
    side.put({"c" * 64: b"x"})        # logged, not raised
    side.drop(["c" * 64])
    side.close()
