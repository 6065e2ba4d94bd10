"""The CLI on awkward inputs: links, odd names, folders vs files, empty and bad collections,
bad options, interrupts. Every failure is one line on stderr with the documented exit code, and
``--json`` prints one object on stdout or nothing."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

import lorasearch.adapters as adapters_pkg
from lorasearch.adapters.writers import random_adapter, write_adapter
from lorasearch.api import Lorasearch
from lorasearch.cli import cli
from lorasearch.errors import BadAdapterError

TARGETS = r"attention\.self\.(query|value)$"


def run(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)


def one_error_line(res):
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorasearch: "), res.stderr
    assert "Traceback" not in res.output
    return lines[0]


def minilm(path: Path, seed: int, fmt: str = "peft-file", rank: int = 4):
    write_adapter(random_adapter("minilm", rank=rank, seed=seed, targets=TARGETS), path, fmt, dtype="F32")
    return path


@pytest.fixture()
def odd(tmp_path):
    """Nested folders, a PEFT folder, names with spaces and unicode, a symlink to a file, a symlink
    loop and a dangling link."""
    g = tmp_path / "g"
    (g / "sub" / "deeper").mkdir(parents=True)
    minilm(g / "a one.safetensors", 1)
    minilm(g / "sub" / "ünï ☃.safetensors", 2)
    minilm(g / "sub" / "deeper" / "peftdir", 3, fmt="peft", rank=8)
    os.symlink("../a one.safetensors", g / "sub" / "link.safetensors")
    os.symlink("..", g / "sub" / "loop")
    os.symlink(tmp_path / "nowhere.safetensors", g / "dangling.safetensors")
    return g


def test_links_loops_and_odd_names_index_once(tmp_path, odd):
    idx = tmp_path / "idx"
    res = run("--index", idx, "index", odd, "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    names = sorted(Path(p).name for p in rep["added"])
    assert names == ["a one.safetensors", "peftdir", "ünï ☃.safetensors"] and rep["errors"] == []
    rep = json.loads(run("--index", idx, "index", odd, "--json").stdout)
    assert rep["added"] == [] and rep["unchanged"] == 3


def test_query_peft_folder_and_its_weights_file_are_the_same_adapter(tmp_path, odd):
    idx = tmp_path / "idx"
    assert run("--index", idx, "index", odd).exit_code == 0
    folder = odd / "sub" / "deeper" / "peftdir"
    a = json.loads(run("--index", idx, "query", folder, "--json").stdout)
    b = json.loads(run("--index", idx, "query", folder / "adapter_model.safetensors", "--json").stdout)
    assert a["results"][0]["match"] == b["results"][0]["match"] == "exact"
    assert a["results"][0]["id"] == b["results"][0]["id"]
    assert a["query"]["sha256"] == b["query"]["sha256"]
    # adding the weights file does not create a second entry
    rep = json.loads(run("--index", idx, "add", folder / "adapter_model.safetensors", "--json").stdout)
    assert rep["added"] == [] and rep["unchanged"] == 1
    res = run("--index", idx, "query", odd, "--json")     # a plain folder is not one adapter
    assert res.exit_code == 65 and res.stdout == ""
    one_error_line(res)


def test_query_other_family_k_and_threshold_edges(tmp_path, odd):
    idx = tmp_path / "idx"
    assert run("--index", idx, "index", odd).exit_code == 0
    sd = tmp_path / "sd.safetensors"
    write_adapter(random_adapter("sd15", rank=2, seed=0, targets=r"attn2\.to_(q|v)$"), sd, "kohya", dtype="F16")
    res = run("--index", idx, "query", sd, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["results"] == []
    assert "family sd1" in one_error_line(res) and "minilm (3)" in res.stderr

    q = odd / "a one.safetensors"
    out = json.loads(run("--index", idx, "query", q, "-k", 1000, "--json").stdout)
    assert [r["rank"] for r in out["results"]] == [1, 2, 3]
    out = json.loads(run("--index", idx, "query", q, "--threshold", "1.0", "--json").stdout)
    assert [r["match"] for r in out["results"]] == ["exact"]
    out = json.loads(run("--index", idx, "query", q, "--threshold", "-1", "--json").stdout)
    assert len(out["results"]) == 3
    for bad in (["--threshold", "nan"], ["--threshold", "1.5"], ["-k", "0"], ["-k", "x"], ["--bogus"]):
        res = run("--index", idx, "query", q, *bad, "--json")
        assert res.exit_code == 2 and res.stdout == "", bad
        one_error_line(res)


def test_remove_by_relative_path_folder_and_weights_file(tmp_path, odd, monkeypatch):
    idx = tmp_path / "idx"
    assert run("--index", idx, "index", odd).exit_code == 0
    monkeypatch.chdir(odd)
    res = run("--index", idx, "remove", "a one.safetensors", "--json")
    assert res.exit_code == 0 and [Path(p).name for p in json.loads(res.stdout)["removed"]] == ["a one.safetensors"]
    res = run("--index", idx, "remove", "sub/deeper/peftdir/adapter_model.safetensors", "--json")
    assert [Path(p).name for p in json.loads(res.stdout)["removed"]] == ["peftdir"]
    assert run("--index", idx, "index", odd).exit_code == 0
    res = run("--index", idx, "remove", "sub", "--json")        # a folder: everything under it
    assert sorted(Path(p).name for p in json.loads(res.stdout)["removed"]) == ["peftdir", "ünï ☃.safetensors"]
    res = run("--index", idx, "remove", "sub", "999")
    assert res.exit_code == 66 and "not in index: sub" in res.stderr


def test_add_folders_and_index_single_file(tmp_path, odd):
    idx = tmp_path / "idx"
    rep = json.loads(run("--index", idx, "add", odd / "sub" / "deeper", "--json").stdout)   # plain folder
    assert [Path(p).name for p in rep["added"]] == ["peftdir"]
    rep = json.loads(run("--index", idx, "add", odd / "sub", "--json").stdout)   # links followed, once each
    assert sorted(Path(p).name for p in rep["added"]) == ["a one.safetensors", "ünï ☃.safetensors"]
    (tmp_path / "empty").mkdir()
    res = run("--index", idx, "add", tmp_path / "empty")
    assert res.exit_code == 66 and "no adapters" in res.stderr
    single = minilm(tmp_path / "single.safetensors", 7)
    rep = json.loads(run("--index", idx, "index", single, "--json").stdout)    # `index FILE` = that file
    assert [Path(p).name for p in rep["added"]] == ["single.safetensors"]


def test_empty_and_all_bad_collections(tmp_path):
    idx = tmp_path / "idx"
    (tmp_path / "empty").mkdir()
    res = run("--index", idx, "index", tmp_path / "empty", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["added"] == []
    assert "no adapters found" in one_error_line(res)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.safetensors").write_bytes(b"hi")
    (bad / "y.ckpt").write_bytes(b"\x80\x02" + b"\0" * 64)
    res = run("--index", idx, "index", bad, "--json")
    assert res.exit_code == 65
    assert {Path(e["path"]).name for e in json.loads(res.stdout)["errors"]} == {"x.safetensors", "y.ckpt"}
    assert len(res.stderr.strip().splitlines()) == 2 and "Traceback" not in res.output


def test_index_location_errors_and_env_var(tmp_path, odd):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for idx, code in ((afile, 2), (afile / "sub", 66)):
        res = run("--index", idx, "index", odd, "--json")
        assert res.exit_code == code and res.stdout == ""
        one_error_line(res)
    res = run("--index", afile, "stats")
    assert res.exit_code == 66
    one_error_line(res)
    env_idx = tmp_path / "env-idx"
    assert run("index", odd, env={"LORASEARCH_INDEX": str(env_idx)}).exit_code == 0
    st = json.loads(run("stats", "--json", env={"LORASEARCH_INDEX": str(env_idx)}).stdout)
    assert st["count"] == 3 and Path(st["path"]) == env_idx.resolve()


def test_interrupted_index_keeps_what_was_acknowledged(tmp_path, odd, monkeypatch):
    import lorasearch.ingest as ingest

    for i in range(5):
        minilm(odd / f"extra{i}.safetensors", 10 + i)
    monkeypatch.setattr(ingest, "EMBED_BATCH", 2)
    real, calls = adapters_pkg.load_adapter, []

    def flaky(path, **kw):
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(path, **kw)

    monkeypatch.setattr(adapters_pkg, "load_adapter", flaky)
    idx = tmp_path / "idx"
    res = run("--index", idx, "index", odd, "--json")
    assert res.exit_code == 130 and res.stdout == ""
    assert "kept 4 added" in one_error_line(res)
    ls = Lorasearch(idx)
    assert ls.index.count() == 4 and ls.index.check()["ok"]
    monkeypatch.setattr(adapters_pkg, "load_adapter", real)
    rep = json.loads(run("--index", idx, "index", odd, "--json").stdout)
    assert len(rep["added"]) == 4 and rep["unchanged"] == 4


def test_one_adapter_the_encoder_rejects_costs_only_itself(tmp_path, odd, monkeypatch):
    import lorasearch.ingest as ingest

    real = ingest.embed

    def picky(encoder, ads, device="auto"):
        if any("ünï" in a.path for a in ads):
            raise BadAdapterError(next(a.path for a in ads if "ünï" in a.path), "encoder refuses it")
        return real(encoder, ads, device)

    monkeypatch.setattr(ingest, "embed", picky)
    res = run("--index", tmp_path / "idx", "index", odd, "--json")
    rep = json.loads(res.stdout)
    assert res.exit_code == 0 and len(rep["added"]) == 2
    assert [Path(e["path"]).name for e in rep["errors"]] == ["ünï ☃.safetensors"]


def test_unexpected_errors_are_one_line(tmp_path, odd, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(Lorasearch, "index_dir", boom)
    res = run("--index", tmp_path / "idx", "index", odd, "--json")
    assert res.exit_code == 1 and res.stdout == ""
    assert "RuntimeError: disk on fire second line" in one_error_line(res)


def test_query_reuses_catalog_hashes_and_sync_one_catalog_query(tmp_path, odd, monkeypatch):
    idx = tmp_path / "idx"
    ls = Lorasearch(idx, create=True)
    monkeypatch.setattr(type(ls.index), "by_path", lambda *a: pytest.fail("per-file catalog lookup"))
    ls.index_dir(odd)
    assert ls.index_dir(odd).unchanged
    real, seen = adapters_pkg.load_adapter, []

    def spy(path, sha256=None, **kw):
        seen.append(sha256)
        return real(path, sha256=sha256, **kw)

    monkeypatch.setattr(adapters_pkg, "load_adapter", spy)
    res = ls.query(odd / "a one.safetensors", k=3, rerank=3)
    assert len(res["results"]) == 3
    assert seen[0] is None and all(s is not None for s in seen[1:])   # candidates: catalog sha256


def test_batched_rerank_cosines_equal_the_float64_reference():
    from lorasearch.similarity import exact_cosines
    from lorasearch.canonical import canonicalize
    from lorasearch.similarity import delta_cosine, delta_norm

    q = random_adapter("minilm", rank=4, seed=1, targets=TARGETS)
    others = [random_adapter("minilm", rank=8, seed=2, targets=r"attention\.self\.(query|key|value)$"),
              random_adapter("minilm", rank=4, seed=1, targets=TARGETS),               # the same ΔW
              random_adapter("minilm", rank=2, seed=3, targets=r"attention\.self\.value$"),
              random_adapter("minilm", rank=4, seed=4, targets=r"attention\.output\.dense$")]  # disjoint
    for m in others[1].modules:
        m.B, m.A, m.scale = m.B * 2.0, m.A, m.scale / 2.0
    qnorm, cos, norms = exact_cosines(canonicalize(q, device="cpu"), others, [None] * len(others))
    assert qnorm == pytest.approx(delta_norm(q), rel=1e-5)
    assert norms == pytest.approx([delta_norm(o) for o in others], rel=1e-9)
    assert cos == pytest.approx([delta_cosine(q, o) for o in others], abs=1e-5)
    assert cos[1] == pytest.approx(1.0, abs=1e-5) and cos[3] == 0.0
    _, _, given = exact_cosines(canonicalize(q, device="cpu"), others[:1], [123.0])
    assert given[0] == 123.0
