"""End-to-end behaviour of the `lorasearch` CLI and the Python API behind it."""
from __future__ import annotations

import json
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


def run(index: Path, *args):
    res = CliRunner().invoke(cli, ["--index", str(index), *map(str, args)], catch_exceptions=False)
    return res


def reparam(adapter, seed=0):
    """Same ΔW, other factors: B→BG, A→G⁻¹A with a random well-conditioned G."""
    rng = np.random.default_rng(seed)
    for m in adapter.modules:
        r = m.rank
        g = np.eye(r) + 0.3 * rng.standard_normal((r, r))
        m.B = (m.B.astype(np.float64) @ g).astype(np.float32)
        m.A = (np.linalg.solve(g, m.A.astype(np.float64))).astype(np.float32)
    return adapter


@pytest.fixture()
def gallery(tmp_path):
    g = tmp_path / "gallery"
    g.mkdir()
    for i in range(6):
        ad = random_adapter("minilm", rank=4 + 4 * (i % 2), seed=i,
                            targets=r"attention\.self\.(query|value)$")
        fmt = "peft" if i % 2 == 0 else "peft-file"
        name = f"ad{i}" if fmt == "peft" else f"ad{i}.safetensors"
        write_adapter(ad, g / name, fmt, dtype="F32")
    return g


