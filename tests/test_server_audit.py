"""Issue 12 over HTTP: `GET /dedupe`, `POST /explain`, `POST /label` and the label writes
(`PUT /adapters/{id}/labels`, `DELETE /adapters/{id}/labels/{label}`) answer the CLI's --json
objects; writes need the token; bad uploads are a one-line 422; hits carry ranks and labels."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("python_multipart")

from test_server import AUTH, DEMO, _assert_error, _file, _id_of, _peft_parts, served  # noqa: E402,F401

from lorasearch.api import Lorasearch  # noqa: E402
from lorasearch.cli import cli  # noqa: E402


def _cli_json(index: Path, *args) -> dict:
    from click.testing import CliRunner

    r = CliRunner().invoke(cli, ["--index", str(index), *map(str, args), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_dedupe_is_the_cli_object(served):
    client, _app, index, _g = served
    r = client.get("/dedupe")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body == _cli_json(index, "dedupe")
    names = [sorted(Path(m["path"]).name for m in c["members"]) for c in body["clusters"]]
    assert ["sentiment-01", "sentiment-01-bf16", "sentiment-01-copy"] in names
    kept = [m for c in body["clusters"] for m in c["members"] if m["keep"]]
    assert len(kept) == len(body["clusters"]) and body["version"] == 1
    assert client.get("/dedupe", params={"family": "sdxl"}).json()["clusters"] == []
    _assert_error(client.get("/dedupe", params={"threshold": 2}), 400, "usage")
    _assert_error(client.get("/dedupe", params={"k": 0}), 400, "usage")


def test_explain_upload_is_the_cli_object(served):
    client, _app, index, gallery = served
    src = gallery / "topic-03.safetensors"
    r = client.post("/explain", params={"k": 5}, files=_file(src, "mine.safetensors"))
    assert r.status_code == 200, r.text
    body = r.json()
    want = _cli_json(index, "explain", src, "-k", 5)
    assert body["query"]["path"] == "mine.safetensors"           # the client's name, not a temp path
    body["query"]["path"] = want["query"]["path"]
    assert body == want
    assert [Path(p).name for p in body["copies_of_query"]] == ["topic-03.safetensors"]
    msg = _assert_error(client.post("/explain", files={"file": ("junk.safetensors", b"\x00" * 64)}), 422, "bad_input")
    assert msg.startswith("junk.safetensors:") and "tmp" not in msg
    _assert_error(client.post("/explain", params={"k": 0}, files=_file(src)), 400, "usage")


def test_label_writes_then_label_query_and_info_show_them(served):
    client, _app, index, gallery = served
    copy_id, bf16_id, topic_id = (_id_of(client, n) for n in ("sentiment-01-copy", "sentiment-01-bf16", "topic-04"))
    body = {"labels": ["sentiment", "style:plain"]}
    _assert_error(client.put(f"/adapters/{copy_id}/labels", json=body), 401, "unauthorized")
    _assert_error(client.put(f"/adapters/{copy_id}/labels", json=body, headers={"Authorization": "Bearer nope"}),
                  401, "unauthorized")
    r = client.put(f"/adapters/{copy_id}/labels", json=body, headers=AUTH)
    assert r.status_code == 200 and r.json() == {"version": 1, "tagged": 2, "new": 2, "not_found": []}
    assert client.put(f"/adapters/{copy_id}/labels", json=body, headers=AUTH).json()["new"] == 0
    assert client.put(f"/adapters/{bf16_id}/labels", json={"labels": ["sentiment"]}, headers=AUTH).status_code == 200
    assert client.put(f"/adapters/{topic_id}/labels", json={"labels": ["topic"]}, headers=AUTH).status_code == 200
    _assert_error(client.put("/adapters/99999/labels", json=body, headers=AUTH), 404, "missing")
    _assert_error(client.put(f"/adapters/{copy_id}/labels", json={"labels": ["  "]}, headers=AUTH), 400, "usage")
    _assert_error(client.put(f"/adapters/{copy_id}/labels", json={"labels": "x"}, headers=AUTH), 400, "usage")
    _assert_error(client.put(f"/adapters/{copy_id}/labels", json={"labels": []}, headers=AUTH), 400, "usage")

    # shown by the adapter's record, the listing and every query hit (with its ranks)
    assert client.get(f"/adapters/{copy_id}").json()["index"]["labels"] == ["sentiment", "style:plain"]
    listing = {a["id"]: a for a in client.get("/adapters", params={"limit": 1000}).json()["adapters"]}
    assert listing[bf16_id]["labels"] == ["sentiment"] and listing[_id_of(client, "parity-01")]["labels"] == []
    hits = client.post("/query", params={"k": 7}, files=_peft_parts(gallery / "sentiment-01")).json()["results"]
    by_id = {h["id"]: h for h in hits}
    assert by_id[copy_id]["labels"] == ["sentiment", "style:plain"] and by_id[topic_id]["labels"] == ["topic"]
    assert all(h["ranks"] == listing[h["id"]]["ranks"] and h["ranks"] for h in hits)
    assert sum(1 for h in hits if h["labels"]) == 3

    # label an upload: the CLI's object; its labelled copies are the evidence
    r = client.post("/label", params={"k": 5}, files=_peft_parts(gallery / "sentiment-01"))
    assert r.status_code == 200, r.text
    lab = r.json()
    assert lab["labels"] == ["sentiment"] and not lab["abstained"] and lab["labelled_in_family"] == 3
    assert {e["id"] for e in lab["evidence"][:2]} == {copy_id, bf16_id}
    want = _cli_json(index, "label", DEMO / "sentiment-02", "-k", 5)
    got = client.post("/label", params={"k": 5}, files=_peft_parts(DEMO / "sentiment-02")).json()
    got["query"]["path"] = want["query"]["path"]
    assert got == want
    _assert_error(client.post("/label", files={"file": ("bad.safetensors", b"\x00" * 64)}), 422, "bad_input")
    _assert_error(client.post("/label", params={"min_agreement": 3}, files=_peft_parts(gallery / "sentiment-01")),
                  400, "usage")

    # detach one label
    _assert_error(client.delete(f"/adapters/{copy_id}/labels/sentiment"), 401, "unauthorized")
    r = client.delete(f"/adapters/{copy_id}/labels/style:plain", headers=AUTH)
    assert r.status_code == 200 and r.json()["removed"] == 1 and r.json()["id"] == copy_id
    assert client.delete(f"/adapters/{copy_id}/labels/style:plain", headers=AUTH).json()["removed"] == 0
    _assert_error(client.delete("/adapters/99999/labels/x", headers=AUTH), 404, "missing")
    with Lorasearch(index, readonly=True) as ls:
        assert ls.labels().labels == {"sentiment": 2, "topic": 1}


def test_label_writes_on_a_locked_index_answer_409_and_change_nothing(served):
    client, _app, index, _g = served
    aid = _id_of(client, "topic-04")
    other = Lorasearch(index, device="cpu")          # another writer (its own flock)
    try:
        with other.index.writer():
            _assert_error(client.put(f"/adapters/{aid}/labels", json={"labels": ["x"]}, headers=AUTH), 409, "locked")
            _assert_error(client.delete(f"/adapters/{aid}/labels/x", headers=AUTH), 409, "locked")
            assert client.get("/dedupe").status_code == 200                     # reads go on
    finally:
        other.close()
    assert client.get(f"/adapters/{aid}").json()["index"]["labels"] == []
    assert client.put(f"/adapters/{aid}/labels", json={"labels": ["x"]}, headers=AUTH).json()["new"] == 1
