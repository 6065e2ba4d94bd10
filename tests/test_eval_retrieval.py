"""Retrieval protocol end to end on a small synthetic labelled set written as real adapter files.

Each label is a random base adapter (MiniLM query/value of two layers, rank 4); members are the
base plus noise on A and B, then reparameterized by an independent random G per module
(B→BG, A→G⁻¹A: the same ΔW, different factors). Canonical methods (dense, sketch) should rank
same-label adapters first; RawCos sees different factors and does worse.
"""
import csv
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lorasearch.adapters.writers import random_adapter, write_adapter
from lorasearch.errors import EXIT_BAD_INPUT, EXIT_MISSING, EXIT_USAGE
from lorasearch.eval import retrieval as R




TARGETS = r"layer\.[01]\.attention\.self\.(query|value)"


def _reparam(m, rng):
    G, _ = np.linalg.qr(rng.standard_normal((m.rank, m.rank)))
    G = G * rng.uniform(0.5, 2.0, m.rank)
    return replace(m, B=(m.B.astype(np.float64) @ G).astype(np.float32),
                   A=np.linalg.solve(G, m.A.astype(np.float64)).astype(np.float32))


def synthetic_members(n_labels=4, n_gallery=5, n_query=2, seed=0):
    """Yields (role, label index, j, shots, adapter)."""
    rng = np.random.default_rng(seed)
    bases = [random_adapter("minilm", rank=4, targets=TARGETS, seed=100 + i) for i in range(n_labels)]
    for li, base in enumerate(bases):
        for role, n in (("gallery", n_gallery), ("query", n_query)):
            for j in range(n):
                shots = None if role == "gallery" else (1 if j % 2 == 0 else 64)
                noise = 1.0 if shots == 1 else 0.6
                mods = [replace(m, A=m.A + noise * m.A.std() * rng.standard_normal(m.A.shape).astype(np.float32),
                                B=m.B + noise * m.B.std() * rng.standard_normal(m.B.shape).astype(np.float32))
                        for m in base.modules]
                yield role, li, j, shots, replace(base, modules=[_reparam(m, rng) for m in mods])


def write_set(root: Path, **kw) -> Path:
    (root / "gallery").mkdir(parents=True)
    (root / "queries").mkdir()
    (root / "store").mkdir()
    rows = []
    for role, li, j, shots, ad in synthetic_members(**kw):
        folder = root / ("gallery" if role == "gallery" else "queries")
        name = f"L{li}_{role[0]}{j}"
        if j % 3 == 0:        # PEFT folder
            write_adapter(ad, folder / name, "peft", dtype="F32")
        elif j % 3 == 1:      # bare .safetensors
            name += ".safetensors"
            write_adapter(ad, folder / name, "peft-file", dtype="F16")
        else:                 # a symlink to a file stored elsewhere
            name += ".safetensors"
            write_adapter(ad, root / "store" / name, "peft-file", dtype="F32")
            os.symlink(root / "store" / name, folder / name)
        rows.append((name, f"label{li}", "" if shots is None else shots))
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "label", "shots"])
        w.writerows(rows)
    return root


@pytest.fixture(scope="module")
def evalset(tmp_path_factory):
    return write_set(tmp_path_factory.mktemp("retrieval"))


def _cli(*args):
    from lorasearch.eval.cli import eval_group

    return CliRunner().invoke(eval_group, list(map(str, args)))


def test_in_memory_protocol_orders_methods():
    from lorasearch.canonical import canonicalize_many

    g, q = [], []
    for role, li, j, shots, ad in synthetic_members():
        c = canonicalize_many([ad])[0]
        c.raw = c.raw or ad
        item = R.EvalItem(f"{role}{li}{j}", Path("."), role, f"label{li}",
                          None if shots is None else str(shots), c)
        (g if role == "gallery" else q).append(item)
    res = R.evaluate(R.EvalSet(g, q), ["rawcos", "dense"])   # sketch: see the CLI test
    ndcg = {m: r["overall"]["ndcg@10"] for m, r in res["methods"].items()}
    # chance: 5 relevant among 20 ranked at random gives NDCG@10 ≈ 0.3
    assert ndcg["dense"] >= 0.95
    assert ndcg["rawcos"] <= ndcg["dense"] - 0.1
    assert res["methods"]["dense"]["overall"]["n"] == 8
    assert set(res["methods"]["dense"]["per_shots"]) == {"1", "64"}
    assert set(res["methods"]["dense"]["per_label"]) == {"label0", "label1", "label2", "label3"}
    # the score matrix is NaN nowhere (one family) and the text table names every method
    text = R.format_table(R.public(res))
    assert "rawcos" in text and "dense" in text and "label3" in text


