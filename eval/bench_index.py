"""Query latency of the vector store at 10k / 100k adapters, beside the memory-bandwidth bound.

Exact (flat) inner-product search must read every stored vector once per query (batch), so
its floor on this machine is ``N · dim · 4 bytes / streaming read bandwidth``. The benchmark
measures that bandwidth with numpy in the same run and reports each latency as a ratio to
the bound (1.0 = as fast as the memory allows). The index is built through the public
``LoraIndex`` API (catalog + snapshot), so add and snapshot times are the product's.

    python -m lorasearch.eval.bench_index --sizes 10000 100000

``--factory IVF1024,Flat`` (or ``HNSW32``) builds the index with that faiss factory string
instead, and every row then also reports build time and recall@k against exact search
(computed with numpy on the same vectors), optionally for several ``--nprobe`` /
``--ef-search`` values on the one built index. ``--data clustered`` draws vectors around
n/100 centres (queries are new draws from the same clusters), which is what ANN indexes are
built for; ``random`` (default) is i.i.d. Gaussian, their worst case.

    python -m lorasearch.eval.bench_index --sizes 100000 --data clustered --factory IVF1024,Flat --nprobe 8 32 128

``--add`` measures what one ``add`` of one file costs the store in indexes of each size (synthetic
embeddings): a fresh process opens the index, looks the path up, upserts one record and closes,
R times; time and bytes written (``wchar`` of /proc/self/io: every write/pwrite, SQLite's WAL
and FAISS files alike). ``--baseline-python /work/main/.venv/bin/python`` runs the same child
with another checkout's lorasearch beside it (the "before"), paired size by size. Compaction
(rewriting a family's base once its delta passes 10 %) is measured separately (``compact()``).

    python -m lorasearch.eval.bench_index --add --sizes 1000 10000 100000 --baseline-python /work/main/.venv/bin/python
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import tempfile
import time

import faiss
import numpy as np

from lorasearch.indexer import LoraIndex

FAMILY = "bench"


def _blas_threads(n: int | None):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:          # optional: without it numpy's BLAS keeps its own thread count
        return contextlib.nullcontext()
    return threadpool_limits(n) if n else contextlib.nullcontext()


def stream_bandwidth(nbytes: int = 256 << 20, repeats: int = 7) -> float:
    """Bytes/s numpy reads from memory: best over repeats of the best of a few read-once kernels."""
    a = np.ones(nbytes // 4, np.float32)
    m = a.reshape(-1, 1024)
    v = np.ones(1024, np.float32)
    best = float("inf")
    for kernel in (a.sum, lambda: np.dot(a, a), lambda: m @ v):
        kernel()
        for _ in range(repeats):
            t = time.perf_counter()
            kernel()
            best = min(best, time.perf_counter() - t)
    return nbytes / best


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def _records(vectors: np.ndarray, start: int):
    return [{"path": f"/bench/adapter_{start + i:07d}.safetensors", "sha256": f"{start + i:064x}",
             "family": FAMILY, "embedding": v, "size": 0, "format": "bench"} for i, v in enumerate(vectors)]


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class _Data:
    """Vectors for the benchmark: i.i.d. Gaussian (``random``) or Gaussian clusters (``clustered``)."""

    def __init__(self, kind: str, n: int, dim: int, rng: np.random.Generator):
        if kind not in ("random", "clustered"):
            raise ValueError(f"data {kind!r}: expected random or clustered")
        self.dim, self.rng = dim, rng
        self.centers = rng.normal(size=(max(10, n // 100), dim)) if kind == "clustered" else None

    def draw(self, m: int) -> np.ndarray:
        if self.centers is None:
            return _unit(self.rng.normal(size=(m, self.dim)))
        pick = self.centers[self.rng.integers(0, len(self.centers), m)]
        return _unit(pick + 0.5 * self.rng.normal(size=(m, self.dim)))


def _exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Ground-truth ids (positions + 1 = catalog ids) of the exact top-k by cosine."""
    scores = queries @ base.T
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return top + 1


def _recall(found: list[list[tuple[int, float]]], truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len({i for i, _ in row} & set(t.tolist())) / k for row, t in zip(found, truth)]))


