"""Benchmark: the W2T canonicalization check (their Table 4), for SD1.5, SDXL and LLM shapes.

For each module shape and rank it puts side by side
  * QR-SVD (``lorasearch.canonical``, float32) and a dense float32 SVD of ΔW (what one would do
    without the factor trick), each compared with a float64 reference:
    singular-value gap  max_i |σ_i − σ_i^ref| / σ_1^ref,
    update gap          ‖U diag σ Vᵀ − ΔW‖_F / ‖ΔW‖_F  (ΔW formed in float64),
    factor cosine       mean |⟨u_i^QR, u_i^dense⟩| over the rank components;
  * the time of the dense float32 SVD and of QR-SVD, and the speed-up.
The reference is a float64 dense SVD where it is affordable (≤ 16M entries) and a float64 QR-SVD
for the LLM shapes (both are backward stable in double precision, ~1e-15, far below the float32
gaps measured). The dense float32 SVD does not depend on the rank, so for the LLM shapes it is run
once per shape (at the middle rank) and its time reused for the other ranks.

    python -m lorasearch.eval.bench_canonical            # full table
    python -m lorasearch.eval.bench_canonical --quick    # a reduced set for a small machine
"""
from __future__ import annotations

import argparse
import datetime
import platform
import time

import numpy as np
import torch

from lorasearch.canonical import canonicalize, resolve_device
from lorasearch.types import LoraAdapter, LoraModule

SHAPES = {
    "sd15": [(320, 320), (320, 768), (2560, 320), (1280, 1280)],
    "sdxl": [(640, 2048), (1280, 2048), (10240, 1280)],
    "llm": [(4096, 4096), (11008, 4096)],
}
DENSE_REF_MAX = 16 * 1024 * 1024   # entries of ΔW up to which the f64 reference is a dense SVD


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, dev, repeats):
    best = float("inf")
    for _ in range(max(1, repeats)):
        _sync(dev)
        t = time.perf_counter()
        res = fn()
        _sync(dev)
        best = min(best, time.perf_counter() - t)
    return best, res


def _update_gap(U, s, V, B64, A64, scale):
    """‖U σ Vᵀ − scale·B·A‖_F / ‖scale·B·A‖_F in float64, in row blocks to bound memory."""
    num = den = 0.0
    Us = U.astype(np.float64) * s.astype(np.float64)
    V64 = V.astype(np.float64)
    for i in range(0, B64.shape[0], 2048):
        D = scale * (B64[i:i + 2048] @ A64)
        num += float(np.sum((Us[i:i + 2048] @ V64.T - D) ** 2))
        den += float(np.sum(D ** 2))
    return float(np.sqrt(num / den))


def _sign_rule(U, V):
    idx = np.abs(U).argmax(axis=0)
    sg = np.sign(U[idx, np.arange(U.shape[1])])
    sg[sg == 0] = 1
    return U * sg, V * sg


def bench_one(out: int, inn: int, r: int, dev, repeats: int, seed: int, dense: bool):
    rng = np.random.default_rng(seed)
    A64 = rng.standard_normal((r, inn)) / np.sqrt(inn)
    B64 = rng.standard_normal((out, r)) * 0.02
    scale = 16.0 / r                         # alpha 16, as kohya defaults
    A32, B32 = A64.astype(np.float32), B64.astype(np.float32)
    A64, B64 = A32.astype(np.float64), B32.astype(np.float64)   # the reference sees the same numbers
    ad = LoraAdapter("bench", "memory", "", "bench", [LoraModule("m", A32, B32, scale, shape=(out, inn))])

    canonicalize(ad, device=dev)             # warm-up (lazy init of LAPACK / cuSOLVER)
    t_qr, c = _timed(lambda: canonicalize(ad, device=dev).modules[0], dev, repeats)

    if out * inn <= DENSE_REF_MAX:
        ref = np.linalg.svd(scale * (B64 @ A64), compute_uv=False)[:c.rank]
        ref_kind = "f64 dense SVD"
    else:
        ref = canonicalize(ad, device="cpu", dtype="float64").modules[0].sigma
        ref_kind = "f64 QR-SVD"
    row = dict(shape=f"{out}x{inn}", out=out, inn=inn, rank=r, reference=ref_kind,
               sv_gap_qr=float(np.abs(c.sigma - ref).max() / ref[0]),
               update_gap_qr=_update_gap(c.U, c.sigma, c.V, B64, A64, scale),
               t_qr_ms=t_qr * 1e3)
    if dense:
        W = torch.from_numpy((scale * (B64 @ A64)).astype(np.float32)).to(dev)
        t_dense, (Ud, Sd, Vhd) = _timed(lambda: torch.linalg.svd(W, full_matrices=False), dev, 1 if out * inn > 4e6
                                        else repeats)
        Ud, Sd, Vd = Ud[:, :r].cpu().numpy(), Sd[:r].cpu().numpy(), Vhd[:r].T.cpu().numpy()
        Ud, Vd = _sign_rule(Ud, Vd)
        row.update(sv_gap_dense=float(np.abs(Sd[:c.rank] - ref).max() / ref[0]),
                   update_gap_dense=_update_gap(Ud, Sd, Vd, B64, A64, scale),
                   factor_cos=float(np.mean(np.abs(np.sum(Ud[:, :c.rank] * c.U, axis=0)))),
                   t_dense_ms=t_dense * 1e3)
    return row


