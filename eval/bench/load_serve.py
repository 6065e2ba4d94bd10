"""Load test of `lorasearch serve` on loopback: many readers, one writer, nothing lost.

    python eval/bench/load_serve.py --clients 8 --queries 500 --out eval/results/serve.md

Builds a fresh index of the demo gallery in a temporary folder, starts a real `lorasearch serve`
(uvicorn, one process) on a free 127.0.0.1 port, then measures side by side in one run:

1. ``direct``: the same queries through the Python facade in this process, one at a time (the
   work without HTTP: the yardstick);
2. ``http-1``: one HTTP client, one query at a time (what HTTP + multipart + JSON add);
3. ``load``: ``--clients`` clients × ``--queries`` uploads each (``POST /query``), while one writer
   adds (``POST /adapters``) and removes (``DELETE``) adapters as fast as it can. After every
   acknowledged add the writer queries the same bytes and expects its new id as the exact top hit;
   at the end the index must hold exactly the acknowledged adds minus the acknowledged removals.

Bounded: every request has a timeout and the whole run stops at ``--max-seconds`` (clients then
report how far they got). Loopback only: the server binds 127.0.0.1, nothing else is contacted.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "data" / "demo"
TOKEN = "load-test-token-0123456789"
PEFT = ("adapter_config.json", "adapter_model.safetensors")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _upload(path: Path) -> list[tuple[str, tuple[str, bytes]]]:
    """Multipart parts for an adapter file or PEFT folder (its two files)."""
    if path.is_dir():
        return [("file", (n, (path / n).read_bytes())) for n in PEFT]
    return [("file", (path.name, path.read_bytes()))]


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q)) if values else float("nan")


def _start_server(index: Path, port: int, log) -> subprocess.Popen:
    env = {**os.environ, "LORASEARCH_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "lorasearch.cli", "--index", str(index), "serve",
                             "--host", "127.0.0.1", "--port", str(port), "--write-wait", "30"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not come up within 60 s")


def run(clients: int, queries: int, baseline: int, max_seconds: float, workdir: Path,
        rerank: int | None = None) -> dict:
    import httpx

    from lorasearch.api import Lorasearch

    gallery = workdir / "gallery"
    shutil.copytree(DEMO / "gallery", gallery)
    index = workdir / "index"
    with Lorasearch(index, create=True, device="cpu") as ls:
        n_indexed = len(ls.index_dir(gallery).added)
    query_paths = sorted((DEMO / "queries").iterdir()) + sorted(gallery.iterdir())[:8]
    uploads = [_upload(p) for p in query_paths]
    writer_pool = sorted((DEMO / "queries").iterdir())      # added under uploads/, then removed again

    # 1. direct: the facade in this process, same uploads (written once to disk), one at a time
    direct = []
    with Lorasearch(index, readonly=True, device="cpu") as ls:
        for i in range(baseline):
            t0 = time.perf_counter()
            ls.query(query_paths[i % len(query_paths)], k=10, rerank=rerank)
            direct.append(time.perf_counter() - t0)

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(workdir / "serve.log", "w+")
    proc = _start_server(index, port, log)
    try:
        # 2. one HTTP client, sequential (after two untimed warm-up queries: imports, encoder set-up)
        http1 = []
        params = {"k": 10} if rerank is None else {"k": 10, "rerank": rerank}
        with httpx.Client(base_url=base, timeout=120) as c:
            for i in range(2):
                c.post("/query", params=params, files=uploads[i]).raise_for_status()
            for i in range(baseline):
                t0 = time.perf_counter()
                r = c.post("/query", params=params, files=uploads[i % len(uploads)])
                http1.append(time.perf_counter() - t0)
                r.raise_for_status()

        # 3. clients × queries with a writer
        stop_at = time.monotonic() + max_seconds
        lat: list[list[float]] = [[] for _ in range(clients)]
        errors: list[str] = []
        done = threading.Event()
        err_lock = threading.Lock()

        def client(ci: int) -> None:
            with httpx.Client(base_url=base, timeout=120) as c:
                for i in range(queries):
                    if time.monotonic() > stop_at:
                        return
                    t0 = time.perf_counter()
                    try:
                        r = c.post("/query", params=params, files=uploads[(ci * 7 + i) % len(uploads)])
                        ok = r.status_code == 200 and r.json()["results"]
                    except httpx.HTTPError as e:
                        ok, r = False, e
                    lat[ci].append(time.perf_counter() - t0)
                    if not ok:
                        with err_lock:
                            errors.append(f"client {ci} query {i}: {getattr(r, 'status_code', r)}")

        writes = {"adds": 0, "removes": 0, "read_after_write_ok": 0, "write_s": []}
        present: dict[int, str] = {}       # acknowledged adds not (yet) removed: id -> path

        def writer() -> None:
            auth = {"Authorization": f"Bearer {TOKEN}"}
            with httpx.Client(base_url=base, timeout=120, headers=auth) as c:
                i = 0
                while not done.is_set() and time.monotonic() < stop_at:
                    src = writer_pool[i % len(writer_pool)]
                    i += 1
                    t0 = time.perf_counter()
                    r = c.post("/adapters", files=_upload(src))
                    writes["write_s"].append(time.perf_counter() - t0)
                    if r.status_code not in (200, 201) or len(r.json()["added"] + r.json()["updated"]) +\
                            r.json()["unchanged"] != 1:
                        errors.append(f"writer add {src.name}: {r.status_code} {r.text[:200]}")
                        continue
                    writes["adds"] += 1
                    top = c.post("/query", params={"k": 1}, files=_upload(src)).json()["results"][0]
                    kept = (r.json()["added"] + r.json()["updated"] or [None])[0]
                    if top["match"] == "exact" and (kept is None or top["path"] == kept):
                        writes["read_after_write_ok"] += 1
                    else:
                        errors.append(f"writer: {src.name} not found right after its add ({top})")
                    present[top["id"]] = top["path"]
                    if len(present) > 4:                     # keep 4 uploads, remove the oldest
                        rid = next(iter(present))
                        t0 = time.perf_counter()
                        d = c.delete(f"/adapters/{rid}")
                        writes["write_s"].append(time.perf_counter() - t0)
                        if d.status_code != 200:
                            errors.append(f"writer remove {rid}: {d.status_code} {d.text[:200]}")
                            continue
                        writes["removes"] += 1
                        present.pop(rid)

        threads = [threading.Thread(target=client, args=(ci,)) for ci in range(clients)]
        w = threading.Thread(target=writer)
        t0 = time.perf_counter()
        w.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        done.set()
        w.join()

        # every acknowledged add still present is in the index, nothing else was added
        with httpx.Client(base_url=base, timeout=120) as c:
            listing = c.get("/adapters", params={"limit": 1000}).json()
        indexed = {a["id"]: a["path"] for a in listing["adapters"]}
        uploads_now = {i: p for i, p in indexed.items() if "/uploads/" in p}
        lost = sorted(set(present) - set(indexed))
        stray = sorted(set(uploads_now) - set(present))
        for i in lost:
            errors.append(f"acknowledged add #{i} ({present[i]}) is missing at the end")
        for i in stray:
            errors.append(f"#{i} ({uploads_now[i]}) was removed (acknowledged) but is still indexed")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.seek(0)
        server_log = log.read()
        log.close()
    if "Traceback" in server_log:
        errors.append("server log has a traceback")
    # the server's own one-line reports of internal errors (500s), so a failed run says why
    errors.extend(f"server: {ln.strip()}" for ln in server_log.splitlines() if "serve: error:" in ln)
    all_lat = [x for per in lat for x in per]
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()}-core {platform.machine()} (shared), no GPU",
        "indexed": n_indexed, "rerank": rerank, "baseline": baseline, "clients": clients, "queries_per_client": queries,
        "queries_done": len(all_lat), "complete": len(all_lat) == clients * queries,
        "wall_s": wall, "throughput_qps": len(all_lat) / wall if wall else float("nan"),
        "p50_ms": _pct(all_lat, 50), "p99_ms": _pct(all_lat, 99), "max_ms": 1000 * max(all_lat, default=0),
        "direct_p50_ms": _pct(direct, 50), "http1_p50_ms": _pct(http1, 50), "http1_p99_ms": _pct(http1, 99),
        "writes": {k: v for k, v in writes.items() if k != "write_s"},
        "write_p50_ms": _pct(writes["write_s"], 50), "write_p99_ms": _pct(writes["write_s"], 99),
        "present_at_end": len(present), "lost_adds": len(lost), "stray": len(stray),
        "errors": len(errors), "error_samples": errors[:10],
    }


def markdown(r: dict) -> str:
    ratio = r["http1_p50_ms"] / r["direct_p50_ms"]
    rr = "default, max(5k, 50) candidates" if r["rerank"] is None else ("off" if r["rerank"] == 0 else r["rerank"])
    flag = ("" if r["rerank"] is None else f" --rerank {r['rerank']}") + \
        ("" if r.get("baseline", 60) == 60 else f" --baseline {r['baseline']}")
    return f"""## {r['clients']} clients × {r['queries_per_client']} queries, exact re-ranking: {rr}

