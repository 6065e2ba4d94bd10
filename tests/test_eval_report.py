"""`lorasearch eval report | probe | invariance` on a small synthetic labelled set of real files."""
import json
import re

import pytest
from click.testing import CliRunner

from test_eval_retrieval import write_set  # the same synthetic labelled set (tests/ is on sys.path)




@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return write_set(tmp_path_factory.mktemp("report"), n_labels=3, n_gallery=4, n_query=2)


def _cli(*args):
    from lorasearch.eval.cli import eval_group

    return CliRunner().invoke(eval_group, list(map(str, args)))


def _inputs(root):
    return ["--gallery", root / "gallery", "--queries", root / "queries", "--labels", root / "labels.csv"]


def test_report_writes_markdown_json_and_plots(small, tmp_path):
    out = tmp_path / "rep"
    r = _cli("report", *_inputs(small), "--out", out, "--seeds", 2, "--max-epochs", 15,
             "--strengths", "0,1")
    assert r.exit_code == 0, r.output + str(r.exception)
    md = (out / "report.md").read_text()
    for png in re.findall(r"\]\(([^)]+\.png)\)", md):
        assert (out / png).stat().st_size > 1000, png
    names = {p.name for p in out.glob("*.png")}
    assert {"ndcg_by_method.png", "ndcg_by_shots.png", "invariance_minilm.png", "pca_sketch_minilm.png"} <= names
    res = json.loads((out / "results.json").read_text())
    assert res["kind"] == "report" and set(res) >= {"retrieval", "probe", "invariance"}
    assert set(res["retrieval"]["methods"]) == {"auto", "sketch", "dense", "rawcos"}
    assert res["probe"]["methods"]["sketch"]["seeds"] == 2
    assert "## Headline table" in md and "| sketch |" in md
    assert r.stdout.startswith("| method | NDCG@10 | Hit@1 | mAP@10 | Recall@10 |")


def test_probe_and_invariance_commands(small):
    r = _cli("probe", *_inputs(small), "--seeds", 2, "--hidden", 32, "--max-epochs", 10, "--json")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert obj["kind"] == "probe" and obj["methods"]["sketch"]["n"] == 18
    r = _cli("invariance", *_inputs(small), "--strengths", "0,1", "--max-adapters", 6, "--json")
    assert r.exit_code == 0, r.output
    inv = json.loads(r.stdout)["families"]["minilm"]
    assert inv["n_adapters"] == 6 and max(inv["methods"]["sketch"]["drift_max"]) < 1e-6
    assert inv["methods"]["rawcos"]["drift_mean"][1] > 1e-3
    r = _cli("invariance", *_inputs(small), "--strengths", "0,x")
    assert r.exit_code == 2
