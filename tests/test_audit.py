"""Issue 12: dedupe, explain, label and tags — end to end through the CLI and the functions."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lorasearch import audit
from lorasearch.adapters.writers import random_adapter, write_adapter
from lorasearch.cli import cli
from lorasearch.types import LoraAdapter, LoraModule

TARGETS = r"attn2\.to_[kv]$"          # 32 SD1.5 modules: small files, real names and shapes
DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"


def run(index: Path, *args):
    return CliRunner().invoke(cli, ["--index", str(index), *map(str, args)], catch_exceptions=False)


def reparam(adapter, seed=0):
    """Same ΔW, other factors: B→BG, A→G⁻¹A."""
    rng = np.random.default_rng(seed)
    for m in adapter.modules:
        g = np.eye(m.rank) + 0.3 * rng.standard_normal((m.rank, m.rank))
        m.B = (m.B.astype(np.float64) @ g).astype(np.float32)
        m.A = np.linalg.solve(g, m.A.astype(np.float64)).astype(np.float32)
    return adapter


def merge(parts: list[tuple[float, LoraAdapter]]) -> LoraAdapter:
    """A linear merge as kohya's merge script makes it: factors concatenated, ΔW = Σ cᵢ ΔWᵢ."""
    names = sorted({m.name for _c, a in parts for m in a.modules})
    mods = []
    for name in names:
        got = [(c, a.module(name)) for c, a in parts if a.module(name) is not None]
        B = np.concatenate([np.float32(c * m.scale) * m.B for c, m in got], axis=1)
        A = np.concatenate([m.A for _c, m in got], axis=0)
        mods.append(LoraModule(name, A, B, 1.0, "F32", got[0][1].shape, float(A.shape[0])))
    return LoraAdapter("", "memory", "", parts[0][1].family, mods)


# ------------------------------------------------------------------------------------- dedupe
@pytest.fixture()
def dupes(tmp_path):
    g = tmp_path / "g"
    g.mkdir()
    src = random_adapter("sd15", rank=8, seed=1, targets=TARGETS)
    write_adapter(src, g / "orig", "peft", dtype="F32")
    shutil.copytree(g / "orig", g / "orig-copy")
    write_adapter(src, g / "orig-fp16.safetensors", "diffusers", dtype="F16")
    write_adapter(src, g / "orig-kohya.safetensors", "kohya", dtype="F32")
    write_adapter(reparam(random_adapter("sd15", rank=8, seed=1, targets=TARGETS), seed=5),
                  g / "orig-reparam.safetensors", "diffusers-mid", dtype="F32")
    twice = random_adapter("sd15", rank=8, seed=1, targets=TARGETS)
    for m in twice.modules:
        m.B = m.B * np.float32(2.0)                              # same direction, twice the update
    write_adapter(twice, g / "orig-x2.safetensors", "kohya", dtype="F32")
    near = random_adapter("sd15", rank=8, seed=1, targets=TARGETS)
    rng = np.random.default_rng(9)
    for m in near.modules:                                       # cosine ≈ 0.99: a different update
        m.B = m.B + np.float32(0.15) * np.abs(m.B).mean() * rng.standard_normal(m.B.shape).astype(np.float32)
    write_adapter(near, g / "orig-near.safetensors", "kohya", dtype="F32")
    for s in (2, 3, 4):
        write_adapter(random_adapter("sd15", rank=4, seed=s, targets=TARGETS), g / f"other{s}.safetensors",
                      "kohya", dtype="F16")
    return g


