"""Indexing cost on realistic SD1.5 kohya files, as ratios to just reading the bytes (issue 8).

    python -m lorasearch.eval.bench_ingest --ranks 8 32 128 --n 8 --threads 1
    python -m lorasearch.eval.bench_ingest --ranks 32 --n 8 --threads 0      # 0: all cores

Generates N SD1.5 kohya LoRAs per rank (UNet + text encoder, 264 modules, fp16; ~38 MB each at
rank 32) with the project's writers, warms the page cache, then measures in ONE run, interleaved
repetition by repetition (so drift on a shared machine hits all columns alike; medians reported):

  read       reading every file's bytes once from the page cache (the I/O floor of any indexer)
  safe_open  ``safetensors.safe_open(framework="np")`` + ``get_tensor`` of every tensor
  load       ``lorasearch.adapters.load_adapter`` (validate, sha256, fp16 → float32 factors)
  embed      ``SketchEncoder.embed`` alone, on adapters already loaded (the encoder's share)
  new        load + ``SketchEncoder.embed`` straight from the factors (numpy; what `index` runs)
  old        load + ``canonicalize_many`` (CholeskyQR2/QR + small SVDs, torch) + ``encode``:
             ``main``'s code path before issue 8, called through the same canonical functions
             ("old compute": canonicalize + encode alone, on loaded adapters)
  index      ``Lorasearch.add`` of the files into a new index (new path + catalog + FAISS), once

``--threads 1`` runs everything on one thread (BLAS and the embed/canonical worker pools);
``--threads 0`` lets them use every core. Thread counts must be fixed before numpy loads BLAS,
so ``main`` sets the environment first; run the script once per setting.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path


def _read_all(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                total += len(chunk)
    return total


def _safe_open_all(paths: list[Path]) -> None:
    from safetensors import safe_open

    for p in paths:
        with safe_open(str(p), framework="np") as f:
            for k in f.keys():
                f.get_tensor(k)


def _ncpu() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def generate(folder: Path, n: int, rank: int) -> list[Path]:
    from lorasearch.adapters.writers import random_adapter, write_adapter

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"lora_r{rank}_{i:03d}.safetensors"
        if not p.exists():
            write_adapter(random_adapter("sd15", rank=rank, seed=1000 * rank + i), p, "kohya", dtype="F16")
        paths.append(p)
    return paths


def run_rank(paths: list[Path], threads: int, reps: int, workdir: Path, old: bool = True) -> dict:
    import numpy as np

    from lorasearch.adapters import load_adapter
    from lorasearch.api import Lorasearch
    from lorasearch.canonical import canonicalize_many
    from lorasearch.encoders import get_encoder

    enc = get_encoder("sketch", device="cpu")
    enc.workers = threads or None
    workers = threads or None

    def new():
        ads = [load_adapter(p) for p in paths]
        return enc.embed(ads, device="cpu")

    def old_path():
        ads = [load_adapter(p) for p in paths]
        canon = canonicalize_many(ads, device="cpu", workers=workers)
        return enc.encode(canon)

    nbytes = _read_all(paths)                 # warm the page cache
    v_new, _ = new()
    if old:                                   # both paths give the same vectors (to float32 rounding)
        v_old = old_path()
        assert float(np.abs(v_new - v_old).max()) < 1e-5
    loaded = [load_adapter(p) for p in paths]
    stages = {"read": lambda: _read_all(paths), "safe_open": lambda: _safe_open_all(paths),
              "load": lambda: [load_adapter(p) for p in paths],
              "embed": lambda: enc.embed(loaded, device="cpu"), "new": new}
    if old:
        stages["old_compute"] = lambda: enc.encode(canonicalize_many(loaded, device="cpu", workers=workers))
        stages["old"] = old_path
    times: dict[str, list[float]] = {k: [] for k in stages}
    for _ in range(reps):
        for name, fn in stages.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    idx = workdir / f"index-{paths[0].stem}"
    shutil.rmtree(idx, ignore_errors=True)
    with Lorasearch(idx, device="cpu", create=True) as ls:
        ls.encoder.workers = threads or None
        t = time.perf_counter()
        rep = ls.add(paths, progress=False)
        t_index = time.perf_counter() - t
    assert len(rep.added) == len(paths) and not rep.errors, rep.summary()
    shutil.rmtree(idx, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    med["index"] = t_index
    return {"n": len(paths), "mb_per_file": nbytes / len(paths) / 1e6, "s": med}


def format_markdown(results: dict, threads: int, reps: int) -> str:
    th = "all cores" if threads == 0 else f"{threads} thread"
    out = [f"SD1.5 kohya fp16 files (264 modules), {th}; medians of {reps} interleaved repetitions; "
           f"{platform.machine()}, {_ncpu()} cores visible (shared), no GPU; "
           f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}", "",
           "| rank | n | MB/file | read s | safe_open ÷ read | load ÷ read | embed ÷ read | **new ÷ read** "
           "| new ÷ safe_open | old ÷ read | **old ÷ new** | old compute ÷ embed | index (add) ÷ read "
           "| new ms/adapter |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rank, r in results.items():
        s = r["s"]
        rd = s["read"]
        old = s.get("old")
        out.append(f"| {rank} | {r['n']} | {r['mb_per_file']:.1f} | {rd:.3f} | {s['safe_open'] / rd:.1f} | "
                   f"{s['load'] / rd:.1f} | {s['embed'] / rd:.1f} | **{s['new'] / rd:.1f}** | "
                   f"{s['new'] / s['safe_open']:.1f} | "
                   + (f"{old / rd:.1f} | **{old / s['new']:.1f}** | {s['old_compute'] / s['embed']:.1f} | "
                      if old else "– | – | – | ")
                   + f"{s['index'] / rd:.1f} | {1000 * s['new'] / r['n']:.0f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="files per rank")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--threads", type=int, default=1, help="1 = single thread, 0 = all cores")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-old", action="store_true", help="skip the old (canonical) path")
    ap.add_argument("--workdir", default=None, help="keep generated files here (reused across runs)")
    a = ap.parse_args()
    if a.threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(a.threads)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="lorasearch-bench-"))
    try:
        if a.threads and "torch" not in os.environ.get("_NO", ""):
            try:
                import torch
                torch.set_num_threads(a.threads)
            except ImportError:
                pass
        results = {}
        for rank in a.ranks:
            n = max(2, a.n // 4) if rank >= 128 else a.n
            paths = generate(work / "adapters" / f"r{rank}", n, rank)
            results[rank] = run_rank(paths, a.threads, a.reps, work, old=not a.no_old)
        print(format_markdown(results, a.threads, a.reps))
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
