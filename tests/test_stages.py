"""The stages behind the CLI (ingest / query / watch / results) and issue 7's CLI items, through the
CLI (click's CliRunner) and the Python API: typed results serialized one way, one bad file never
stopping `index`, special files refused unopened, symlink pruning, quiet candidate re-loading, the
query table, global options on both sides of the subcommand, same-update with an unknown scale."""
from __future__ import annotations

import ast
import contextlib
import json
import logging
import os
import signal
from pathlib import Path

import pytest
from click.testing import CliRunner

import lorasearch.adapters as adapters_pkg
from lorasearch.adapters.writers import random_adapter, write_adapter
from lorasearch.api import Lorasearch
from lorasearch.cli import cli
from lorasearch.results import JSON_VERSION, Hit, QueryResult, RemoveResult, StatsResult, SyncReport

TARGETS = r"attention\.self\.(query|value)$"
ROOT = Path(__file__).resolve().parents[1]


def run(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)


def minilm(path: Path, seed: int, fmt: str = "peft-file", rank: int = 4, alpha: float | None = None):
    write_adapter(random_adapter("minilm", rank=rank, seed=seed, targets=TARGETS, alpha=alpha), path, fmt, dtype="F32")
    return path


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (a blocked open() of a FIFO is interrupted by SIGALRM)."""
    def fire(*_):
        raise TimeoutError(f"blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture()
def gallery(tmp_path):
    g = tmp_path / "g"
    g.mkdir()
    for i in range(4):
        minilm(g / f"a{i}.safetensors", i)
    return g


# ---- typed results, one JSON envelope --------------------------------------------------------
def test_api_returns_typed_results_that_serialize_like_the_cli(tmp_path, gallery):
    idx = tmp_path / "idx"
    with Lorasearch(idx, create=True) as ls:
        rep = ls.index_dir(gallery)
        assert isinstance(rep, SyncReport) and len(rep.added) == 4
        res = ls.query(gallery / "a1.safetensors", k=3)
        assert isinstance(res, QueryResult) and all(isinstance(h, Hit) for h in res.hits)
        assert res.hits[0].match == "exact" and res.hits[0].path.endswith("a1.safetensors")
        assert [h.rank for h in res.hits] == [1, 2, 3]
        api_obj = res.as_dict()
        st = ls.stats()
        assert isinstance(st, StatsResult) and st["count"] == 4 and st.as_dict()["version"] == JSON_VERSION
    cli_obj = json.loads(run("--index", idx, "query", gallery / "a1.safetensors", "-k", "3", "--json").stdout)
    assert cli_obj == api_obj and cli_obj["version"] == JSON_VERSION
    assert set(cli_obj["results"][0]) == {"rank", "id", "path", "score", "match", "embedding_score", "reranked",
                                          "family", "format", "sha256", "scale_known", "ranks", "labels",
                                          "rescored_from", "score_bound", "exact_cosine"}
    assert isinstance(cli_obj["query"]["scale_known"], bool)
    with Lorasearch(idx) as ls:
        rm = ls.remove([gallery / "a0.safetensors", "nope"])
    assert isinstance(rm, RemoveResult) and rm.as_dict() == {"version": JSON_VERSION, "removed": [
        os.path.realpath(gallery / "a0.safetensors")], "not_found": ["nope"]}
    removed, missing = rm                                   # the old tuple unpacking still works
    assert missing == ["nope"]


def test_package_proper_and_training_never_import_eval():
    """DESIGN: nothing under lorasearch/ imports lorasearch.eval; encoders/train.py takes an evaluator."""
    files = sorted((ROOT / "lorasearch").rglob("*.py")) + [ROOT / "encoders" / "train.py"]
    offenders = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{f.relative_to(ROOT)}: {n}" for n in names if n.startswith("lorasearch.eval")]
    assert offenders == []


# ---- one bad file costs one line --------------------------------------------------------------
def test_index_mixed_folder_indexes_every_good_file(tmp_path, gallery, monkeypatch):
    (gallery / "garbage.safetensors").write_bytes(b"\x00" * 64)
    (gallery / "truncated.safetensors").write_bytes((gallery / "a0.safetensors").read_bytes()[:200])
    (gallery / "pickle.ckpt").write_bytes(b"\x80\x04K\x01.")
    (gallery / "empty.safetensors").write_bytes(b"")
    minilm(gallery / "odd.safetensors", 9)
    real = adapters_pkg.load_adapter

    def odd_one_explodes(path, **kw):   # an exception no reader rule anticipated
        if Path(path).name == "odd.safetensors":
            raise ZeroDivisionError("surprise")
        return real(path, **kw)

    monkeypatch.setattr(adapters_pkg, "load_adapter", odd_one_explodes)
    res = run("--index", tmp_path / "idx", "index", gallery, "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert sorted(Path(p).name for p in rep["added"]) == [f"a{i}.safetensors" for i in range(4)]
    bad = sorted(Path(e["path"]).name for e in rep["errors"])
    assert bad == ["empty.safetensors", "garbage.safetensors", "odd.safetensors", "pickle.ckpt",
                   "truncated.safetensors"]
    lines = res.stderr.strip().splitlines()
    skipped = [ln for ln in lines if ln.startswith("lorasearch: skipped ")]
    assert len(skipped) == 5 and "Traceback" not in res.stderr
    assert any("odd.safetensors: internal error (ZeroDivisionError: surprise)" in ln for ln in skipped)
    # with LORASEARCH_DEBUG=1 the unexpected one also shows its traceback, and the run still ends well
    minilm(gallery / "a4.safetensors", 4)
    res = run("--index", tmp_path / "idx", "index", gallery, "--json", env={"LORASEARCH_DEBUG": "1"})
    assert res.exit_code == 0 and "Traceback" in res.stderr and "ZeroDivisionError: surprise" in res.stderr
    assert [Path(p).name for p in json.loads(res.stdout)["added"]] == ["a4.safetensors"]


def test_an_unexpected_error_in_the_encoder_costs_only_that_adapter(tmp_path, gallery, monkeypatch):
    import lorasearch.ingest as ingest

    real = ingest.embed

    def picky(encoder, ads, device="auto"):
        if any(a.path.endswith("a2.safetensors") for a in ads):
            raise KeyError("unexpected")
        return real(encoder, ads, device)

    monkeypatch.setattr(ingest, "embed", picky)
    with Lorasearch(tmp_path / "idx", create=True) as ls:
        rep = ls.index_dir(gallery)
    assert len(rep.added) == 3 and [Path(p).name for p, _ in rep.errors] == ["a2.safetensors"]
    assert "internal error (KeyError" in rep.errors[0][1]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_special_files_are_refused_without_opening_them(tmp_path, gallery):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    peft = tmp_path / "peftpipe"
    minilm(peft, 5, fmt="peft")
    (peft / "adapter_model.safetensors").unlink()
    os.mkfifo(peft / "adapter_model.safetensors")
    idx = tmp_path / "idx"
    assert run("--index", idx, "index", gallery).exit_code == 0
    with deadline(60):
        res = run("--index", idx, "add", fifo, "--json")
        assert res.exit_code == 65 and "FIFO" in json.loads(res.stdout)["errors"][0]["error"]
        assert res.stderr.strip() == f"lorasearch: skipped {fifo}: is a FIFO (named pipe), not a regular file; " \
                                     "refused without opening it"
        res = run("--index", idx, "add", peft, "--json")
        assert res.exit_code == 65 and "FIFO" in res.stdout
        for cmd in (("info", fifo), ("--index", idx, "query", fifo), ("--index", idx, "index", fifo)):
            res = run(*cmd)
            assert res.exit_code == 65 and "not a regular file" in res.stderr, cmd
        with Lorasearch(idx) as ls:
            assert ls.index.count() == 4


# ---- prune follows the path a file was seen as ------------------------------------------------
def test_prune_drops_an_entry_whose_symlink_was_deleted(tmp_path, gallery):
    elsewhere = tmp_path / "store"
    elsewhere.mkdir()
    target = minilm(elsewhere / "real.safetensors", 11)
    link = gallery / "linked.safetensors"
    link.symlink_to(target)
    idx = tmp_path / "idx"
    rep = json.loads(run("--index", idx, "index", gallery, "--json").stdout)
    assert str(target) in rep["added"] and len(rep["added"]) == 5
    with Lorasearch(idx) as ls:
        assert ls.index.by_path(str(target))["info"]["seen_as"] == str(link)
    link.unlink()
    rep = json.loads(run("--index", idx, "index", gallery, "--prune", "--json").stdout)
    assert rep["removed"] == [str(target)]
    with Lorasearch(idx) as ls:
        assert ls.index.count() == 4 and ls.index.by_path(str(target)) is None


def test_watch_prunes_a_deleted_symlink(tmp_path, gallery):
    target = minilm(tmp_path / "real.safetensors", 12)
    (gallery / "linked.safetensors").symlink_to(target)
    rounds, reports = [0], []

    def stop():
        rounds[0] += 1
        if rounds[0] == 1:
            (gallery / "linked.safetensors").unlink()
        return rounds[0] >= 2

    with Lorasearch(tmp_path / "idx", create=True) as ls:
        ls.index_dir(gallery)
        assert ls.index.count() == 5
        ls.watch(gallery, interval=0.01, stop=stop, on_report=reports.append)
        assert ls.index.count() == 4
    assert [r.removed for r in reports] == [[str(target)]]


# ---- query output -----------------------------------------------------------------------------
def test_query_does_not_repeat_warnings_about_candidates(tmp_path, gallery, caplog):
    idx = tmp_path / "idx"
    assert run("--index", idx, "index", gallery).exit_code == 0
    query = minilm(tmp_path / "q", 1, fmt="peft")          # a PEFT folder: no warning of its own
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lorasearch.adapters"):
        res = run("--index", idx, "query", query, "-k", "4")
    assert res.exit_code == 0
    assert [r.getMessage() for r in caplog.records] == []
    assert res.stderr == ""
    with caplog.at_level(logging.WARNING, logger="lorasearch.adapters"):   # only the candidates were quiet
        adapters_pkg.load_adapter(gallery / "a1.safetensors")
    assert any("without adapter_config.json" in r.getMessage() for r in caplog.records)


def test_query_table_has_a_header_and_says_what_a_score_means(tmp_path, gallery):
    idx = tmp_path / "idx"
    assert run("--index", idx, "index", gallery).exit_code == 0
    lines = run("--index", idx, "query", gallery / "a0.safetensors", "-k", "3").stdout.splitlines()
    assert lines[1].split() == ["rank", "score", "match", "id", "path"]
    # 3 hits, then what a score means (and, for bare PEFT files whose alpha is unknown, the legend)
    legend = [ln for ln in lines if ln.startswith("[scale unknown]:")]
    # MiniLM under the default `auto`: the shipped checkpoint's fusion, and what still decides match kinds
    assert len(lines) == 6 + len(legend) and lines[5].startswith("score: fusion w=") and "decides exact" in lines[5]
    assert bool(legend) == any(ln.endswith("[scale unknown]") for ln in lines[2:5])
    sk = tmp_path / "sk"
    assert run("--index", sk, "index", gallery, "--encoder", "sketch").exit_code == 0
    lines = run("--index", sk, "query", gallery / "a0.safetensors", "-k", "3").stdout.splitlines()
    assert "exact cosine of the weight updates ΔW" in lines[5]
    lines = run("--index", idx, "query", gallery / "a0.safetensors", "-k", "3", "--rerank", "0").stdout.splitlines()
    assert "embedding cosine" in lines[5] and lines[2].split()[2] == "exact"
    assert all(ln.replace("  [scale unknown]", "").endswith("(e)") for ln in lines[3:5])   # not re-ranked: marked


# ---- global options on both sides of the subcommand ---------------------------------------------
def test_global_options_are_accepted_after_the_subcommand(tmp_path, gallery):
    idx = tmp_path / "after"
    res = run("index", gallery, "--index", idx, "--device", "cpu", "--lock-timeout", "1", "--json")
    assert res.exit_code == 0, res.output
    assert (idx / "catalog.sqlite").exists()
    res = run("query", gallery / "a2.safetensors", "-k", "1", "--index", idx, "--json")
    assert json.loads(res.stdout)["results"][0]["match"] == "exact"
    assert json.loads(run("stats", "--json", "--index", idx).stdout)["count"] == 4
    # after the subcommand wins over before it
    res = run("--index", tmp_path / "elsewhere", "stats", "--index", idx, "--json")
    assert json.loads(res.stdout)["count"] == 4
    assert run("remove", "0", "--index", idx).exit_code in (0, 66)
    res = run("index", gallery, "--device", "tpu")
    assert res.exit_code == 2 and "tpu" in res.stderr
    assert run("info", gallery / "a1.safetensors", "--device", "cpu").exit_code == 0


# ---- same adapter, one side's alpha unknown -----------------------------------------------------
def test_same_direction_with_unknown_scale_is_same_update(tmp_path, monkeypatch):
    g = tmp_path / "g"
    g.mkdir()
    ad = random_adapter("minilm", rank=4, seed=3, targets=TARGETS, alpha=16.0)
    write_adapter(ad, g / "with_config", "peft", dtype="F32")           # alpha 16 known: scale 4
    write_adapter(random_adapter("minilm", rank=4, seed=8, targets=TARGETS), g / "other.safetensors",
                  "peft-file", dtype="F32")
    bare = tmp_path / "bare.safetensors"                                # same B, A; alpha unknown
    (tmp_path / "bare.safetensors").write_bytes((g / "with_config" / "adapter_model.safetensors").read_bytes())
    real = adapters_pkg.load_adapter

    def mark(path, **kw):   # the reader sets scale_known=False for a bare PEFT weights file; pinned here
        a = real(path, **kw)
        if Path(path).name == "bare.safetensors":
            a.scale_known = False
        return a

    monkeypatch.setattr(adapters_pkg, "load_adapter", mark)
    idx = tmp_path / "idx"
    assert run("--index", idx, "index", g).exit_code == 0
    obj = json.loads(run("--index", idx, "query", bare, "-k", "2", "--json").stdout)
    top = obj["results"][0]
    assert top["path"].endswith("with_config") and top["score"] == pytest.approx(1.0, abs=1e-5)
    assert top["match"] == "same-update" and top["scale_known"] is False
    assert obj["results"][1]["match"] == "similar" and obj["query"]["scale_known"] is False
    text = run("--index", idx, "query", bare, "-k", "2").stdout
    assert "same-update" in text and "[scale unknown]" in text
    # the other way round: the indexed side's scale is unknown (recorded in the catalog)
    assert run("--index", idx, "add", bare).exit_code == 0
    obj = json.loads(run("--index", idx, "query", g / "with_config", "-k", "3", "--json").stdout)
    by_name = {Path(r["path"]).name: r for r in obj["results"]}
    assert by_name["bare.safetensors"]["match"] == "same-update" and by_name["bare.safetensors"]["scale_known"] is False
    assert by_name["with_config"]["match"] == "exact" and by_name["with_config"]["scale_known"] is True
    with Lorasearch(idx) as ls:
        assert ls.index.by_path(str(bare))["info"]["scale_known"] is False


@pytest.mark.skipif(not hasattr(__import__("lorasearch.types").types.LoraAdapter, "scale_known"),
                    reason="needs the reader's LoraAdapter.scale_known (issue 7, branch `reader`)")
def test_bare_peft_weights_file_is_the_same_update_as_its_folder(tmp_path):
    ad = random_adapter("minilm", rank=4, seed=3, targets=TARGETS, alpha=16.0)
    write_adapter(ad, tmp_path / "g" / "folder", "peft", dtype="F32")
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes((tmp_path / "g" / "folder" / "adapter_model.safetensors").read_bytes())
    idx = tmp_path / "idx"
    assert run("--index", idx, "index", tmp_path / "g").exit_code == 0
    top = json.loads(run("--index", idx, "query", bare, "-k", "1", "--json").stdout)["results"][0]
    assert top["match"] == "same-update" and top["scale_known"] is False


def test_known_scales_that_differ_stay_similar(tmp_path):
    g = tmp_path / "g"
    g.mkdir()
    write_adapter(random_adapter("minilm", rank=4, seed=3, targets=TARGETS, alpha=16.0), g / "x16", "peft", dtype="F32")
    write_adapter(random_adapter("minilm", rank=4, seed=3, targets=TARGETS, alpha=8.0), tmp_path / "x8", "peft",
                  dtype="F32")
    idx = tmp_path / "idx"
    assert run("--index", idx, "index", g).exit_code == 0
    top = json.loads(run("--index", idx, "query", tmp_path / "x8", "-k", "1", "--json").stdout)["results"][0]
    assert top["score"] == pytest.approx(1.0, abs=1e-5) and top["match"] == "similar" and top["scale_known"] is True


# ---- one reader for labels tables, folder listings and manifests -----------------------------
def test_one_labels_and_manifest_reader_for_training_and_eval(tmp_path):
    from lorasearch.data.loaders import read_label_table, read_labels
    from lorasearch.errors import BadAdapterError, MissingError
    from lorasearch.eval import retrieval as R
    from lorasearch.eval.cli import eval_group

    csv = tmp_path / "labels.csv"
    csv.write_text("name,label,shots\na,x,8\nb,y,\n")
    assert read_label_table(csv) == R.read_labels_csv(csv) == {"a": ("x", "8"), "b": ("y", None)}
    assert read_labels(csv) == {"a": "x", "b": "y"}
    csv.write_text("name,label\na,x\na,x\n")            # one rule: a name listed twice is refused
    for reader in (read_labels, R.read_labels_csv):
        with pytest.raises(BadAdapterError, match="line 3: 'a' labelled twice"):
            reader(csv)
    coll = tmp_path / "coll"
    coll.mkdir()
    (coll / "manifest.parquet").write_bytes(b"PAR1 not really")
    r = CliRunner().invoke(eval_group, ["retrieval", "--collection", str(coll)])
    assert r.exit_code == 65 and "not a readable Parquet manifest" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(MissingError, match="no manifest"):
        R.from_collection(tmp_path / "nothing")


def test_store_options_are_accepted_after_the_subcommand(tmp_path, gallery):
    idx = tmp_path / "st"
    assert run("index", gallery, "--index", idx, "--store", "faiss").exit_code == 0
    assert json.loads((idx / "store.json").read_text())["store"] == "faiss"
    res = run("stats", "--index", idx, "--store", "milvus")          # the other store: refused, one line
    assert res.exit_code == 2 and "uses the faiss store" in res.output
