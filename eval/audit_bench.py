"""Benchmark: `lorasearch dedupe`'s candidates-then-verify (N·k) against a brute-force pairwise check (N²).

Synthetic collection held in memory (no files: file reads would cost both methods the same per
adapter loaded, and ours loads only the adapters in candidate pairs): N adapters of 2 modules
(48×48, rank 4); 5 % of them are duplicates of another (a GL-reparameterized copy, an fp16
rounding, or a byte copy), in clusters of 2–4. Embeddings are a sketch of ΔW (Ωᵀ·ΔW·Ψ per module,
from the factors), searched with a flat FAISS index, as the default `sketch` encoder does.

- ours   ``audit.candidate_pairs`` (k=10 neighbours, bound 0.9) → ``audit.verify_pairs`` (exact
         ΔW cosine + norm) → ``audit.clusters_from_edges``: the code `lorasearch dedupe` runs.
- brute  every pair's exact ΔW inner product from the factors (``gram``-style stacked GEMMs in
         blocks of rows), the same verification rule, the same union-find.

Both must find the same clusters (checked). Usage::

    nice python -m lorasearch.eval.audit_bench --sizes 1000,2000,4000,10000,100000 --brute-max 4000
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from lorasearch import audit
from lorasearch.types import LoraAdapter, LoraModule

MODULES, DIM, RANK, SKETCH = 2, 48, 4, 8


class Synthetic:
    def __init__(self, n: int, dup_frac: float = 0.05, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.n = n
        self.A = (rng.standard_normal((n, MODULES, RANK, DIM)) / np.sqrt(DIM)).astype(np.float32)
        self.B = (0.02 * rng.standard_normal((n, MODULES, DIM, RANK))).astype(np.float32)
        self.truth: list[list[int]] = []
        n_dup = int(dup_frac * n)
        i = 0
        pos = n - 1                                      # duplicates overwrite the tail, originals at the head
        while n_dup > 0 and pos > i:
            size = min(int(rng.integers(1, 4)), n_dup)
            members = [i]
            for _ in range(size):
                kind = rng.integers(3)
                A, B = self.A[i].astype(np.float64), self.B[i].astype(np.float64)
                if kind == 0:                            # B→BG, A→G⁻¹A
                    g = np.eye(RANK) + 0.3 * rng.standard_normal((RANK, RANK))
                    B, A = B @ g, np.linalg.solve(g, A)
                elif kind == 1:                          # fp16 rounding
                    A, B = A.astype(np.float16), B.astype(np.float16)
                self.A[pos], self.B[pos] = A.astype(np.float32), B.astype(np.float32)
                members.append(pos)
                pos -= 1
                n_dup -= 1
            self.truth.append(sorted(members))
            i += 1
        self.ids = np.arange(n, dtype=np.int64)
        self.shas = {int(j): f"sha{j}" for j in range(n)}

    def adapter(self, i: int) -> LoraAdapter:
        mods = [LoraModule(f"m{m}", self.A[i, m], self.B[i, m], 1.0, "F32", (DIM, DIM)) for m in range(MODULES)]
        return LoraAdapter(f"#{i}", "memory", self.shas[i], "synthetic", mods)

    def norms(self) -> np.ndarray:
        sq = np.zeros(self.n)
        for m in range(MODULES):
            BtB = np.einsum("nor,nos->nrs", self.B[:, m].astype(np.float64), self.B[:, m].astype(np.float64))
            AAt = np.einsum("nri,nsi->nrs", self.A[:, m].astype(np.float64), self.A[:, m].astype(np.float64))
            sq += np.einsum("nrs,nrs->n", BtB, AAt)
        return np.sqrt(sq)

    def embeddings(self, seed: int = 1) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = []
        for m in range(MODULES):
            Om = rng.standard_normal((DIM, SKETCH)) / np.sqrt(SKETCH)
            Ps = rng.standard_normal((DIM, SKETCH)) / np.sqrt(SKETCH)
            left = np.einsum("os,nor->nsr", Om, self.B[:, m].astype(np.float64))      # Ωᵀ B  [n, s, r]
            right = np.einsum("nri,it->nrt", self.A[:, m].astype(np.float64), Ps)      # A Ψ   [n, r, t]
            out.append(np.einsum("nsr,nrt->nst", left, right).reshape(self.n, -1))
        v = np.concatenate(out, axis=1).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def ours(data: Synthetic, k: int = 10, bound: float = 0.9, search_kind: str = "flat") -> tuple[list, dict]:
    """``search_kind``: ``flat`` (exact search: the candidate step is still N² dot products, only
    cheap ones) or ``ivf`` (``IVF{4√N},Flat``, nprobe 8, what ``--faiss-factory`` gives a large
    index: candidate generation ~N·(nlist + nprobe·N/nlist))."""
    import faiss

    t0 = time.perf_counter()
    vecs = data.embeddings()
    t_embed = time.perf_counter() - t0
    t0 = time.perf_counter()
    d = vecs.shape[1]
    if search_kind == "ivf":
        nlist = int(4 * np.sqrt(data.n))
        base = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        base.train(vecs)
        base.nprobe = 8
    else:
        base = faiss.IndexFlatIP(d)
    index = faiss.IndexIDMap2(base)
    index.add_with_ids(vecs, data.ids)

    def search(v, kk):
        s, i = index.search(np.ascontiguousarray(v), kk)
        return [list(zip(ir.tolist(), sr.tolist())) for sr, ir in zip(s, i)]

    pairs = audit.candidate_pairs(data.ids, vecs, search, k=k, bound=bound)
    t_cand = time.perf_counter() - t0
    t0 = time.perf_counter()
    norms = data.norms()
    cache = audit._FactorCache(data.adapter, size=256)
    edges, _bad = audit.verify_pairs(pairs, {int(i): float(norms[i]) for i in data.ids}, data.shas, cache)
    recs = {int(i): {"id": int(i), "path": f"#{i}", "mtime_ns": 0, "info": {"dtypes": {"F32": 2}}} for i in data.ids}
    clusters = audit.clusters_from_edges(edges, recs)
    t_verify = time.perf_counter() - t0
    groups = sorted(sorted(m["id"] for m in c["members"]) for c in clusters)
    return groups, {"embed_s": t_embed, "candidates_s": t_cand, "verify_s": t_verify,
                    "total_s": t_cand + t_verify, "pairs_checked": len(pairs)}


def brute(data: Synthetic, block: int = 256) -> tuple[list, dict]:
    """Every pair, exactly: per module the factors of all N adapters side by side ([out, N·r]),
    a block of rows against all columns with one BLAS GEMM per side (the ``lorasearch.gram``
    method, in blocks so memory stays O(block·N·r²))."""
    t0 = time.perf_counter()
    n = data.n
    norms = data.norms()
    uf = audit._UnionFind()
    L = [data.B[:, m].astype(np.float64).transpose(1, 0, 2).reshape(DIM, n * RANK) for m in range(MODULES)]
    R = [data.A[:, m].astype(np.float64).transpose(2, 0, 1).reshape(DIM, n * RANK) for m in range(MODULES)]
    for s in range(0, n, block):
        e = min(n, s + block)
        rows = np.arange(s, e)
        G = np.zeros((e - s, n))
        for m in range(MODULES):
            P = L[m][:, s * RANK:e * RANK].T @ L[m]              # (BᵢᵀBⱼ) blocks
            Q = R[m][:, s * RANK:e * RANK].T @ R[m]              # (AᵢAⱼᵀ) blocks
            G += (P * Q).reshape(e - s, RANK, n, RANK).sum(axis=(1, 3))
        cos = G / (norms[rows, None] * norms[None, :])
        ratio = norms[None, :] / norms[rows, None]
        hit = (cos >= audit.SAME_UPDATE_COSINE) & (np.abs(ratio - 1) <= audit.SAME_UPDATE_NORM_TOL)
        for a, b in zip(*np.nonzero(hit)):
            a = int(rows[a])
            if int(b) > a:
                uf.union(a, int(b))
    groups = sorted(uf.groups())
    return groups, {"total_s": time.perf_counter() - t0, "pairs_checked": n * (n - 1) // 2}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,2000,4000,10000,100000")
    ap.add_argument("--brute-max", type=int, default=4000, help="largest N the brute force is run at")
    ap.add_argument("--search", choices=("flat", "ivf"), default="flat", help="candidate search index")
    ap.add_argument("--method", choices=("both", "ours", "brute"), default="both",
                    help="run one side only (to time whole processes against each other)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        data = Synthetic(n)
        truth = sorted(data.truth)
        if args.method == "brute":
            g_brute, t_brute = brute(data)
            rows.append({"n": n, "brute": t_brute, "brute_correct": g_brute == truth})
            print(json.dumps(rows[-1]), flush=True)
            continue
        g_ours, t_ours = ours(data, search_kind=args.search)
        row = {"n": n, "search": args.search, "clusters": len(truth), "ours": t_ours, "ours_correct": g_ours == truth}
        if n <= args.brute_max and args.method == "both":
            g_brute, t_brute = brute(data)
            row.update(brute=t_brute, brute_correct=g_brute == truth,
                       ratio=t_brute["total_s"] / t_ours["total_s"])
        rows.append(row)
        print(json.dumps(row), flush=True)
        del data
    meas = [(r["n"], r["brute"]["total_s"]) for r in rows if "brute" in r]
    if meas and args.method == "both":
        c = float(np.median([t / (n * n) for n, t in meas]))          # brute force is Θ(N²)
        for r in rows:
            if "brute" not in r:
                r["brute_extrapolated_s"] = c * r["n"] ** 2
                r["ratio_extrapolated"] = r["brute_extrapolated_s"] / r["ours"]["total_s"]
                print(json.dumps({"n": r["n"], "brute_extrapolated_s": r["brute_extrapolated_s"],
                                  "ratio_extrapolated": r["ratio_extrapolated"]}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": f"{platform.machine()}, 2-core shared, no GPU",
                       "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
