"""`lorasearch serve`: every endpoint, every error status, the token rule, the streamed size limit
and the loopback default, through FastAPI's TestClient (plus raw ASGI calls where the TestClient
would buffer the body) over a small index of the bundled demo adapters."""
from __future__ import annotations

import asyncio
import io
import json
import shutil
import tempfile
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("python_multipart")
from click.testing import CliRunner  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from lorasearch.api import Lorasearch  # noqa: E402
from lorasearch.cli import cli  # noqa: E402
from lorasearch.errors import BadAdapterError, IndexLockedError, MissingError, UnavailableError, UsageError  # noqa: E402
from lorasearch.server import create_app  # noqa: E402
from lorasearch.server.app import _status_of, envelope  # noqa: E402
from lorasearch.server.uploads import UploadTooLargeError  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "gallery"
PICK = ["topic-03.safetensors", "sentiment-01", "sentiment-01-copy", "sentiment-01-bf16", "language-02",
        "parity-01", "topic-04"]
TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

pytestmark = pytest.mark.skipif(not DEMO.is_dir(), reason="demo collection not generated")


def _copy(src: Path, dst: Path) -> None:
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)


@pytest.fixture()
def served(tmp_path, monkeypatch):
    """(client, app, index path, gallery path) over a fresh index of PICK; temp files land in tmp/."""
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for name in PICK:
        _copy(DEMO / name, gallery / name)
    index = tmp_path / "index"
    with Lorasearch(index, create=True, device="cpu") as ls:
        assert not ls.index_dir(gallery).errors
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    app = create_app(index, token=TOKEN, max_upload_mb=1, write_wait=0.2)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, app, index, gallery


def _id_of(client, name: str) -> int:
    listing = client.get("/adapters", params={"limit": 1000}).json()["adapters"]
    return next(a["id"] for a in listing if a["name"] == name)


def _file(path: Path, name: str | None = None):
    return {"file": (name or path.name, path.read_bytes(), "application/octet-stream")}


