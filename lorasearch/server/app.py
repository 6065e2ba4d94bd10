"""The HTTP API and the web page: ``create_app(index_path, token=…)`` → a FastAPI app.

Bodies are the CLI's ``--json`` objects (same ``version``), all passed through ``envelope()``.
Errors are ``{"version", "error": {"code", "message"}}`` with the status mapped from the CLI's
exit codes; never a traceback. Reads are open (or need the token with ``protect_reads``);
writes (``POST /adapters``, ``DELETE /adapters/{id}``, ``PUT /adapters/{id}/labels``,
``DELETE /adapters/{id}/labels/{label}``) always need ``Authorization: Bearer <token>``.
Audit: ``GET /dedupe``, ``POST /explain`` and ``POST /label`` (an upload) answer the CLI's objects.
"""
from __future__ import annotations

import hmac
import os
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorasearch import __version__
from lorasearch.api import JSON_VERSION
from lorasearch.audit import (DEDUPE_BOUND, DEDUPE_K, EXPLAIN_K, LABEL_K, LABEL_MIN_AGREEMENT,
                              LABEL_MIN_SIMILARITY, SAME_UPDATE_COSINE, SAME_UPDATE_NORM_TOL)
from lorasearch.errors import (BadAdapterError, IncompatibleError, IndexLockedError, LorasearchError,
                               MissingError, UnavailableError, UsageError)
from lorasearch.server import uploads
from lorasearch.server.facades import Facades