def bench_one(n: int, dim: int, n_queries: int, k: int, device: str, workdir: str, bandwidth: float,
              batch: int = 10_000, seed: int = 0, factory: str | None = None, data: str = "random",
              sweep: tuple = ()) -> dict:
    """One size. ``sweep``: ``(knob, value)`` pairs (knob ``nprobe`` or ``ef_search``) to
    measure on the built index besides its defaults; recall needs ``factory`` or ``sweep``."""
    rng = np.random.default_rng(seed)
    source = _Data(data, n, dim, rng)
    path = os.path.join(workdir, f"ix-{n}")
    ix = LoraIndex.open(path, create=True, device=device, factory=factory)
    ix.check_encoder("bench-random", "1", dim)
    t_add = t_snap = 0.0
    kept = [] if (factory or sweep) else None
    with ix.writer():
        for start in range(0, n, batch):
            vectors = source.draw(min(batch, n - start))
            if kept is not None:
                kept.append(vectors)
            recs = _records(vectors, start)
            t = time.perf_counter()
            ix.upsert(recs)
            t_add += time.perf_counter() - t
        t = time.perf_counter()
        ix.flush()
        t_snap = time.perf_counter() - t
    assert ix.check()["ok"]
    stats = ix.stats()
    ix.close()

    queries = source.draw(n_queries)
    truth = _exact_topk(np.concatenate(kept), queries, min(k, n)) if kept is not None else None
    t = time.perf_counter()
    ix = LoraIndex.open(path, readonly=True, device=device)
    ix.search(queries[0], FAMILY, k)                       # cold: open + load/validate snapshot
    t_cold = time.perf_counter() - t
    index, _ = ix._family_index(FAMILY)                    # raw FAISS, to show the API's overhead

    single, raw = [], []
    for q in queries:
        t = time.perf_counter()
        res = ix.search(q, FAMILY, k)
        single.append(time.perf_counter() - t)
        assert len(res[0]) == min(k, n)
        t = time.perf_counter()
        index.search(q[None, :], k)
        raw.append(time.perf_counter() - t)
    # the store's part of a warm API query: search for the re-rank depth (50) + the hits' records,
    # one catalog query per hit (before) vs one batched get_many (after), paired per query
    depth = min(50, n)
    per_hit, batched_get = [], []
    for q in queries:
        t = time.perf_counter()
        hits = ix.search(q, FAMILY, depth)[0]
        recs = [ix.get(i) for i, _ in hits]
        per_hit.append(time.perf_counter() - t)
        t = time.perf_counter()
        hits = ix.search(q, FAMILY, depth)[0]
        many = ix.get_many([i for i, _ in hits], brief=True)
        batched_get.append(time.perf_counter() - t)
        assert len(many) == len(recs) == depth
    batched = []
    for _ in range(5):
        t = time.perf_counter()
        found = ix.search(queries, FAMILY, k)
        batched.append(time.perf_counter() - t)
    points = []
    if truth is not None:
        points.append({"knob": "default", "single_median_ms": float(np.median(single)) * 1e3,
                       "batch_per_query_ms": float(np.median(batched)) / n_queries * 1e3,
                       "recall": _recall(found, truth)})
    for knob, value in sweep:
        times = []
        for q in queries:
            t = time.perf_counter()
            ix.search(q, FAMILY, k, **{knob: value})
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        found = ix.search(queries, FAMILY, k, **{knob: value})
        batch_t = time.perf_counter() - t
        points.append({"knob": f"{knob}={value}", "single_median_ms": float(np.median(times)) * 1e3,
                       "batch_per_query_ms": batch_t / n_queries * 1e3, "recall": _recall(found, truth)})
    ix.close()

    bound = n * dim * 4 / bandwidth
    med, p95 = float(np.median(single)), float(np.percentile(single, 95))
    batch_med = float(np.median(batched))
    return {
        "n": n, "dim": dim, "k": k, "device": stats["device"], "n_queries": n_queries,
        "factory": stats["faiss_factory"], "index": stats["snapshots"][FAMILY]["index"], "data": data,
        "build_s": t_add + t_snap, "recall_at_k": points[0]["recall"] if points else None, "sweep": points,
        "add_s": t_add, "add_per_s": n / t_add, "snapshot_s": t_snap,
        "cold_open_query_ms": t_cold * 1e3, "disk_MB": stats["disk_bytes"] / 1e6,
        "single_median_ms": med * 1e3, "single_p95_ms": p95 * 1e3,
        "faiss_single_median_ms": float(np.median(raw)) * 1e3,
        "batch_ms": batch_med * 1e3, "batch_per_query_ms": batch_med / n_queries * 1e3,
        "batch_gflops": 2 * n_queries * n * dim / batch_med / 1e9,
        "bound_ms": bound * 1e3, "single_ratio": med / bound, "batch_ratio": batch_med / bound,
        "bandwidth_GBps": bandwidth / 1e9,
        "hits_depth": depth, "search_get_each_ms": float(np.median(per_hit)) * 1e3,
        "search_get_many_ms": float(np.median(batched_get)) * 1e3,
        "get_each_ratio": float(np.median(per_hit)) / bound, "get_many_ratio": float(np.median(batched_get)) / bound,
    }