def _peft_parts(folder: Path):
    return [("file", (n, (folder / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")]


def _zip_of(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for n in ("adapter_config.json", "adapter_model.safetensors"):
            zf.write(folder / n, f"{folder.name}/{n}")
    return buf.getvalue()


def _assert_error(resp, status: int, code: str):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"version", "error"} and body["version"] == 1
    assert body["error"]["code"] == code
    msg = body["error"]["message"]
    assert msg and "\n" not in msg and "Traceback" not in msg
    return msg


# -- reads ---------------------------------------------------------------------------------------
def test_healthz_stats_and_missing_index(served, tmp_path):
    client, _app, index, _g = served
    h = client.get("/healthz")
    assert h.status_code == 200 and h.json()["count"] == len(PICK)
    s = client.get("/stats").json()
    with Lorasearch(index, readonly=True) as ls:
        expected = envelope(ls.stats())
    assert s["version"] == 1 and s["count"] == len(PICK) and s["families"] == {"minilm": len(PICK)}
    assert set(s) == set(expected)
    with pytest.raises(MissingError):
        create_app(tmp_path / "no-index-here", token=TOKEN)


def test_query_upload_is_the_cli_object_and_never_enters_the_index(served, tmp_path):
    client, _app, index, gallery = served
    before = sorted(p.relative_to(index) for p in index.rglob("*"))
    r = client.post("/query", params={"k": 3}, files=_file(gallery / "topic-03.safetensors"))
    assert r.status_code == 200, r.text
    body = r.json()
    with Lorasearch(index, readonly=True) as ls:
        cli_obj = json.loads(json.dumps(envelope(ls.query(gallery / "topic-03.safetensors", k=3)), default=str))
    assert set(body) == set(cli_obj) and body["version"] == cli_obj["version"]
    assert body["query"]["path"] == "topic-03.safetensors"          # the client's name, not a temp path
    assert [(x["id"], x["match"], x["score"]) for x in body["results"]] == \
        [(x["id"], x["match"], x["score"]) for x in cli_obj["results"]]
    top = body["results"][0]
    assert Path(top["path"]).name == "topic-03.safetensors" and top["match"] == "exact" and top["rank"] == 1
    assert len(body["results"]) == 3
    # nothing written to the index, the temporary copy is gone
    assert client.get("/stats").json()["count"] == len(PICK)
    assert sorted(p.relative_to(index) for p in index.rglob("*")) == before
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize("shape", ["two-files", "zip"])
def test_query_peft_folder_as_two_files_or_zip(served, shape):
    client, _app, _index, gallery = served
    folder = gallery / "sentiment-01"
    if shape == "zip":
        r = client.post("/query", files={"file": ("sentiment-01.zip", _zip_of(folder))})
    else:
        r = client.post("/query", files=_peft_parts(folder))
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert {Path(x["path"]).name for x in res[:2]} == {"sentiment-01", "sentiment-01-copy"}
    assert [x["match"] for x in res[:3]] == ["exact", "exact", "same-update"]   # bf16 re-save: same update
    assert Path(res[2]["path"]).name == "sentiment-01-bf16"


def test_query_threshold_and_parameter_errors(served):
    client, _app, _index, gallery = served
    up = _peft_parts(gallery / "topic-04")
    r = client.post("/query", params={"k": 7, "threshold": 0.99}, files=up)
    assert r.status_code == 200
    assert [x["match"] for x in r.json()["results"]] == ["exact"]
    _assert_error(client.post("/query", params={"k": 0}, files=up), 400, "usage")
    _assert_error(client.post("/query", params={"threshold": 2}, files=up), 400, "usage")
    _assert_error(client.post("/query", params={"k": "many"}, files=up), 400, "usage")


def test_bad_uploads_get_a_one_line_reason(served):
    client, _app, _index, _g = served
    msg = _assert_error(client.post("/query", files={"file": ("broken.safetensors", b"\x00" * 64)}), 422, "bad_input")
    assert msg.startswith("broken.safetensors:") and "tmp" not in msg
    msg = _assert_error(client.post("/query", files={"file": ("model.bin", b"PK\x03\x04 pickle")}), 422, "bad_input")
    assert "model.bin" in msg
    msg = _assert_error(client.post("/query", files={"file": ("a.zip", b"not a zip at all")}), 422, "bad_input")
    assert "a.zip" in msg and "zip" in msg
    _assert_error(client.post("/query", data={"k": "3"}), 400, "usage")                       # no file part
    _assert_error(client.post("/query", content=b"{}", headers={"content-type": "application/json"}), 400, "usage")
    _assert_error(client.post("/query", files=[("file", ("a.json", b"{}")), ("file", ("b.json", b"{}"))]),
                  400, "usage")


def test_adapter_info_similar_and_404s(served):
    client, _app, _index, gallery = served
    aid = _id_of(client, "sentiment-01")
    info = client.get(f"/adapters/{aid}").json()
    assert info["version"] == 1 and info["family"] == "minilm" and info["format"] == "peft"
    assert info["index"]["id"] == aid and info["index"]["ranks"] == [int(r) for r in info["ranks"]]
    assert "modules" not in info
    full = client.get(f"/adapters/{aid}", params={"modules": "true"}).json()
    assert len(full["modules"]) == full["n_modules"] == info["n_modules"]
    sim = client.get(f"/adapters/{aid}/similar", params={"k": 4}).json()
    assert sim["results"][0]["id"] == aid
    assert [x["match"] for x in sim["results"][:3]] == ["exact", "exact", "same-update"]
    assert len(sim["results"]) == 4
    _assert_error(client.get("/adapters/99999"), 404, "missing")
    _assert_error(client.get("/adapters/99999/similar"), 404, "missing")
    _assert_error(client.get("/adapters/abc"), 400, "usage")
    _assert_error(client.get("/no/such/route"), 404, "missing")
    # an indexed file changed behind the index's back: refused, not answered from a stale file
    target = gallery / "sentiment-01" / "adapter_config.json"
    target.write_text(target.read_text() + "\n")
    msg = _assert_error(client.get(f"/adapters/{aid}/similar"), 404, "missing")
    assert "changed" in msg


def test_listing_filters_sorts_and_pages(served):
    client, _app, _index, _g = served
    r = client.get("/adapters", params={"sort": "name"}).json()
    names = [a["name"] for a in r["adapters"]]
    assert names == sorted(PICK, key=str.lower) and r["total"] == len(PICK)
    assert [a["name"] for a in client.get("/adapters", params={"sort": "-name"}).json()["adapters"]] == names[::-1]
    dates = [a["added_at"] for a in client.get("/adapters", params={"sort": "date"}).json()["adapters"]]
    assert dates == sorted(dates)
    page = client.get("/adapters", params={"limit": 2, "offset": 2}).json()
    assert [a["name"] for a in page["adapters"]] == names[2:4] and page["total"] == len(PICK)
    assert client.get("/adapters", params={"family": "sdxl"}).json()["total"] == 0
    assert client.get("/adapters", params={"family": "minilm"}).json()["total"] == len(PICK)
    _assert_error(client.get("/adapters", params={"sort": "size"}), 400, "usage")
    _assert_error(client.get("/adapters", params={"limit": 0}), 400, "usage")


# -- writes and the token ------------------------------------------------------------------------
def test_writes_need_the_token(served):
    client, _app, _index, gallery = served
    up = _file(gallery / "topic-03.safetensors", "new.safetensors")
    for headers in ({}, {"Authorization": "Bearer wrong-token-000000000"}, {"Authorization": TOKEN}):
        r = client.post("/adapters", files=up, headers=headers)
        _assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
        _assert_error(client.delete("/adapters/1", headers=headers), 401, "unauthorized")
    assert client.get("/stats").json()["count"] == len(PICK)


def test_add_keeps_the_upload_then_delete_removes_it(served, tmp_path):
    client, _app, index, gallery = served
    fresh = DEMO / "parity-02"
    r = client.post("/adapters", files=_peft_parts(fresh), headers=AUTH)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["version"] == 1 and len(body["added"]) == 1 and body["errors"] == []
    kept = Path(body["added"][0])
    assert kept.parent.parent == index.resolve() / "uploads" and (kept / "adapter_model.safetensors").is_file()
    assert client.get("/stats").json()["count"] == len(PICK) + 1
    q = client.post("/query", files=_peft_parts(fresh)).json()["results"][0]
    assert q["match"] == "exact" and q["path"] == str(kept)
    # the same upload again: unchanged, 200
    again = client.post("/adapters", files=_peft_parts(fresh), headers=AUTH)
    assert again.status_code == 200 and again.json()["unchanged"] == 1
    assert list((tmp_path / "tmp").iterdir()) == []
    d = client.delete(f"/adapters/{q['id']}", headers=AUTH)
    assert d.status_code == 200 and d.json() == {"version": 1, "removed": [str(kept)], "not_found": []}
    assert not kept.parent.exists()
    assert client.get("/stats").json()["count"] == len(PICK)
    _assert_error(client.delete(f"/adapters/{q['id']}", headers=AUTH), 404, "missing")
    # deleting an adapter indexed from its own folder leaves that folder alone
    aid = _id_of(client, "language-02")
    assert client.delete(f"/adapters/{aid}", headers=AUTH).status_code == 200
    assert (gallery / "language-02" / "adapter_config.json").is_file()


def test_a_refused_add_leaves_nothing_behind(served):
    client, _app, index, _g = served
    msg = _assert_error(client.post("/adapters", files={"file": ("junk.safetensors", b"\x01" * 200)}, headers=AUTH),
                        422, "bad_input")
    assert msg.startswith("junk.safetensors:") and str(index) not in msg
    leftovers = [p for p in (index / "uploads").rglob("*") if p.name != ".incoming"]
    assert leftovers == []
    assert client.get("/stats").json()["count"] == len(PICK)


def test_a_locked_index_answers_409_while_reads_go_on(served, capsys):
    client, _app, index, gallery = served
    other = Lorasearch(index, device="cpu")          # another writer (its own flock)
    try:
        with other.index.writer():
            r = client.post("/adapters", files=_peft_parts(DEMO / "parity-02"), headers=AUTH)
            msg = _assert_error(r, 409, "locked")
            assert "locked" in msg and "after waiting 0.2s" in msg
            assert "waiting up to 0.2s" in capsys.readouterr().err       # the waiting writer said so
            assert client.get("/stats").status_code == 200                       # reads are not blocked
            assert client.post("/query", files=_file(gallery / "topic-03.safetensors")).status_code == 200
    finally:
        other.close()
    assert client.post("/adapters", files=_peft_parts(DEMO / "parity-02"), headers=AUTH).status_code == 201


def test_protect_reads_keeps_page_and_health_open(tmp_path):
    index = tmp_path / "index"
    Lorasearch(index, create=True).close()
    app = create_app(index, token=TOKEN, protect_reads=True)
    with TestClient(app) as client:
        _assert_error(client.get("/stats"), 401, "unauthorized")
        _assert_error(client.get("/adapters"), 401, "unauthorized")
        assert client.get("/stats", headers=AUTH).status_code == 200
        assert client.get("/healthz").status_code == 200
        assert client.get("/").status_code == 200


def test_an_internal_error_is_a_json_500_without_traceback(served):
    client, app, _index, _g = served

    def boom():
        raise RuntimeError("disk on fire\nsecond line")

    app.state.facades.reader = boom
    msg = _assert_error(client.get("/stats"), 500, "internal")
    assert "disk on fire" not in msg


def test_status_table_matches_the_cli_exit_codes():
    assert _status_of(BadAdapterError("f", "x")) == (422, "bad_input")
    assert _status_of(MissingError("x")) == (404, "missing")
    assert _status_of(IndexLockedError("x")) == (409, "locked")
    assert _status_of(UnavailableError("x")) == (503, "unavailable")
    assert _status_of(UsageError("x")) == (400, "usage")
    assert _status_of(UploadTooLargeError("x")) == (413, "too_large")


# -- the size limit, enforced while the body streams in ------------------------------------------
def _asgi_post(app, path: str, chunks: list[bytes], headers: dict[str, str]) -> tuple[int, dict, int]:
    """POST ``chunks`` one ASGI message at a time; returns (status, JSON body, chunks the app pulled)."""
    pulled = 0
    sent: list[dict] = []

    async def receive():
        nonlocal pulled
        if pulled < len(chunks):
            pulled += 1
            return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 8750)}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), pulled


def _multipart_chunks(total_mb: int, chunk_kb: int = 64) -> tuple[list[bytes], str]:
    boundary = "xXbOuNdArYXx"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.safetensors\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    n = total_mb * 1024 // chunk_kb
    chunks = [head] + [b"\0" * (chunk_kb * 1024)] * n + [f"\r\n--{boundary}--\r\n".encode()]
    return chunks, f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize("path,auth", [("/query", {}), ("/adapters", AUTH)])
def test_oversized_upload_is_refused_while_streaming(served, tmp_path, path, auth):
    _client, app, index, _g = served                        # the limit is 1 MiB
    chunks, ctype = _multipart_chunks(total_mb=16)
    status, body, pulled = _asgi_post(app, path, chunks, {"content-type": ctype, **auth})   # chunked: no length
    assert status == 413 and body["error"]["code"] == "too_large"
    assert pulled <= 1 + 1024 // 64 + 1 < len(chunks) / 10     # stopped right after the limit, not at the end
    assert list((tmp_path / "tmp").iterdir()) == []
    assert [p for p in (index / "uploads").rglob("*") if p.name != ".incoming"] == []
    # a declared Content-Length over the limit is refused before one byte is read
    status, body, pulled = _asgi_post(app, path, chunks, {"content-type": ctype, "content-length": str(16 << 20),
                                                          **auth})
    assert status == 413 and pulled == 0


def test_an_unauthenticated_upload_is_not_read(served):
    _client, app, _index, _g = served
    chunks, ctype = _multipart_chunks(total_mb=2)
    status, body, pulled = _asgi_post(app, "/adapters", chunks, {"content-type": ctype})
    assert status == 401 and pulled == 0


def test_zip_bomb_stops_at_the_limit(served):
    client, _app, _index, _g = served
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/adapter_config.json", "{}")
        zf.writestr("a/adapter_model.safetensors", b"\0" * (8 << 20))     # 8 MiB of zeros, a few KB zipped
    assert len(buf.getvalue()) < 1 << 20
    _assert_error(client.post("/query", files={"file": ("bomb.zip", buf.getvalue())}), 413, "too_large")


# -- the page ------------------------------------------------------------------------------------
def test_page_is_served_offline_with_a_strict_policy(served):
    client, _app, _index, _g = served
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    html = r.text
    for ref in ("/static/app.js", "/static/style.css", 'for="file"', 'role="alert"'):
        assert ref in html
    for asset in ("/static/app.js", "/static/style.css"):
        a = client.get(asset)
        assert a.status_code == 200 and a.headers["x-content-type-options"] == "nosniff"
        assert "http://" not in a.text and "https://" not in a.text        # nothing from elsewhere
    assert "http://" not in html and "https://" not in html
    assert client.get("/openapi.json").json()["info"]["title"] == "lorasearch"


# -- the command ---------------------------------------------------------------------------------
@pytest.fixture()
def fake_uvicorn(monkeypatch):
    uvicorn = pytest.importorskip("uvicorn")
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    monkeypatch.delenv("LORASEARCH_TOKEN", raising=False)
    return calls


def test_serve_binds_to_loopback_by_default_and_prints_the_token_once(tmp_path, fake_uvicorn):
    index = tmp_path / "index"
    Lorasearch(index, create=True).close()
    res = CliRunner().invoke(cli, ["--index", str(index), "serve"])
    assert res.exit_code == 0, res.output
    (app, kw), = fake_uvicorn
    assert kw["host"] == "127.0.0.1" and kw["port"] == 8750
    assert "loopback only" in res.stderr and "warning" not in res.stderr
    assert res.stderr.count(app.state.token) == 1 and res.stdout == ""
    with TestClient(app) as client:
        r = client.post("/adapters", files={"file": ("x.safetensors", b"")},
                        headers={"Authorization": f"Bearer {app.state.token}"})
        assert r.status_code == 422          # authorized: the file itself is what is refused


def test_serve_elsewhere_warns_without_a_token(tmp_path, fake_uvicorn, monkeypatch):
    index = tmp_path / "index"
    Lorasearch(index, create=True).close()
    res = CliRunner().invoke(cli, ["--index", str(index), "serve", "--host", "0.0.0.0", "--port", "9999"])
    assert res.exit_code == 0 and fake_uvicorn[-1][1]["host"] == "0.0.0.0"
    assert "warning" in res.stderr and "reachable from the network" in res.stderr
    monkeypatch.setenv("LORASEARCH_TOKEN", TOKEN)
    res = CliRunner().invoke(cli, ["--index", str(index), "serve", "--host", "0.0.0.0"])
    assert res.exit_code == 0 and "warning" not in res.stderr and TOKEN not in res.stderr
    assert fake_uvicorn[-1][0].state.token == TOKEN


def test_serve_refuses_a_missing_index_and_a_short_token(tmp_path, fake_uvicorn):
    res = CliRunner().invoke(cli, ["--index", str(tmp_path / "none"), "serve"])
    assert res.exit_code == 66 and "no lorasearch index" in res.stderr and not fake_uvicorn
    Lorasearch(tmp_path / "i", create=True).close()
    res = CliRunner().invoke(cli, ["--index", str(tmp_path / "i"), "serve", "--token", "short"])
    assert res.exit_code == 2 and not fake_uvicorn
    res = CliRunner().invoke(cli, ["--index", str(tmp_path / "new"), "serve", "--create"])
    assert res.exit_code == 0 and (tmp_path / "new").is_dir()


def test_leftovers_of_a_killed_upload_are_swept_at_start(tmp_path):
    import os

    index = tmp_path / "index"
    Lorasearch(index, create=True).close()
    old, young = index / "uploads" / ".incoming" / "tmpold", index / "uploads" / ".incoming" / "tmpyoung"
    for d in (old, young):
        d.mkdir(parents=True)
        (d / "part0").write_bytes(b"x" * 100)
    os.utime(old, (1, 1))
    create_app(index, token=TOKEN)
    assert not old.exists() and young.exists()      # a young one may belong to another live server


def test_client_file_names_cannot_leave_the_upload_folder(served):
    client, _app, index, gallery = served
    data = (gallery / "topic-03.safetensors").read_bytes()
    r = client.post("/adapters", files={"file": ("../../..\\evil name.safetensors", data)}, headers=AUTH)
    assert r.status_code == 201, r.text
    kept = Path(r.json()["added"][0])
    assert kept.parent.parent == index.resolve() / "uploads" and kept.name == "evil_name.safetensors"
    from lorasearch.server.uploads import safe_name

    for name in ("..", ".hidden", "", "a/../../b"):
        assert "/" not in safe_name(name) and not safe_name(name).startswith(".")


def test_envelope_takes_typed_results_or_dicts():
    class Typed:
        def as_dict(self):
            return {"version": 1, "x": 1}

    assert envelope(Typed()) == {"version": 1, "x": 1}
    assert envelope({"version": 1}) == {"version": 1}
    with pytest.raises(TypeError):
        envelope(42)