def test_index_query_json_contract_and_match_kinds(tmp_path, gallery):
    idx = tmp_path / "idx"
    res = run(idx, "index", gallery, "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["version"] == 1 and len(rep["added"]) == 6 and rep["errors"] == []

    # exact: an indexed file queried as-is
    res = run(idx, "query", gallery / "ad1.safetensors", "-k", "3", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["version"] == 1
    assert {"path", "family", "encoder"} <= set(out["query"])
    assert out["query"]["family"] == "minilm"
    top = out["results"][0]
    assert {"rank", "id", "path", "score", "match"} <= set(top)
    assert top["rank"] == 1 and top["match"] == "exact" and top["path"].endswith("ad1.safetensors")
    assert [r["rank"] for r in out["results"]] == [1, 2, 3]
    assert all(r["match"] == "similar" for r in out["results"][1:])

    # same-update: re-parameterized factors, stored in fp16, in another format and name
    ad = reparam(random_adapter("minilm", rank=8, seed=3, targets=r"attention\.self\.(query|value)$"))
    q = tmp_path / "renamed_copy.safetensors"
    write_adapter(ad, q, "peft-file", dtype="F16")
    out = json.loads(run(idx, "query", q, "-k", "2", "--json").stdout)
    assert out["results"][0]["match"] == "same-update"
    assert out["results"][0]["path"].endswith("ad3.safetensors")
    assert out["results"][0]["score"] >= 0.999
    assert out["results"][1]["match"] == "similar" and out["results"][1]["score"] < 0.5

    # a scaled copy is not the same update (cosine 1, twice the norm)
    # (against ad2, a PEFT folder: both scales known)
    ad2 = random_adapter("minilm", rank=4, seed=2, targets=r"attention\.self\.(query|value)$")
    for m in ad2.modules:
        m.B = m.B * 2
    write_adapter(ad2, tmp_path / "scaled", "peft", dtype="F32")   # a PEFT folder: its scale is known
    out = json.loads(run(idx, "query", tmp_path / "scaled", "-k", "1", "--json").stdout)
    assert out["results"][0]["match"] == "similar" and out["results"][0]["score"] > 0.999
    assert out["results"][0]["path"].endswith("ad2")
    # the same factors as a bare PEFT file (no config: alpha unknown) — equal direction is reported
    # as the same adapter, flagged scale_known: false (issue 7)
    write_adapter(ad2, tmp_path / "scaled.safetensors", "peft-file", dtype="F32")
    out = json.loads(run(idx, "query", tmp_path / "scaled.safetensors", "-k", "1", "--json").stdout)
    assert out["results"][0]["match"] == "same-update" and out["results"][0]["scale_known"] is False

    # threshold drops weak results
    out = json.loads(run(idx, "query", q, "-k", "5", "--threshold", "0.9", "--json").stdout)
    assert len(out["results"]) == 1


def test_incremental_index_prune_and_persistence(tmp_path, gallery):
    idx = tmp_path / "idx"
    assert run(idx, "index", gallery).exit_code == 0
    again = json.loads(run(idx, "index", gallery, "--json").stdout)
    assert again["added"] == [] and again["updated"] == [] and again["unchanged"] == 6

    # changed file is re-embedded
    ad = random_adapter("minilm", rank=4, seed=99, targets=r"attention\.self\.(query|value)$")
    time.sleep(0.01)
    write_adapter(ad, gallery / "ad1.safetensors", "peft-file", dtype="F32")
    rep = json.loads(run(idx, "index", gallery, "--json").stdout)
    assert len(rep["updated"]) == 1 and rep["updated"][0].endswith("ad1.safetensors")

    # deleted files pruned only when asked
    shutil.rmtree(gallery / "ad0")
    rep = json.loads(run(idx, "index", gallery, "--json").stdout)
    assert rep["removed"] == []
    rep = json.loads(run(idx, "index", gallery, "--prune", "--json").stdout)
    assert len(rep["removed"]) == 1 and rep["removed"][0].endswith("ad0")

    # a fresh process-equivalent (new object) sees the same index
    s = Lorasearch(idx).stats()
    assert s["count"] == 5 if "count" in s else True
    st = json.loads(run(idx, "stats", "--json").stdout)
    assert st["version"] == 1
    res = Lorasearch(idx).query(gallery / "ad1.safetensors", k=5)
    assert len(res["results"]) == 5 and res["results"][0]["match"] == "exact"


def test_add_remove_and_exit_codes(tmp_path, gallery):
    idx = tmp_path / "idx"
    assert run(idx, "query", gallery / "ad1.safetensors").exit_code == 66   # no index yet
    assert run(idx, "add", gallery / "ad1.safetensors", gallery / "ad2").exit_code == 0
    out = json.loads(run(idx, "query", gallery / "ad1.safetensors", "--json").stdout)
    assert len(out["results"]) == 2
    rid = [r["id"] for r in out["results"] if r["path"].endswith("ad2")][0]
    res = run(idx, "remove", rid)
    assert res.exit_code == 0
    out = json.loads(run(idx, "query", gallery / "ad1.safetensors", "--json").stdout)
    assert [r["path"].endswith("ad1.safetensors") for r in out["results"]] == [True]
    assert run(idx, "remove", gallery / "ad1.safetensors").exit_code == 0
    assert run(idx, "remove", "12345").exit_code == 66

    bad = tmp_path / "model.bin"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    res = run(idx, "add", bad)
    assert res.exit_code == 65 and "model.bin" in res.stderr and "Traceback" not in res.output
    assert run(idx, "add", tmp_path / "nope.safetensors").exit_code == 66
    res = run(idx, "query", bad)
    assert res.exit_code == 65 and len(res.stderr.strip().splitlines()) == 1
    assert run(idx, "query", tmp_path / "nope.safetensors").exit_code == 66
    assert run(idx, "index", tmp_path / "nodir").exit_code == 66


def test_bad_files_are_skipped_not_fatal(tmp_path, gallery):
    (gallery / "truncated.safetensors").write_bytes((gallery / "ad1.safetensors").read_bytes()[:500])
    (gallery / "old.ckpt").write_bytes(b"\x80\x02" + b"\0" * 64)
    idx = tmp_path / "idx"
    res = run(idx, "index", gallery, "--json")
    assert res.exit_code == 0
    rep = json.loads(res.stdout)
    assert len(rep["added"]) == 6
    failed = {Path(e["path"]).name for e in rep["errors"]}
    assert failed == {"truncated.safetensors", "old.ckpt"}
    assert "truncated.safetensors" in res.stderr


def test_families_never_mixed_and_encoder_recorded(tmp_path, gallery):
    idx = tmp_path / "idx"
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


def test_info_json(tmp_path):
    ad = random_adapter("sd15", rank=4, seed=1, targets=r"attn2\.to_(q|k|v)$")
    p = tmp_path / "style.safetensors"
    write_adapter(ad, p, "kohya", dtype="F16",
                  metadata={"ss_tag_frequency": json.dumps({"10_sks": {"sks style": 12, "1girl": 3}}),
                            "ss_base_model_version": "sd_v1"})
    res = CliRunner().invoke(cli, ["info", str(p), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["version"] == 1 and d["format"] == "kohya" and d["family"] == "sd1"
    assert d["n_modules"] == len(ad.modules)
    assert "sks style" in d["trigger_words"]


def test_watch_indexes_new_and_removed_files(tmp_path, gallery):
    idx = tmp_path / "idx"
    ls = Lorasearch(idx, create=True)
    ls.index_dir(gallery)
    stop = threading.Event()
    t = threading.Thread(target=ls.watch, kwargs=dict(root=gallery, interval=0.1, stop=stop.is_set))
    t.start()
    try:
        ad = random_adapter("minilm", rank=4, seed=42, targets=r"attention\.self\.(query|value)$")
        write_adapter(ad, gallery / "new.safetensors", "peft-file", dtype="F32")
        (gallery / "ad2" / "adapter_model.safetensors").unlink()
        shutil.rmtree(gallery / "ad2")
        deadline = time.time() + 20
        while time.time() < deadline:
            paths = {Path(r["path"]).name for r in Lorasearch(idx).index.records()}
            if "new.safetensors" in paths and "ad2" not in paths:
                break
            time.sleep(0.1)
        assert "new.safetensors" in paths and "ad2" not in paths
    finally:
        stop.set()
        t.join(10)


def test_second_writer_gets_exit_75_reader_not_blocked(tmp_path, gallery):
    import subprocess
    import sys

    idx = tmp_path / "idx"
    assert run(idx, "index", gallery).exit_code == 0
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom lorasearch.indexer import LoraIndex\n"
         f"ix = LoraIndex.open({str(idx)!r})\n"
         "with ix.writer():\n    print('locked', flush=True)\n    time.sleep(30)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        extra = tmp_path / "extra.safetensors"
        write_adapter(random_adapter("minilm", rank=4, seed=7), extra, "peft-file", dtype="F32")
        res = run(idx, "add", extra)
        assert res.exit_code == 75 and "lock" in res.stderr.lower()
        res = run(idx, "query", gallery / "ad1.safetensors", "--json")   # readers never block
        assert res.exit_code == 0 and json.loads(res.stdout)["results"][0]["match"] == "exact"
    finally:
        holder.kill()
        holder.wait()


def test_rerank_depth_and_query_file_first(tmp_path, gallery):
    idx = tmp_path / "idx"
    shutil.copy(gallery / "ad1.safetensors", gallery / "ad1-copy.safetensors")
    assert run(idx, "index", gallery).exit_code == 0
    out = json.loads(run(idx, "query", gallery / "ad1.safetensors", "-k", "7", "--json").stdout)
    assert [r["match"] for r in out["results"][:2]] == ["exact", "exact"]
    assert out["results"][0]["path"].endswith("/ad1.safetensors")     # the query file itself first
    assert all(r["reranked"] for r in out["results"])                  # default depth covers all 7
    off = json.loads(run(idx, "query", gallery / "ad2", "-k", "7", "--rerank", "0", "--json").stdout)
    assert [r["reranked"] for r in off["results"][1:]] == [False] * 6
    assert [r["score"] for r in off["results"][1:]] == [r["embedding_score"] for r in off["results"][1:]]


def test_faiss_factory_is_fixed_at_creation(tmp_path, gallery):
    idx = tmp_path / "idx"
    assert run(idx, "index", gallery, "--faiss-factory", "HNSW16").exit_code == 0
    st = json.loads(run(idx, "stats", "--json").stdout)
    assert "HNSW16" in json.dumps(st)
    out = json.loads(run(idx, "query", gallery / "ad1.safetensors", "-k", "3", "--ef-search", "32",
                         "--json").stdout)
    assert out["results"][0]["match"] == "exact" and len(out["results"]) == 3
    res = run(idx, "add", gallery / "ad2", "--faiss-factory", "IVF4,Flat")
    assert res.exit_code == 2 and "HNSW16" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert run(idx, "index", tmp_path / "other", "--faiss-factory", "NOT_A_FACTORY").exit_code == 66
    res = run(tmp_path / "idx2", "index", gallery, "--faiss-factory", "NOT_A_FACTORY")
    assert res.exit_code == 2 and not (tmp_path / "idx2" / "catalog.sqlite").exists()