def run(sizes=(10_000, 100_000), dim: int = 512, n_queries: int = 200, k: int = 10, device: str = "auto",
        threads: int | None = 1, workdir: str | None = None, bandwidth_bytes: int = 256 << 20,
        factory: str | None = None, data: str = "random", nprobes=(), ef_searches=()) -> list[dict]:
    """One row per size. ``threads`` caps FAISS/BLAS threads (None = their defaults);
    ``bandwidth_bytes`` is the buffer numpy streams (keep it well above the last-level cache).
    ``factory``/``data``/``nprobes``/``ef_searches``: see the module docstring."""
    sweep = tuple(("nprobe", int(v)) for v in nprobes) + tuple(("ef_search", int(v)) for v in ef_searches)
    if threads:
        faiss.omp_set_num_threads(threads)
    tmp = tempfile.mkdtemp(prefix="lorasearch-bench-", dir=workdir)
    try:
        with _blas_threads(threads):
            bandwidth = stream_bandwidth(bandwidth_bytes)
            rows = [bench_one(n, dim, n_queries, k, device, tmp, bandwidth, factory=factory, data=data, sweep=sweep)
                    for n in sizes]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for row in rows:
        row["threads"] = threads or "default"
    return rows


def format_markdown(rows: list[dict]) -> str:
    head = (f"Machine: {_machine()}; FAISS {faiss.__version__}; threads {rows[0]['threads'] if rows else '-'}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; numpy streaming read bandwidth "
            f"{rows[0]['bandwidth_GBps']:.1f} GB/s\n\n" if rows else "")
    cols = ["N", "dim", "device", "add (rec/s)", "snapshot s", "cold open+query ms", "1-query median ms",
            "1-query p95 ms", "raw FAISS 1-query ms", f"batch of {rows[0]['n_queries'] if rows else '-'} ms",
            "per query in batch ms", "batch GFLOP/s", "bandwidth bound ms", "1-query / bound", "batch / bound",
            "search 50 + get each ms (before)", "search 50 + get_many ms (after)", "before / bound", "after / bound"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join([
            f"{r['n']:,}", str(r["dim"]), r["device"], f"{r['add_per_s']:,.0f}", f"{r['snapshot_s']:.2f}",
            f"{r['cold_open_query_ms']:.0f}", f"{r['single_median_ms']:.2f}", f"{r['single_p95_ms']:.2f}",
            f"{r['faiss_single_median_ms']:.2f}", f"{r['batch_ms']:.1f}", f"{r['batch_per_query_ms']:.3f}",
            f"{r['batch_gflops']:.1f}", f"{r['bound_ms']:.2f}", f"{r['single_ratio']:.2f}", f"{r['batch_ratio']:.2f}",
            f"{r['search_get_each_ms']:.2f}", f"{r['search_get_many_ms']:.2f}", f"{r['get_each_ratio']:.2f}",
            f"{r['get_many_ratio']:.2f}"]) + " |")
    return head + "\n".join(lines)