def test_dedupe_clusters_copy_fp16_kohya_and_reparam_and_keeps_others_apart(tmp_path, dupes):
    idx = tmp_path / "idx"
    assert run(idx, "index", dupes).exit_code == 0
    res = run(idx, "dedupe", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["version"] == 1 and out["adapters"] == 10
    assert len(out["clusters"]) == 1, out["clusters"]
    c = out["clusters"][0]
    names = {Path(m["path"]).name for m in c["members"]}
    assert names == {"orig", "orig-copy", "orig-fp16.safetensors", "orig-kohya.safetensors",
                     "orig-reparam.safetensors"}
    kept = [m for m in c["members"] if m["keep"]]
    assert len(kept) == 1 and Path(kept[0]["path"]).name in {"orig", "orig-copy"}    # F32 PEFT folder
    assert {m["format"] for m in c["members"]} >= {"peft", "kohya"}
    assert {m["dtype"] for m in c["members"]} == {"F32", "F16"}
    matches = {e["match"] for e in c["pairs"]}
    assert matches == {"exact", "same-update"}
    assert all(e["cosine"] >= 0.999 for e in c["pairs"])
    assert out["candidate_pairs"] < 10 * 9 / 2                  # from neighbours, not all pairs

    csv_out = run(idx, "dedupe", "--csv")
    assert csv_out.exit_code == 0
    rows = csv_out.stdout.strip().splitlines()
    assert rows[0] == "cluster,keep,id,path,format,dtype,size,family" and len(rows) == 6
    assert sum(r.split(",")[1] == "yes" for r in rows[1:]) == 1
    # a stricter norm tolerance or threshold cannot join the ×2 one; --json and --csv exclude each other
    assert run(idx, "dedupe", "--json", "--csv").exit_code == 2


def test_dedupe_empty_and_missing_index(tmp_path):
    assert run(tmp_path / "nope", "dedupe").exit_code == 66
    g = tmp_path / "g"
    g.mkdir()
    write_adapter(random_adapter("minilm", rank=4, seed=0), g / "a.safetensors", "peft-file", dtype="F32")
    run(tmp_path / "idx", "index", g)
    out = json.loads(run(tmp_path / "idx", "dedupe", "--json").stdout)
    assert out["clusters"] == [] and out["duplicates"] == 0


def test_candidate_pairs_keep_a_cluster_larger_than_k_connected():
    import faiss

    rng = np.random.default_rng(0)
    base = rng.standard_normal(16)
    vecs = np.vstack([base + 1e-4 * rng.standard_normal(16) for _ in range(25)] +
                     [rng.standard_normal(16) for _ in range(25)]).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = np.arange(100, 150)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(16))
    index.add_with_ids(vecs, ids)

    def search(v, k):
        s, i = index.search(np.ascontiguousarray(v), k)
        return [list(zip(ir, sr)) for sr, ir in zip(s, i)]

    pairs = audit.candidate_pairs(ids, vecs, search, k=3, bound=0.99)
    uf = audit._UnionFind()
    for a, b in pairs:
        uf.union(a, b)
    assert uf.groups() == [list(range(100, 125))]


# ------------------------------------------------------------------------------------ explain
@pytest.fixture(scope="module")
def merge_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    g = root / "g"
    g.mkdir()
    srcs = {"s1": random_adapter("sd15", rank=4, seed=11, targets=TARGETS),
            "s2": random_adapter("sd15", rank=8, seed=12, alpha=4, targets=TARGETS),
            "s3": random_adapter("sd15", rank=6, seed=13, alpha=12, targets=TARGETS)}
    write_adapter(srcs["s1"], g / "s1", "peft", dtype="F32")
    write_adapter(srcs["s2"], g / "s2.safetensors", "kohya", dtype="F32")
    write_adapter(srcs["s3"], g / "s3.safetensors", "diffusers", dtype="F32")
    for s in range(4):
        write_adapter(random_adapter("sd15", rank=4 + 2 * s, seed=40 + s, targets=TARGETS),
                      g / f"d{s}.safetensors", "kohya", dtype="F16")
    idx = root / "idx"
    assert run(idx, "index", g).exit_code == 0
    q = root / "q"
    q.mkdir()
    write_adapter(merge([(0.7, srcs["s1"]), (0.3, srcs["s2"])]), q / "m2.safetensors", "kohya", dtype="F32")
    write_adapter(merge([(0.5, srcs["s1"]), (0.25, srcs["s2"]), (0.8, srcs["s3"])]), q / "m3", "peft", dtype="F16")
    write_adapter(random_adapter("sd15", rank=8, seed=99, targets=TARGETS), q / "unrelated.safetensors",
                  "diffusers", dtype="F32")
    return idx, q


