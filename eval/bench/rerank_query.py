"""A query against an index of real-size SD1.5 r32 adapters, before/after stored re-rank records (issue 8).

    python -m lorasearch.eval.bench.rerank_query --n 24 --rank 32 --workdir /tmp/rq

Generates N SD1.5 kohya fp16 LoRAs (264 modules, ~38 MB each at r32; ``bench_ingest.generate``),
then, in ONE run:

* indexing: every file is added to two indexes in turn, file by file — ``old`` without re-rank
  records (main before this change), ``new`` building and storing them — so drift on a shared
  machine hits both alike; median seconds per adapter and the ratio, paired per file;
* querying: the same query (a gallery file, so N−1 candidates are re-scored) against both indexes,
  alternating, ``--reps`` times; median seconds, and the bytes a query reads for re-scoring
  (candidate files re-read at their size + stored records at their blob size; the query file
  itself, read by both, is reported apart), candidates re-scored, and files opened.

The page cache is warm for both (the files were just written and read): ``old`` time is then a
lower bound of a query over files on a cold disk. The cold CLI pair is timed with farm-bench
(the commands are printed at the end).
"""
from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path


class _Counting:
    """Counts what a query's re-scoring reads: candidate files opened (at their size) and stored
    records fetched (at their blob size), by wrapping the two functions it reads them through."""

    def __init__(self, index):
        import lorasearch.query as query_mod

        self.files = self.file_bytes = self.records = self.record_bytes = 0
        self._mod, self._load, self._index = query_mod, query_mod.load_indexed, index
        self._blobs = getattr(index, "rerank_blobs", None)

        def load(rec):
            out = self._load(rec)
            if out is not None:
                self.files += 1
                self.file_bytes += int(rec["size"])
            return out

        def blobs(ids):
            got = self._blobs(ids)
            self.records += len(got)
            self.record_bytes += sum(len(b) for b in got.values())
            return got
        query_mod.load_indexed = load
        if self._blobs is not None:
            index.rerank_blobs = blobs

    def restore(self):
        self._mod.load_indexed = self._load
        if self._blobs is not None:
            del self._index.rerank_blobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--workdir", default="/tmp/lorasearch-rerank-query")
    ap.add_argument("--query-only", action="store_true", help="reuse the two indexes of an earlier run")
    a = ap.parse_args()

    import lorasearch.ingest as ingest
    from lorasearch.api import Lorasearch
    from lorasearch.eval.bench_ingest import generate

    work = Path(a.workdir)
    paths = generate(work / "adapters" / f"r{a.rank}", a.n, a.rank)
    idx = {"old": work / f"idx_old_r{a.rank}_{a.n}", "new": work / f"idx_new_r{a.rank}_{a.n}"}
    real_blob = ingest.rerank_blob
    t_index: dict[str, list[float]] = {"old": [], "new": []}
    if not a.query_only:
        for p in idx.values():
            shutil.rmtree(p, ignore_errors=True)
    handles = {k: Lorasearch(v, create=True) for k, v in idx.items()}
    try:
        for i, p in enumerate([] if a.query_only else paths):
            for kind in (("old", "new") if i % 2 == 0 else ("new", "old")):
                ingest.rerank_blob = real_blob if kind == "new" else (lambda adapter: None)
                t = time.perf_counter()
                rep = handles[kind].add([p])
                t_index[kind].append(time.perf_counter() - t)
                assert len(rep.added) == 1, rep.errors
    finally:
        ingest.rerank_blob = real_blob
        for h in handles.values():
            h.close()
    q = paths[0]
    t_query: dict[str, list[float]] = {"old": [], "new": []}
    read = {}
    for _ in range(a.reps):
        for kind in ("old", "new"):
            with Lorasearch(idx[kind]) as ls:
                ls.query(q, k=10)              # warm the encoder and the store once per open
                count = _Counting(ls.index)
                try:
                    t = time.perf_counter()
                    res = ls.query(q, k=10)
                    t_query[kind].append(time.perf_counter() - t)
                finally:
                    count.restore()
                read[kind] = (count.file_bytes + count.record_bytes, count.files + count.records, count.files)
                kinds = [h.match for h in res.hits]
    med = {k: statistics.median(v) for k, v in t_query.items()}
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
          f"SD1.5 kohya r{a.rank} fp16, {a.n} adapters ({statistics.mean(p.stat().st_size for p in paths) / 1e6:.1f} MB each)")
    if t_index["old"]:
        io, inew = statistics.median(t_index["old"]), statistics.median(t_index["new"])
        ratios = [n / o for o, n in zip(t_index["old"], t_index["new"])]
        print(f"index s/adapter: old {io:.3f}  new {inew:.3f}  (ratio of medians {inew / io:.2f}x; "
              f"median of per-file paired ratios {statistics.median(ratios):.2f}x)")
    for kind in ("old", "new"):
        b, n, f = read[kind]
        print(f"query {kind}: {med[kind]:.3f} s (median of {a.reps}), re-scoring read {b / 1e6:.1f} MB "
              f"for {n} candidates re-scored, {f} files opened")
    print(f"query old/new time {med['old'] / med['new']:.1f}x, bytes {read['old'][0] / max(read['new'][0], 1):.1f}x; "
          f"query file itself {q.stat().st_size / 1e6:.1f} MB (both); last matches {kinds}")
    print("cold CLI pair: farm-bench -n 3 --timeout 600 -- lorasearch --index", idx["new"], "query", q,
          "--json --vs 'lorasearch --index", idx["old"], "query", q, "--json'")


if __name__ == "__main__":
    main()