def format_ann_markdown(rows: list[dict]) -> str:
    """Build time, latency and recall@k vs exact, one line per (size, search setting)."""
    cols = ["N", "dim", "data", "factory", "serving index", "build s", "search setting", "1-query median ms",
            "per query in batch ms", f"recall@{rows[0]['k'] if rows else 'k'} vs exact"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        for p in r["sweep"]:
            lines.append("| " + " | ".join([
                f"{r['n']:,}", str(r["dim"]), r["data"], r["factory"], r["index"], f"{r['build_s']:.1f}", p["knob"],
                f"{p['single_median_ms']:.2f}", f"{p['batch_per_query_ms']:.3f}", f"{p['recall']:.3f}"]) + " |")
    return "\n".join(lines)


ADD_CHILD = r"""
import json, os, sys, time
import numpy as np
from lorasearch.indexer import LoraIndex
n, dim, repeats, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

def wchar():
    with open("/proc/self/io") as f:
        return int(next(l for l in f if l.startswith("wchar")).split()[1])

def rec(i, v):
    return {"path": f"/bench/adapter_{i:07d}.safetensors", "sha256": f"{i:064x}", "family": "bench",
            "embedding": v, "size": 1, "mtime_ns": i, "format": "bench"}

rng = np.random.default_rng(0)
ix = LoraIndex.open(path, create=True, device="cpu")
ix.check_encoder("bench-random", "1", dim)
with ix.writer():
    for start in range(0, n, 10000):
        m = min(10000, n - start)
        ix.upsert([rec(start + i, v) for i, v in enumerate(rng.normal(size=(m, dim)).astype(np.float32))])
new = hasattr(ix, "compact")
if new:
    ix.compact()
ix.close()
rows = []
for r in range(repeats):
    v = rng.normal(size=dim).astype(np.float32)
    w0, t0 = wchar(), time.perf_counter()
    ix = LoraIndex.open(path, device="cpu")
    key = f"/bench/adapter_{n + r:07d}.safetensors"
    known = ix.fingerprints_for([key]) if new else ix.fingerprints()   # what api._sync does
    assert key not in known
    ix.upsert([rec(n + r, v)])
    compacted = bool(getattr(ix, "compactions", {}))
    ix.close()
    rows.append({"s": time.perf_counter() - t0, "bytes": wchar() - w0, "compacted": compacted})
out = {"n": n, "adds": rows, "new": new}
if new:
    ix = LoraIndex.open(path, device="cpu")
    w0, t0 = wchar(), time.perf_counter()
    c = ix.compact()["bench"]
    out["compaction"] = {"s": time.perf_counter() - t0, "bytes": wchar() - w0, "vectors": c["vectors"]}
    ix.close()
print(json.dumps(out))
"""


def bench_add(sizes=(1000, 10_000, 100_000), dim: int = 512, repeats: int = 15, python: str | None = None,
              workdir: str | None = None) -> list[dict]:
    """One row per size: median time and bytes written by one ``add`` of one file (store part, fresh
    process per size, ``python`` = the interpreter whose lorasearch is measured)."""
    import subprocess
    import sys

    rows = []
    for n in sizes:
        tmp = tempfile.mkdtemp(prefix="lorasearch-bench-add-", dir=workdir)
        try:
            env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
            out = subprocess.run([python or sys.executable, "-c", ADD_CHILD, str(n), str(dim), str(repeats),
                                  os.path.join(tmp, "ix")], capture_output=True, text=True, check=True, env=env,
                                 cwd=tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        plain = [a for a in res["adds"] if not a["compacted"]] or res["adds"]
        rows.append({"n": n, "dim": dim, "repeats": repeats, "python": python or sys.executable,
                     "add_median_ms": float(np.median([a["s"] for a in plain])) * 1e3,
                     "add_bytes_median": int(np.median([a["bytes"] for a in plain])),
                     "adds_that_compacted": sum(a["compacted"] for a in res["adds"]),
                     "compaction_s": res.get("compaction", {}).get("s"),
                     "compaction_bytes": res.get("compaction", {}).get("bytes")})
    return rows


def format_add_markdown(after: list[dict], before: list[dict] | None = None) -> str:
    cols = ["N", "add ms (after)", "bytes written (after)", "compaction s", "compaction bytes"]
    if before:
        cols[1:1] = ["add ms (before)", "bytes written (before)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    first = after[0]["add_median_ms"] if after else 1.0
    for i, r in enumerate(after):
        cells = [f"{r['n']:,}", f"{r['add_median_ms']:.1f} ({r['add_median_ms'] / first:.2f}x of {after[0]['n']:,})",
                 f"{r['add_bytes_median']:,}",
                 "-" if r["compaction_s"] is None else f"{r['compaction_s']:.2f}",
                 "-" if r["compaction_bytes"] is None else f"{r['compaction_bytes']:,}"]
        if before:
            b = before[i]
            cells[1:1] = [f"{b['add_median_ms']:.1f}", f"{b['add_bytes_median']:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="FAISS/BLAS threads (0 = library default)")
    p.add_argument("--factory", default=None, help="faiss index-factory string, e.g. IVF1024,Flat or HNSW32")
    p.add_argument("--data", choices=["random", "clustered"], default="random")
    p.add_argument("--nprobe", type=int, nargs="*", default=[], help="IVF nprobe values to sweep")
    p.add_argument("--ef-search", type=int, nargs="*", default=[], help="HNSW efSearch values to sweep")
    p.add_argument("--json", action="store_true")
    p.add_argument("--add", action="store_true", help="measure one add of one file per size instead of queries")
    p.add_argument("--repeats", type=int, default=15, help="--add: adds per size")
    p.add_argument("--baseline-python", default=None, help="--add: also run the child with this interpreter")
    args = p.parse_args(argv)
    if args.add:
        after = bench_add(tuple(args.sizes), args.dim, args.repeats)
        before = bench_add(tuple(args.sizes), args.dim, args.repeats, args.baseline_python) \
            if args.baseline_python else None
        if args.json:
            print(json.dumps({"version": 2, "after": after, "before": before}, indent=2))
        else:
            print(format_add_markdown(after, before))
        return
    rows = run(tuple(args.sizes), args.dim, args.queries, args.k, args.device, args.threads or None,
               factory=args.factory, data=args.data, nprobes=args.nprobe, ef_searches=args.ef_search)
    if args.json:
        print(json.dumps({"version": 2, "rows": rows}, indent=2))
    else:
        print(format_markdown(rows))
        if any(r["sweep"] for r in rows):
            print("\n" + format_ann_markdown(rows))


if __name__ == "__main__":
    main()