@pytest.mark.parametrize("name, want", [("m2.safetensors", {"s1": 0.7, "s2.safetensors": 0.3}),
                                        ("m3", {"s1": 0.5, "s2.safetensors": 0.25, "s3.safetensors": 0.8})])
def test_explain_recovers_linear_merge_coefficients(merge_index, name, want):
    idx, q = merge_index
    res = run(idx, "explain", q / name, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["version"] == 1
    got = {Path(s["path"]).name: s["coefficient"] for s in out["sources"] if s["coefficient"] > 1e-3}
    assert set(got) == set(want)
    for k, v in want.items():
        assert abs(got[k] - v) <= 0.01, (k, got[k], v)
    assert out["explained"] >= 0.999 and out["residual"] < 0.03
    assert "× s1" in out["verdict"] and "% explained" in out["verdict"] and "not a merge" not in out["verdict"]
    text = run(idx, "explain", q / name).stdout
    assert "verdict:" in text


def test_explain_says_not_a_merge_for_an_unrelated_adapter(merge_index):
    idx, q = merge_index
    out = json.loads(run(idx, "explain", q / "unrelated.safetensors", "--json").stdout)
    assert out["explained"] < 0.1
    assert out["verdict"].startswith("not a merge of indexed adapters (")


def test_explain_leaves_out_copies_of_the_query(merge_index):
    idx, q = merge_index
    g = idx.parent / "g"
    out = json.loads(run(idx, "explain", g / "s2.safetensors", "--json").stdout)
    assert [Path(p).name for p in out["copies_of_query"]] == ["s2.safetensors"]
    assert out["verdict"].startswith("not a merge")


def test_explain_missing_file_and_bad_k(merge_index, tmp_path):
    idx, _q = merge_index
    assert run(idx, "explain", tmp_path / "nope.safetensors").exit_code == 66
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    r = run(idx, "explain", bad)
    assert r.exit_code == 65 and "bad.safetensors" in r.stderr
    assert run(idx, "explain", bad, "-k", "0").exit_code == 2


def test_nnls_gram_exact_on_a_known_system():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 4))
    X = np.hstack([X, X[:, :1]])                                  # a duplicated column: singular G
    c_true = np.array([0.6, 0.0, 0.3, 1.2, 0.0])
    q = X @ c_true
    c, resid = audit.nnls_gram(X.T @ X, X.T @ q, float(q @ q))
    assert resid < 1e-9 * float(q @ q)
    assert np.allclose(X @ c, q, atol=1e-6) and (c >= 0).all()


# -------------------------------------------------------------------------------------- label
@pytest.fixture(scope="module")
def demo_index(tmp_path_factory):
    idx = tmp_path_factory.mktemp("label") / "idx"
    assert run(idx, "index", DEMO / "gallery").exit_code == 0
    return idx