def run(ranks=(1, 2, 4, 8, 16, 32, 64), families=("sd15", "sdxl", "llm"), repeats=3, device="auto",
        shapes: dict | None = None, progress=None, threads: int | None = 1) -> list[dict]:
    """One row per (family, shape, rank); see the module docstring for the columns.

    ``threads`` sets torch's CPU threads for both methods while it runs (None = leave as is).
    """
    n_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(ranks, families, repeats, device, shapes, progress)
    finally:
        torch.set_num_threads(n_before)


def _run(ranks, families, repeats, device, shapes, progress) -> list[dict]:
    dev = resolve_device(device)
    shapes = shapes or SHAPES
    rows = []
    for fam in families:
        for out, inn in shapes[fam]:
            once = out * inn > 4_000_000 and dev.type == "cpu"
            dense_rank = ranks[len(ranks) // 2] if once else None
            t_dense = None
            for r in ranks:
                row = bench_one(out, inn, r, dev, repeats, seed=r, dense=(not once or r == dense_rank))
                row["family"] = fam
                if "t_dense_ms" in row:
                    t_dense = row["t_dense_ms"]
                rows.append(row)
                if progress:
                    progress(row)
            for row in rows:
                if row["family"] == fam and row["shape"] == f"{out}x{inn}" and "t_dense_ms" not in row:
                    row["t_dense_ms"], row["t_dense_reused"] = t_dense, True
    for row in rows:
        row["speedup"] = row["t_dense_ms"] / row["t_qr_ms"] if row.get("t_dense_ms") else None
        row["device"] = dev.type
        row["threads"] = torch.get_num_threads()
    return rows


def _fmt(x, spec):
    return "—" if x is None else format(x, spec)


def format_markdown(rows: list[dict]) -> str:
    head = ("| family | shape | r | ref | σ gap QR-SVD | σ gap dense f32 | ΔW gap QR-SVD | ΔW gap dense f32 "
            "| factor cos | dense SVD ms | QR-SVD ms | speed-up |\n|" + "---|" * 12)
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['shape']} | {r['rank']} | {r['reference']} | {r['sv_gap_qr']:.1e} "
            f"| {_fmt(r.get('sv_gap_dense'), '.1e')} | {r['update_gap_qr']:.1e} "
            f"| {_fmt(r.get('update_gap_dense'), '.1e')} | {_fmt(r.get('factor_cos'), '.6f')} "
            f"| {_fmt(r.get('t_dense_ms'), '.1f')}{'*' if r.get('t_dense_reused') else ''} "
            f"| {r['t_qr_ms']:.2f} | {_fmt(r.get('speedup'), '.0f')}× |")
    dev = rows[0]["device"] if rows else "?"
    lines.append("")
    lines.append(f"Device {dev}; {platform.processor() or platform.machine()}, torch {torch.__version__}, "
                 f"{rows[0]['threads'] if rows else '?'} thread(s); {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. "
                 "Gaps vs the float64 reference; * = dense float32 SVD timed once for the shape (its cost "
                 "does not depend on r) and reused.")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ranks 1,8,64 and one LLM shape (small machines)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both methods (default 1: stable timings on a shared machine)")
    a = ap.parse_args(argv)
    kw = {}
    if a.quick:
        kw = dict(ranks=(1, 8, 64), shapes=dict(SHAPES, llm=[(4096, 4096)]))
    import sys
    rows = run(device=a.device, repeats=a.repeats, threads=a.threads,
               progress=lambda r: print(f"{r['family']} {r['shape']} r={r['rank']}", file=sys.stderr, flush=True), **kw)
    print(format_markdown(rows))


if __name__ == "__main__":
    main()
