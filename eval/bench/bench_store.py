"""Store and ingest benchmarks for issue 10 (results: eval/results/scale.md).

    python -m lorasearch.eval.bench.bench_store latency --n 10000 100000
    python -m lorasearch.eval.bench.bench_store recall --n 10000
    python -m lorasearch.eval.bench.bench_store gallery DIR --files 96     # synthetic adapters to ingest
    python -m lorasearch.eval.bench.bench_store ingest DIR --workers 1 2    # plain vs Ray, in process

latency: the same synthetic vectors (a Gaussian mixture: 256 clusters, so neighbours exist as
they do for real adapters; dim 1024 = the default sketch) in a faiss store and a milvus-lite
store, side by side in one process; upsert throughput and single-query search latency (k=10,
median and p95 over the same queries) for each, and their ratio.
recall: milvus HNSW / IVF_FLAT against exact search (FAISS flat over the same vectors): recall@10
and latency per search-breadth setting.
ingest: see ``ingest()``; whole-process timings of ``lorasearch index`` vs ``index --ray`` (Ray's
start-up included) are taken from outside with a process timer (see eval/results/scale.md).
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from lorasearch.indexer import open_store

DIM = 1024


def vectors(n: int, dim: int = DIM, seed: int = 0, clusters: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fill(store, x: np.ndarray, batch: int = 1000) -> float:
    """Upsert every row (one record each, family 'bench'); returns seconds."""
    store.check_encoder("bench", "1", x.shape[1])
    t = time.perf_counter()
    with store.writer():
        for i in range(0, len(x), batch):
            store.upsert([{"path": f"/bench/{j:08d}.safetensors", "sha256": f"{j:064x}", "family": "bench",
                           "embedding": x[j], "size": 1, "mtime_ns": 1, "format": "peft", "ranks": [8],
                           "n_modules": 1} for j in range(i, min(i + batch, len(x)))])
    return time.perf_counter() - t


def timed_search(store, q: np.ndarray, k: int = 10, **kw):
    lat, ids = [], []
    for row in q:
        t = time.perf_counter()
        hits = store.search(row, "bench", k=k, **kw)[0]
        lat.append(time.perf_counter() - t)
        ids.append([i for i, _ in hits])
    lat = np.array(lat) * 1e3
    return float(np.median(lat)), float(np.percentile(lat, 95)), ids


def latency(ns: list[int], n_queries: int, root: Path) -> list[dict]:
    out = []
    for n in ns:
        x = vectors(n)
        q = vectors(n_queries, seed=1)
        row = {"n": n, "dim": DIM}
        found = {}
        for name, kw in (("faiss", {"store": "faiss"}), ("milvus", {"store": "milvus"})):
            with open_store(root / f"{name}{n}", create=True, **kw) as s:
                row[f"{name}_upsert_per_s"] = round(n / fill(s, x), 1)
                timed_search(s, q[:5])                                  # warm caches / load
                med, p95, ids = timed_search(s, q)
                row[f"{name}_query_ms_median"], row[f"{name}_query_ms_p95"] = round(med, 2), round(p95, 2)
                found[name] = ids
        row["milvus_over_faiss_query"] = round(row["milvus_query_ms_median"] / row["faiss_query_ms_median"], 1)
        row["top10_agree"] = float(np.mean([a == b for a, b in zip(found["faiss"], found["milvus"])]))
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def recall(n: int, n_queries: int, root: Path) -> list[dict]:
    x, q = vectors(n), vectors(n_queries, seed=1)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]          # exact top-10 row numbers
    out = []
    for kind, settings in (("HNSW", [("ef_search", v) for v in (16, 32, 64, 128)]),
                           ("IVF_FLAT", [("nprobe", v) for v in (1, 4, 16, 32)])):
        with open_store(root / f"m{kind}{n}", store="milvus", milvus_index=kind, create=True) as s:
            build = fill(s, x)
            id_of = {r[0]: int(p.split("/")[-1].split(".")[0]) for p, r in s.fingerprints().items()}
            for key, value in settings:          # a first pass while milvus-lite may still build the index
                timed_search(s, q[:20], **{key: value})
            for key, value in settings:
                med, p95, ids = timed_search(s, q, **{key: value})
                rows = [[id_of[i] for i in hit] for hit in ids]
                r10 = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, truth)]))
                row = {"n": n, "index": kind, key: value, "recall@10": round(r10, 4),
                       "query_ms_median": round(med, 2), "query_ms_p95": round(p95, 2),
                       "upsert_per_s": round(n / build, 1)}
                print(json.dumps(row), flush=True)
                out.append(row)
    return out


def gallery(root: Path, files: int, family: str = "minilm") -> None:
    """``files`` random adapters to ingest: minilm (rank 8, q/k/v/dense of all 6 layers, ~0.6 MB)
    or sd15 (rank 8 on every attention projection, kohya file)."""
    from lorasearch.adapters.writers import random_adapter, write_adapter

    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        if family == "sd15":
            ad = random_adapter("sd15", rank=8, seed=i, targets=r"attn[12]\.to_(q|k|v|out\.0)$")
            write_adapter(ad, root / f"s{i:05d}.safetensors", "kohya", dtype="F16")
            continue
        ad = random_adapter("minilm", rank=8, seed=i, targets=r"attention\.(self\.(query|key|value)|output\.dense)$")
        write_adapter(ad, root / f"a{i:05d}.safetensors", "peft-file", dtype="F32")


def ingest(gallery_dir: Path, workers: list[int], root: Path) -> list[dict]:
    """In-process ingest throughput of one gallery: plain ``index_dir`` vs ``index_dir_ray`` with
    w local workers, each after a warm-up run (Ray started and its workers' imports done), so the
    figures are steady-state throughput; Ray's start-up is reported on its own."""
    import ray

    from lorasearch.api import Lorasearch
    from lorasearch.indexer.ray_ingest import index_dir_ray, start_ray

    files = sorted(gallery_dir.glob("*.safetensors"))
    mb = sum(p.stat().st_size for p in files) / 1e6
    warm = root / "warm"
    warm.mkdir()
    for p in files[:8]:
        (warm / p.name).symlink_to(p)

    def once(tag, fn):
        with Lorasearch(root / f"w{tag}", create=True) as ls:
            fn(ls, warm)
        with Lorasearch(root / tag, create=True) as ls:
            t = time.perf_counter()
            rep = fn(ls, gallery_dir)
            return time.perf_counter() - t, len(rep.added)

    out = []
    sec, n = once("plain", lambda ls, d: ls.index_dir(d, progress=False))
    base = {"mode": "single process", "files": n, "MB": round(mb, 1), "s": round(sec, 2),
            "files_per_s": round(n / sec, 1), "MB_per_s": round(mb / sec, 1)}
    print(json.dumps(base), flush=True)
    out.append(base)
    for w in workers:
        t = time.perf_counter()
        start_ray(num_cpus=w)
        started = time.perf_counter() - t
        sec, n = once(f"ray{w}", lambda ls, d: index_dir_ray(ls, d, progress=False))
        ray.shutdown()
        row = {"mode": f"ray, {w} worker(s)", "files": n, "MB": round(mb, 1), "s": round(sec, 2),
               "files_per_s": round(n / sec, 1), "MB_per_s": round(mb / sec, 1),
               "vs_single": round(base["s"] / sec, 2), "ray_start_s": round(started, 1)}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("latency")
    a.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000])
    a.add_argument("--queries", type=int, default=200)
    b = sub.add_parser("recall")
    b.add_argument("--n", type=int, default=10_000)
    b.add_argument("--queries", type=int, default=200)
    d = sub.add_parser("ingest")
    d.add_argument("dir", type=Path)
    d.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    c = sub.add_parser("gallery")
    c.add_argument("dir", type=Path)
    c.add_argument("--files", type=int, default=96)
    c.add_argument("--family", choices=["minilm", "sd15"], default="minilm")
    args = ap.parse_args()
    print(json.dumps({"machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}), flush=True)
    if args.cmd == "gallery":
        gallery(args.dir, args.files, args.family)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.cmd == "latency":
            latency(args.n, args.queries, Path(tmp))
        elif args.cmd == "ingest":
            ingest(args.dir, args.workers, Path(tmp))
        else:
            recall(args.n, args.queries, Path(tmp))


if __name__ == "__main__":
    main()