def test_tag_from_csv_then_label_held_out_demo_adapters(demo_index, tmp_path):
    res = run(demo_index, "tag", "--labels", DEMO / "labels.csv", "--json")
    assert res.exit_code == 66                                    # the 8 query adapters are not indexed
    out = json.loads(res.stdout)
    assert out["tagged"] == 28 and sorted(out["not_found"]) == sorted(p.name for p in (DEMO / "queries").iterdir())
    truth = dict(line.split(",") for line in (DEMO / "labels.csv").read_text().split()[1:])
    right = wrong = 0
    for q in sorted((DEMO / "queries").iterdir()):
        out = json.loads(run(demo_index, "label", q, "--json").stdout)
        assert out["evidence"] and out["labelled_in_family"] == 28
        sims = [e["similarity"] for e in out["evidence"]]
        assert sims == sorted(sims, reverse=True)
        if not out["abstained"]:
            right += out["labels"] == [truth[q.name]]
            wrong += out["labels"] != [truth[q.name]]
    assert wrong == 0 and right >= 7
    # embedding similarity alone (--rerank 0) still never names a wrong label on these
    for q in DEMO.glob("queries/*q32shot"):
        out = json.loads(run(demo_index, "label", q, "--rerank", "0", "--json").stdout)
        assert out["labels"] in ([], [truth[q.name]]) and not any(e["exact"] for e in out["evidence"])
    for q in DEMO.glob("queries/*q32shot"):
        out = json.loads(run(demo_index, "label", q, "--json").stdout)
        assert out["labels"] == [truth[q.name]] and not out["abstained"]

    far = tmp_path / "far.safetensors"
    write_adapter(random_adapter("minilm", rank=4, seed=123, targets=r"attention\.self\.(query|value)$"),
                  far, "peft-file", dtype="F32")
    out = json.loads(run(demo_index, "label", far, "--json").stdout)
    assert out["abstained"] and out["reason"].startswith("far") and out["labels"] == []


def test_knn_vote_abstains_when_neighbours_disagree():
    votes, reason = audit.knn_vote(np.array([0.9, 0.85, 0.8, 0.8]), [["a"], ["b"], ["a"], ["b"]])
    assert reason.startswith("neighbours disagree")
    votes, reason = audit.knn_vote(np.array([0.9, 0.85, 0.1]), [["a", "nsfw"], ["a"], ["b"]])
    assert reason is None and votes[0].label == "a" and votes[0].score > 0.9
    assert {v.label for v in votes} == {"a", "b", "nsfw"}


def test_tag_untag_and_labels_follow_their_adapter(tmp_path):
    from lorasearch.api import Lorasearch
    from lorasearch.indexer import tags

    g = tmp_path / "g"
    g.mkdir()
    for i in range(3):
        write_adapter(random_adapter("minilm", rank=4, seed=i), g / f"a{i}.safetensors", "peft-file", dtype="F32")
    idx = tmp_path / "idx"
    run(idx, "index", g)
    with Lorasearch(idx, readonly=True) as ls:
        assert tags.labelled(ls.index) == {}                      # no table yet: no labels, no error
    assert run(idx, "tag", g / "a0.safetensors", "nsfw", "style:ink").exit_code == 0
    assert run(idx, "tag", "2", "nsfw").exit_code == 0
    r = run(idx, "tag", "--json", "2", "nsfw")
    assert json.loads(r.stdout)["new"] == 0                       # already there: kept once
    assert run(idx, "tag", g / "zzz.safetensors", "x").exit_code == 66
    assert run(idx, "tag", "1", "  ").exit_code == 2
    assert run(idx, "tag", "1", "bad\nlabel").exit_code == 2
    assert run(idx, "tag", "1").exit_code == 2
    assert run(idx, "tag").exit_code == 2
    bad = tmp_path / "bad.csv"
    bad.write_text("file,tag\na0.safetensors,x\n")
    r = run(idx, "tag", "--labels", bad)
    assert r.exit_code == 65 and "bad.csv" in r.stderr and "name,label" in r.stderr
    bad.write_bytes(b"\xff\xfe\x00garbage")
    assert run(idx, "tag", "--labels", bad).exit_code == 65
    assert run(idx, "tag", "--labels", tmp_path / "none.csv").exit_code == 66
    sub = tmp_path / "sub"
    sub.mkdir()
    write_adapter(random_adapter("minilm", rank=4, seed=7), sub / "a0.safetensors", "peft-file", dtype="F32")
    run(idx, "add", sub / "a0.safetensors")
    two = tmp_path / "two.csv"
    two.write_text("name,label\na0.safetensors,x\n")
    r = run(idx, "tag", "--labels", two)
    assert r.exit_code == 65 and "matches 2 indexed adapters" in r.stderr
    run(idx, "remove", sub / "a0.safetensors")
    assert json.loads(run(idx, "tag", "--list", "--json").stdout)["labels"] == {"nsfw": 2, "style:ink": 1}
    with Lorasearch(idx, readonly=True) as ls:
        assert tags.labels_of(ls.index, [1, 2, 3]) == {1: ["nsfw", "style:ink"], 2: ["nsfw"]}
    assert run(idx, "untag", "1", "style:ink").exit_code == 0
    assert run(idx, "remove", "2").exit_code == 0                  # labels go with the adapter
    with Lorasearch(idx, readonly=True) as ls:
        assert tags.labelled(ls.index) == {1: ["nsfw"]}
    assert run(idx, "untag", "1").exit_code == 0
    assert run(idx, "untag", "99").exit_code == 66
    with Lorasearch(idx, readonly=True) as ls:
        assert tags.labelled(ls.index) == {}