STATIC = Path(__file__).parent / "static"
UPLOADS_DIR = "uploads"            # inside the index folder: added uploads live on (the index keeps paths)
SORTS = ("name", "-name", "date", "-date")
PAGE_HEADERS = {   # the page loads nothing from elsewhere; no framing, no sniffing
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class UnauthorizedError(LorasearchError):
    exit_code = 2


# (exception class, HTTP status, error code); first match wins, so subclasses come first
STATUS = [
    (uploads.UploadTooLargeError, 413, "too_large"),
    (BadAdapterError, 422, "bad_input"),
    (UnauthorizedError, 401, "unauthorized"),
    (MissingError, 404, "missing"),
    (IndexLockedError, 409, "locked"),
    (UnavailableError, 503, "unavailable"),
    (IncompatibleError, 400, "incompatible"),
    (UsageError, 400, "usage"),
]


def envelope(obj: Any) -> dict:
    """The one place a response body is made: a typed result's ``to_dict()``, or the facade's dict."""
    for attr in ("to_dict", "as_dict"):
        if hasattr(obj, attr):
            return getattr(obj, attr)()
    if isinstance(obj, dict):
        return obj
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    body = {"version": JSON_VERSION, "error": {"code": code, "message": " ".join(str(message).split())}}
    return JSONResponse(body, status_code=status, headers=headers)


def _status_of(exc: LorasearchError) -> tuple[int, str]:
    for cls, status, code in STATUS:
        if isinstance(exc, cls):
            return status, code
    return 500, "internal"


def _renamed(exc: LorasearchError, tmp: Path, name: str) -> LorasearchError:
    """The same error with the server's temporary path replaced by the client's file name."""
    exc.message = str(exc).replace(str(tmp), name)
    return exc


def similar_to_indexed(ls, adapter_id: int, k: int = 10, threshold: float | None = None,
                       rerank: int | None = None) -> dict:
    """A query by an indexed adapter's id, without upload: re-query with the file the index holds.

    The indexed file must still be the one that was indexed (same size and mtime); otherwise the
    stored embedding no longer describes it and this says so (404) instead of guessing."""
    from lorasearch.api import stat_adapter

    rec = ls.index.get(adapter_id)
    if rec is None:
        raise MissingError(f"no adapter with id {adapter_id} in the index")
    path = Path(rec["path"])
    try:
        same = stat_adapter(path) == (rec["size"], rec["mtime_ns"])
    except OSError:
        same = False
    if not same:
        raise MissingError(f"adapter {adapter_id}: its file {path} is gone or changed since it was indexed; "
                           "re-index it to query by id")
    return ls.query(path, k=k, threshold=threshold, rerank=rerank)


def adapter_info(ls, adapter_id: int, modules: bool = False) -> dict:
    """The ``info --json`` object of an indexed adapter plus its index fields under ``"index"``.

    Without ``modules`` it is built from the catalog (no file read); with it the file is read again
    for the per-module table, as ``lorasearch info`` does."""
    rec = ls.index.get(adapter_id)
    if rec is None:
        raise MissingError(f"no adapter with id {adapter_id} in the index")
    info = dict(rec.get("info") or {})
    if modules:
        from lorasearch.adapters import describe, load_adapter

        info = describe(load_adapter(rec["path"]))
    from lorasearch.indexer import tags

    fields = {k: rec.get(k) for k in ("id", "path", "family", "format", "sha256", "size", "mtime_ns",
                                      "ranks", "n_modules", "delta_norm", "added_at", "updated_at")}
    fields["labels"] = tags.labels_of(ls.index, [adapter_id]).get(adapter_id, [])
    return {"version": JSON_VERSION, **info, "index": fields}


def list_adapters(ls, family: str | None, sort: str, limit: int, offset: int) -> dict:
    recs = ls.index.records(family or None)
    if sort.lstrip("-") == "name":
        recs.sort(key=lambda r: (Path(r["path"]).name.lower(), r["id"]), reverse=sort.startswith("-"))
    else:
        recs.sort(key=lambda r: (r.get("added_at") or "", r["id"]), reverse=sort.startswith("-"))
    page = recs[offset:offset + limit]
    from lorasearch.indexer import tags

    labels = tags.labels_of(ls.index, [r["id"] for r in page])        # one batched lookup
    items = [{"id": r["id"], "name": Path(r["path"]).name, "path": r["path"], "family": r["family"],
              "format": r["format"], "ranks": r.get("ranks"), "n_modules": r.get("n_modules"),
              "size": r.get("size"), "added_at": r.get("added_at"),
              "trigger_words": (r.get("info") or {}).get("trigger_words") or [],
              "labels": labels.get(r["id"], [])} for r in page]
    return {"version": JSON_VERSION, "total": len(recs), "offset": offset, "limit": limit,
            "family": family or None, "sort": sort, "families": ls.index.families(), "adapters": items}


def _sweep_incoming(incoming: Path, older_than_s: float = 3600.0) -> None:
    """Remove upload leftovers of a server that was killed mid-upload (another live server's
    uploads are younger than ``older_than_s``: an upload past the size limit never takes that long)."""
    import time

    if not incoming.is_dir():
        return
    now = time.time()
    for p in incoming.iterdir():
        try:
            if now - p.stat().st_mtime > older_than_s:
                uploads.remove_tree(p)
        except OSError:
            continue


def create_app(index_path: str | os.PathLike, token: str | None = None, max_upload_mb: float = 512,
               device: str = "cpu", write_wait: float = 10.0, protect_reads: bool = False) -> FastAPI:
    """The service over the index at ``index_path`` (which must exist: ``MissingError`` otherwise).

    ``token``: the bearer token writes need (one is generated when ``None``: read it from
    ``app.state.token``). ``max_upload_mb``: uploads beyond it are refused while streaming (413).
    ``write_wait``: seconds a write waits for the index's writer lock before 409.
    ``protect_reads``: reads need the token too (the page and ``/healthz`` stay open)."""
    from lorasearch.api import Lorasearch

    index_path = Path(index_path).expanduser().resolve()
    Lorasearch(index_path, device=device, readonly=True).close()    # fail now, not at the first request
    token = token or secrets.token_urlsafe(24)
    limit = int(max_upload_mb * 1024 * 1024)
    facades = Facades(index_path, device=device, write_wait=write_wait)
    upload_root = index_path / UPLOADS_DIR
    _sweep_incoming(upload_root / ".incoming")
    app = FastAPI(title="lorasearch", version=__version__,
                  description="Search LoRA adapters by their weights. Bodies are the CLI's --json objects.")
    app.state.token, app.state.facades, app.state.index_path = token, facades, index_path
    app.router.add_event_handler("shutdown", facades.close)

    def authorized(request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())

    def need_token(request: Request) -> None:
        if not authorized(request):
            raise UnauthorizedError("this needs `Authorization: Bearer <token>` (the token `lorasearch serve` "
                                    "printed at start, or $LORASEARCH_TOKEN)")

    def read_access(request: Request) -> None:
        if protect_reads:
            need_token(request)

    # -- errors ------------------------------------------------------------------------------
    @app.exception_handler(LorasearchError)
    async def _lorasearch_error(_request, exc: LorasearchError):
        status, code = _status_of(exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return error_response(status, code, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x not in ("query", "path", "body"))
        return error_response(400, "usage", f"{where or 'request'}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        code = {404: "missing", 405: "method_not_allowed"}.get(exc.status_code, "http")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(_request, exc: Exception):
        print(f"lorasearch serve: error: {type(exc).__name__}: {' '.join(str(exc).split())}",
              file=sys.stderr, flush=True)
        return error_response(500, "internal", f"internal error ({type(exc).__name__}); see the server log")

    # -- the page ----------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def _static_headers(request: Request, call_next):
        response = await call_next(request)
        if request.url.path.startswith("/static/"):
            response.headers.update(PAGE_HEADERS)
        return response

    # -- reads -------------------------------------------------------------------------------
    @app.get("/healthz")
    def healthz():
        try:
            n = facades.reader().index.count()
        except LorasearchError as e:
            return error_response(503, "unavailable", str(e))
        return {"version": JSON_VERSION, "status": "ok", "index": str(index_path), "count": n}

    @app.get("/stats", dependencies=[Depends(read_access)])
    def stats():
        return envelope(facades.reader().stats())

    @app.get("/adapters", dependencies=[Depends(read_access)])
    def adapters(family: str | None = Query(None, max_length=200),
                 sort: str = Query("name", pattern="^-?(name|date)$"),
                 limit: int = Query(50, ge=1, le=1000), offset: int = Query(0, ge=0)):
        return envelope(list_adapters(facades.reader(), family, sort, limit, offset))

    @app.get("/adapters/{adapter_id}", dependencies=[Depends(read_access)])
    def adapter(adapter_id: int, modules: bool = False):
        return envelope(adapter_info(facades.reader(), adapter_id, modules))

    @app.get("/adapters/{adapter_id}/similar", dependencies=[Depends(read_access)])
    def similar(adapter_id: int, k: int = Query(10, ge=1, le=10000),
                threshold: float | None = Query(None, ge=-1, le=1),
                rerank: int | None = Query(None, ge=0, le=10000)):
        return envelope(similar_to_indexed(facades.reader(), adapter_id, k, threshold, rerank))

    async def on_upload(request: Request, run) -> dict:
        """``run(path)`` on the uploaded adapter in a temporary folder (never inside the index); the
        body names the client's file, not the server's temporary path."""
        with tempfile.TemporaryDirectory(prefix="lorasearch-query-") as tmp:
            tmp = Path(tmp)
            parts = await uploads.receive(request, tmp, limit)
            path, name = await run_in_threadpool(uploads.assemble, parts, tmp, limit)
            try:
                res = await run_in_threadpool(run, path)
            except LorasearchError as e:
                raise _renamed(e, path, name) from None
        res = envelope(res)
        res["query"]["path"] = name
        return res

    @app.post("/query", dependencies=[Depends(read_access)])
    async def query(request: Request, k: int = Query(10, ge=1, le=10000),
                    threshold: float | None = Query(None, ge=-1, le=1),
                    rerank: int | None = Query(None, ge=0, le=10000)):
        return await on_upload(request, lambda path: facades.reader().query(path, k=k, threshold=threshold,
                                                                            rerank=rerank))

    # -- audit (issue 12): the CLI's dedupe / explain / label objects --------------------------
    @app.get("/dedupe", dependencies=[Depends(read_access)])
    def dedupe(threshold: float = Query(SAME_UPDATE_COSINE, ge=-1, le=1),
               norm_tol: float = Query(SAME_UPDATE_NORM_TOL, ge=0),
               k: int = Query(DEDUPE_K, ge=1, le=10000), bound: float = Query(DEDUPE_BOUND, ge=-1, le=1),
               family: str | None = Query(None, max_length=200)):
        return envelope(facades.reader().dedupe(threshold=threshold, norm_tol=norm_tol, k=k, bound=bound,
                                                family=family or None))

    @app.post("/explain", dependencies=[Depends(read_access)])
    async def explain(request: Request, k: int = Query(EXPLAIN_K, ge=1, le=1000)):
        return await on_upload(request, lambda path: facades.reader().explain(path, k=k))

    @app.post("/label", dependencies=[Depends(read_access)])
    async def label(request: Request, k: int = Query(LABEL_K, ge=1, le=1000),
                    min_similarity: float = Query(LABEL_MIN_SIMILARITY, ge=-1, le=1),
                    min_agreement: float = Query(LABEL_MIN_AGREEMENT, ge=0, le=1),
                    rerank: int | None = Query(None, ge=0, le=10000)):
        return await on_upload(request, lambda path: facades.reader().label(
            path, k=k, min_similarity=min_similarity, min_agreement=min_agreement, rerank=rerank))

    # -- writes ------------------------------------------------------------------------------
    @app.post("/adapters", dependencies=[Depends(need_token)])
    async def add(request: Request):
        incoming = upload_root / ".incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=incoming) as tmp:
            tmp = Path(tmp)
            parts = await uploads.receive(request, tmp, limit)
            path, name = await run_in_threadpool(uploads.assemble, parts, tmp, limit)
            report = await run_in_threadpool(facades.run_write, lambda ls: _keep_and_add(ls, path, name))
        body = envelope(report)
        return JSONResponse(body, status_code=201 if body.get("added") else 200)

    def _keep_and_add(ls, path: Path, name: str):
        """Move the upload to ``uploads/<sha256>/<name>`` (the index keeps paths) and add it there."""
        from lorasearch.adapters import adapter_sha256

        try:
            sha = adapter_sha256(path)
        except (OSError, LorasearchError) as e:
            raise BadAdapterError(name, f"cannot read the upload ({e})") from None
        home = upload_root / sha
        final = home / name
        placed = not final.exists()
        if placed:
            home.mkdir(parents=True, exist_ok=True)
            path.replace(final)
        try:
            report = ls.add([final], progress=False)
        except BaseException:
            if placed:
                uploads.remove_tree(home)
            raise
        if report.errors and not (report.added or report.updated or report.unchanged):
            if placed:
                uploads.remove_tree(home)
            raise _renamed(BadAdapterError(name, report.errors[0][1].split(": ", 1)[-1]), final, name)
        return report

    @app.delete("/adapters/{adapter_id}", dependencies=[Depends(need_token)])
    def delete(adapter_id: int):
        def remove(ls):
            rec = ls.index.get(adapter_id)
            if rec is None:
                raise MissingError(f"no adapter with id {adapter_id} in the index")
            removed, missing = ls.remove([adapter_id])
            home = Path(rec["path"]).parent
            if removed and home.parent == upload_root:       # an upload of ours: its copy goes too
                uploads.remove_tree(home)
            return {"version": JSON_VERSION, "removed": removed, "not_found": missing}

        return envelope(facades.run_write(remove))

    @app.put("/adapters/{adapter_id}/labels", dependencies=[Depends(need_token)])
    def put_labels(adapter_id: int, body: LabelsBody):
        """Attach ``{"labels": [...]}`` to one adapter (those already attached are kept once)."""
        def tag(ls):
            if ls.index.get(adapter_id) is None:
                raise MissingError(f"no adapter with id {adapter_id} in the index")
            return ls.tag(adapter_id, body.labels)

        return envelope(facades.run_write(tag))

    @app.delete("/adapters/{adapter_id}/labels/{label:path}", dependencies=[Depends(need_token)])
    def delete_label(adapter_id: int, label: str):
        def untag(ls):
            if ls.index.get(adapter_id) is None:
                raise MissingError(f"no adapter with id {adapter_id} in the index")
            return ls.untag(adapter_id, [label])

        return envelope(facades.run_write(untag))

    return app


class LabelsBody(BaseModel):
    labels: list[str] = Field(..., max_length=1000)
