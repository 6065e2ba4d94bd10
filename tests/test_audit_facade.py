"""Issue 12 wired in: the facade's audit methods return typed results whose JSON is exactly what
the CLI prints; `query` hits carry ranks and labels (JSON and table); `info` shows an indexed
adapter's id and labels, opening the index read-only and never failing because of it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorasearch.api import Lorasearch
from lorasearch.cli import cli
from lorasearch.results import DedupeResult, ExplainResult, LabelResult, LabelsResult, TagResult, UntagResult

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "gallery"
PICK = ["sentiment-01", "sentiment-01-copy", "sentiment-01-bf16", "sentiment-02", "topic-03.safetensors",
        "topic-04", "parity-01"]
pytestmark = pytest.mark.skipif(not DEMO.is_dir(), reason="demo collection not generated")


def run(index: Path, *args):
    return CliRunner().invoke(cli, ["--index", str(index), *map(str, args)], catch_exceptions=False)


@pytest.fixture()
def idx(tmp_path):
    g = tmp_path / "g"
    g.mkdir()
    for name in PICK:
        (shutil.copytree if (DEMO / name).is_dir() else shutil.copy2)(DEMO / name, g / name)
    index = tmp_path / "idx"
    assert run(index, "index", g).exit_code == 0
    return index, g


def test_facade_results_are_the_cli_objects(idx):
    index, g = idx
    with Lorasearch(index) as ls:
        t = ls.tag(str(g / "sentiment-01-copy"), ["sentiment", "nsfw"])
        assert isinstance(t, TagResult) and (t.tagged, t.new, t.not_found) == (2, 2, [])
        assert ls.tag(labels_file=None, item="999", labels=["x"]).not_found == ["999"]
        assert ls.tag(str(g / "sentiment-01-bf16"), ["sentiment"]).new == 1
        labels = ls.labels()
        assert isinstance(labels, LabelsResult) and labels.labels == {"nsfw": 1, "sentiment": 2}
        d = ls.dedupe()
        e = ls.explain(g / "sentiment-02", k=5)
        lab = ls.label(g / "sentiment-01", k=5)
    assert isinstance(d, DedupeResult) and isinstance(e, ExplainResult) and isinstance(lab, LabelResult)
    assert d.as_dict() == json.loads(run(index, "dedupe", "--json").stdout)
    assert e.as_dict() == json.loads(run(index, "explain", g / "sentiment-02", "-k", 5, "--json").stdout)
    assert lab.as_dict() == json.loads(run(index, "label", g / "sentiment-01", "-k", 5, "--json").stdout)
    assert json.loads(run(index, "tag", "--list", "--json").stdout) == labels.as_dict()
    assert lab.labels == ["sentiment"] and lab["version"] == 1           # dict-style reads still work
    assert [sorted(Path(m["path"]).name for m in c["members"]) for c in d.clusters] == \
        [["sentiment-01", "sentiment-01-bf16", "sentiment-01-copy"]]
    with Lorasearch(index) as ls:
        u = ls.untag(str(g / "sentiment-01-copy"), ["nsfw"])
        assert isinstance(u, UntagResult) and u.removed == 1 and Path(u.path).name == "sentiment-01-copy"
    r = run(index, "untag", "--json", str(g / "sentiment-01-bf16"))
    assert json.loads(r.stdout)["removed"] == 1


def test_query_hits_carry_ranks_and_labels(idx):
    index, g = idx
    q = g / "sentiment-01"
    out = json.loads(run(index, "query", q, "-k", 7, "--json").stdout)
    with Lorasearch(index, readonly=True) as ls:
        ranks = {r["id"]: r["ranks"] for r in ls.index.records()}
    assert all(h["ranks"] == ranks[h["id"]] and h["labels"] == [] for h in out["results"])
    table = run(index, "query", q, "-k", 7).stdout
    assert "labels" not in table                                         # no column when nothing is labelled
    assert run(index, "tag", g / "sentiment-01-copy", "nsfw", "style:ink").exit_code == 0
    out = json.loads(run(index, "query", q, "-k", 7, "--json").stdout)
    got = {Path(h["path"]).name: h["labels"] for h in out["results"]}
    assert got["sentiment-01-copy"] == ["nsfw", "style:ink"] and got["sentiment-01"] == []
    lines = run(index, "query", q, "-k", 7).stdout.splitlines()
    assert lines[1].split()[:5] == ["rank", "score", "match", "id", "labels"]
    copy_line = next(ln for ln in lines if ln.rstrip().endswith("sentiment-01-copy"))
    assert "nsfw,style:ink" in copy_line
    # columns stay aligned: every row's path starts where the header's does
    col = lines[1].index("path")
    rows = [ln for ln in lines[2:] if ln[:4].strip().isdigit()]
    assert len(rows) == 7 and all(ln[col:].startswith(str(g)) for ln in rows)


def test_info_shows_labels_of_an_indexed_adapter_and_never_fails_on_the_index(idx, tmp_path):
    index, g = idx
    target = g / "topic-04"
    assert run(index, "tag", target, "topic").exit_code == 0
    out = json.loads(run(index, "info", target, "--json").stdout)
    assert out["indexed"]["labels"] == ["topic"] and isinstance(out["indexed"]["id"], int)
    text = run(index, "info", target).stdout
    assert "labels: topic" in text and f"indexed: #{out['indexed']['id']}" in text
    out = json.loads(run(index, "info", target, "--json", "--index", index).stdout)   # option after the command
    assert out["indexed"]["labels"] == ["topic"]
    # not indexed, no index, a broken index: info still describes the file, and creates nothing
    assert "indexed" not in json.loads(run(index, "info", DEMO / "parity-02", "--json").stdout)
    none = tmp_path / "no-index"
    r = run(none, "info", target, "--json")
    assert r.exit_code == 0 and "indexed" not in json.loads(r.stdout) and not none.exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "catalog.sqlite").write_bytes(b"not a database" * 100)
    r = run(broken, "info", target, "--json")
    assert r.exit_code == 0 and "indexed" not in json.loads(r.stdout) and r.stderr == ""
    assert sorted(p.name for p in broken.iterdir()) == ["catalog.sqlite"]