Machine: {r['machine']}; {r['date']}. Index: the {r['indexed']} demo adapters (all-MiniLM-L6-v2 LoRAs,
12 modules), sketch encoder, exact re-ranking {rr}. One `lorasearch serve` process
(uvicorn) on 127.0.0.1; the clients are threads of the benchmark process (`httpx`), so client and
server share the same 2 cores. Command: `python eval/bench/load_serve.py --clients
{r['clients']} --queries {r['queries_per_client']}{flag}`.

| measurement | p50 ms | p99 ms | throughput |
|---|---:|---:|---:|
| direct: `Lorasearch.query` in-process, 1 at a time (yardstick) | {r['direct_p50_ms']:.1f} | – | – |
| HTTP, 1 client, 1 at a time (`POST /query` upload) | {r['http1_p50_ms']:.1f} | {r['http1_p99_ms']:.1f} | – |
| HTTP, {r['clients']} clients × {r['queries_per_client']} queries, writer running | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['throughput_qps']:.1f} queries/s |
| writer: `POST /adapters` / `DELETE` during the load | {r['write_p50_ms']:.1f} | {r['write_p99_ms']:.1f} | – |

- HTTP overhead, one client: {ratio:.2f}× the in-process query (p50 vs p50, same run, same files).
- Queries completed: {r['queries_done']} of {r['clients'] * r['queries_per_client']} in {r['wall_s']:.1f} s
  ({'all' if r['complete'] else 'stopped by --max-seconds'}); max latency {r['max_ms']:.0f} ms.
- Writer: {r['writes']['adds']} acknowledged adds, {r['writes']['removes']} acknowledged removes;
  {r['writes']['read_after_write_ok']} of {r['writes']['adds']} adds were the exact top hit of a query
  right after their acknowledgement.
- At the end: {r['present_at_end']} acknowledged adds should be indexed; missing: **{r['lost_adds']}**,
  removed-but-still-indexed: **{r['stray']}**.
- **Errors: {r['errors']}** (any non-200 read, failed write, missing add, or a traceback in the server log).
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--queries", type=int, default=500, help="queries per client")
    ap.add_argument("--baseline", type=int, default=60, help="sequential queries for the direct/http-1 rows")
    ap.add_argument("--max-seconds", type=float, default=1200.0)
    ap.add_argument("--rerank", type=int, default=None,
                    help="re-ranking depth sent with each query (default: the server's, max(5k, 50); 0 = off)")
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown table here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lorasearch-load-") as tmp:
        res = run(args.clients, args.queries, args.baseline, args.max_seconds, Path(tmp), args.rerank)
    print(json.dumps(res, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(res))
    return 0 if res["errors"] == 0 and res["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