def test_cli_end_to_end_json(evalset):
    r = _cli("retrieval", "--gallery", evalset / "gallery", "--queries", evalset / "queries",
             "--labels", evalset / "labels.csv", "--json")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert obj["version"] == 1 and obj["kind"] == "retrieval"
    assert obj["n_gallery"] == 20 and obj["n_queries"] == 8
    # by default: what `lorasearch query` returns (re-ranked at query's depth), the bare encoder beside it
    # (default encoders: `auto`, what `index` uses, and the training-free sketch beside it)
    assert list(obj["methods"]) == ["auto+rerank@50", "auto", "sketch+rerank@50", "sketch", "dense", "rawcos"]
    m = obj["methods"]
    assert m["auto+rerank@50"]["overall"]["ndcg@10"] == pytest.approx(m["dense"]["overall"]["ndcg@10"])
    # 20 gallery adapters < depth 50: every candidate is re-scored exactly, so it ranks as dense does
    assert m["sketch+rerank@50"]["overall"]["ndcg@10"] == pytest.approx(m["dense"]["overall"]["ndcg@10"])
    assert m["sketch+rerank@50"]["overall"]["ndcg@10"] >= m["sketch"]["overall"]["ndcg@10"]
    for key in ("ndcg@10", "hit@1", "map@10", "recall@10"):
        assert 0.0 <= m["sketch"]["overall"][key] <= 1.0
    assert m["dense"]["overall"]["ndcg@10"] >= 0.95
    assert m["sketch"]["overall"]["ndcg@10"] >= 0.9
    assert m["rawcos"]["overall"]["ndcg@10"] <= m["dense"]["overall"]["ndcg@10"] - 0.1
    assert m["dense"]["kind"] == "reference" and m["sketch"]["kind"] == "encoder"
    # 5 relevant among 20: a random ranking expects NDCG@10 ≈ 0.385, Hit@1 = 0.25
    assert obj["chance"]["overall"]["hit@1"] == pytest.approx(0.25)
    assert m["sketch"]["overall"]["ndcg@10"] > obj["chance"]["overall"]["ndcg@10"] + 0.4


def test_cli_rerank_depth_option(evalset):
    base = ("retrieval", "--gallery", evalset / "gallery", "--queries", evalset / "queries",
            "--labels", evalset / "labels.csv", "--no-references", "--json")
    assert list(json.loads(_cli(*base, "--rerank", "0").stdout)["methods"]) == ["auto", "sketch"]
    assert list(json.loads(_cli(*base, "--rerank", "3", "--encoder", "sketch").stdout)["methods"]) == [
        "sketch+rerank@3", "sketch"]
    assert list(json.loads(_cli(*base, "-k", "20").stdout)["methods"]) == [
        "auto+rerank@100", "auto", "sketch+rerank@100", "sketch"]
    # --device after the subcommand is the group's --device
    assert _cli(*base, "--rerank", "0", "--device", "cpu").exit_code == 0


def test_cli_table_and_held_out_labels(evalset):
    r = _cli("retrieval", "--gallery", evalset / "gallery", "--queries", evalset / "queries",
             "--labels", evalset / "labels.csv", "--labels-subset", "label0,label2", "--no-references")
    assert r.exit_code == 0, r.output
    assert "ndcg@10" in r.stdout and "label0" in r.stdout and "label1" not in r.stdout
    es = R.select_labels(R.from_folders(evalset / "gallery", evalset / "queries", evalset / "labels.csv"),
                         exclude=["label3"], filter_gallery=False)
    assert {it.label for it in es.queries} == {"label0", "label1", "label2"}
    assert len(es.gallery) == 20
    r = _cli("retrieval", "--gallery", evalset / "gallery", "--queries", evalset / "queries",
             "--labels", evalset / "labels.csv", "--labels-subset", "nope")
    assert r.exit_code == EXIT_USAGE and "unknown label" in r.stderr


def test_collection_manifest(evalset, tmp_path):
    from lorasearch.data.manifest import write_manifest

    labels = R.read_labels_csv(evalset / "labels.csv")
    rows = []
    for role, folder in (("gallery", "gallery"), ("query", "queries")):
        for p in sorted((evalset / folder).iterdir()):
            label, shots = labels[p.name]
            rows.append({"id": p.name, "path": f"{folder}/{p.name}", "label": label, "role": role,
                         "shots": None if shots is None else int(shots)})
    write_manifest(rows, evalset / "manifest.parquet")
    try:
        es = R.from_collection(evalset)
        assert len(es.gallery) == 20 and len(es.queries) == 8
        assert {it.shots for it in es.queries} == {"1", "64"}
    finally:
        (evalset / "manifest.parquet").unlink()