def test_tag_write_waits_for_the_writer_lock(tmp_path):
    from lorasearch.api import Lorasearch

    g = tmp_path / "g"
    g.mkdir()
    write_adapter(random_adapter("minilm", rank=4, seed=0), g / "a.safetensors", "peft-file", dtype="F32")
    idx = tmp_path / "idx"
    run(idx, "index", g)
    with Lorasearch(idx) as other, other.index.writer():
        r = run(idx, "tag", "1", "x")
        assert r.exit_code == 75 and "locked" in r.stderr


def test_explain_and_label_of_another_family_answer_honestly(merge_index, tmp_path):
    idx, _q = merge_index
    other = tmp_path / "mini.safetensors"
    write_adapter(random_adapter("minilm", rank=4, seed=1), other, "peft-file", dtype="F32")
    out = json.loads(run(idx, "explain", other, "--json").stdout)
    assert out["candidates"] == 0 and out["sources"] == [] and out["verdict"].startswith("not a merge")
    out = json.loads(run(idx, "label", other, "--json").stdout)
    assert out["abstained"] and out["reason"] == "no labelled adapters of this family"


def test_dedupe_skips_a_file_changed_since_indexing(tmp_path, dupes):
    idx = tmp_path / "idx"
    run(idx, "index", dupes)
    changed = dupes / "orig-kohya.safetensors"
    write_adapter(random_adapter("sd15", rank=8, seed=77, targets=TARGETS), changed, "kohya", dtype="F32")
    res = run(idx, "dedupe", "--json")
    assert res.exit_code == 0
    out = json.loads(res.stdout)
    assert [Path(u["path"]).name for u in out["unreadable"]] == ["orig-kohya.safetensors"]
    assert "changed or gone" in res.stderr
    names = {Path(m["path"]).name for m in out["clusters"][0]["members"]}
    assert "orig-kohya.safetensors" not in names and {"orig", "orig-fp16.safetensors"} <= names


def test_verify_pairs_norm_rule_and_unknown_scale():
    a = random_adapter("minilm", rank=4, seed=0, targets=r"attention\.self\.value$")
    b = random_adapter("minilm", rank=4, seed=0, targets=r"attention\.self\.value$")
    for m in b.modules:
        m.scale = 2.0                                             # same direction, twice the norm
    from lorasearch import gram as G

    fs = {1: G.module_factors(a), 2: G.module_factors(b)}
    norms = {1: None, 2: None}
    shas = {1: "x", 2: "y"}
    edges, bad = audit.verify_pairs({(1, 2)}, norms, shas, fs.get)
    assert edges == [] and bad == set()
    edges, _ = audit.verify_pairs({(1, 2)}, norms, shas, fs.get, scale_known=lambda i: i != 2)
    assert len(edges) == 1 and edges[0]["match"] == "same-update" and edges[0]["scale_known"] is False
    assert abs(edges[0]["norm_ratio"] - 2.0) < 1e-6