def _small_set(tmp_path, n=2):
    (tmp_path / "g").mkdir()
    (tmp_path / "q").mkdir()
    for i in range(n):
        ad = random_adapter("minilm", rank=2, targets=TARGETS, seed=i)
        write_adapter(ad, tmp_path / "g" / f"a{i}.safetensors", "peft-file")
        write_adapter(ad, tmp_path / "q" / f"b{i}.safetensors", "peft-file")
    return tmp_path


def _run(tmp_path, csv_text):
    (tmp_path / "labels.csv").write_text(csv_text)
    return _cli("retrieval", "--gallery", tmp_path / "g", "--queries", tmp_path / "q",
                "--labels", tmp_path / "labels.csv")


def test_bad_labels_csv(tmp_path):
    _small_set(tmp_path)
    r = _run(tmp_path, "file,class\na0.safetensors,x\n")
    assert r.exit_code == EXIT_BAD_INPUT and "header must contain `name,label`" in r.stderr
    r = _run(tmp_path, "name,label\na0.safetensors,x\na1.safetensors,y\nb0.safetensors,x\n")
    assert r.exit_code == EXIT_BAD_INPUT and "no label for 1 adapter(s)" in r.stderr and "b1.safetensors" in r.stderr
    r = _run(tmp_path, "name,label\na0.safetensors,x\na1.safetensors,y\nb0.safetensors,x\n"
                       "b1.safetensors,y\nghost.safetensors,x\n")
    assert r.exit_code == EXIT_MISSING and "ghost.safetensors" in r.stderr
    r = _run(tmp_path, "name,label\na0.safetensors,x\na0.safetensors,y\n")
    assert r.exit_code == EXIT_BAD_INPUT and "labelled twice" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = _cli("retrieval", "--gallery", tmp_path / "g", "--queries", tmp_path / "q",
             "--labels", tmp_path / "none.csv")
    assert r.exit_code == EXIT_MISSING
    r = _cli("retrieval", "--gallery", tmp_path / "g")
    assert r.exit_code == EXIT_USAGE


def test_unreadable_adapter_names_the_file(tmp_path):
    _small_set(tmp_path)
    (tmp_path / "g" / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    r = _run(tmp_path, "name,label\na0.safetensors,x\na1.safetensors,y\nb0.safetensors,x\n"
                       "b1.safetensors,y\njunk.safetensors,x\n")
    assert r.exit_code == EXIT_BAD_INPUT and "junk.safetensors" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cross_family_pairs_are_excluded(tmp_path):
    _small_set(tmp_path)
    sd = random_adapter("sd15", rank=2, targets=r"down_blocks\.0\.attentions\.0\..*attn2\.to_[kv]", seed=5)
    write_adapter(sd, tmp_path / "g" / "sd.safetensors", "peft-file")
    r = _run(tmp_path, "name,label\na0.safetensors,x\na1.safetensors,y\nb0.safetensors,x\n"
                       "b1.safetensors,y\nsd.safetensors,x\n")
    assert r.exit_code == 0, r.output
    r = _cli("retrieval", "--gallery", tmp_path / "g", "--queries", tmp_path / "q",
             "--labels", tmp_path / "labels.csv", "--json")
    obj = json.loads(r.stdout)
    assert obj["excluded_cross_family_pairs"] == 2
    assert set(obj["families"]) == {"minilm", "sd1"}
    # identical copies in gallery and queries: every method finds the twin first
    for m in obj["methods"].values():
        assert m["overall"]["hit@1"] == 1.0


def test_rerank_method_reorders_top_candidates_by_dense_cosine():
    from lorasearch.canonical import canonicalize_many

    g, q = [], []
    for role, li, j, shots, ad in synthetic_members():
        c = canonicalize_many([ad])[0]
        item = R.EvalItem(f"{role}{li}{j}", Path("."), role, f"label{li}",
                          None if shots is None else str(shots), c)
        (g if role == "gallery" else q).append(item)
    es = R.EvalSet(g, q)
    scored = R.score_methods(es, ["rawcos", "dense", "rawcos+rerank@3", f"rawcos+rerank@{len(g)}"])
    by = {m.name: m for m in scored}
    full, dense, top3 = by[f"rawcos+rerank@{len(g)}"], by["dense"], by["rawcos+rerank@3"]
    assert np.allclose(full.scores, dense.scores)          # re-scoring everything is the dense method
    for qi in range(len(q)):
        best3 = np.argsort(-by["rawcos"].scores[qi], kind="stable")[:3]
        assert set(np.argsort(-top3.scores[qi], kind="stable")[:3]) == set(best3)
        assert np.allclose(top3.scores[qi, best3], dense.scores[qi, best3])
    with pytest.raises(R.UsageError):
        R.score_methods(es, ["rawcos+rerank@x"])
