"""Indexing throughput on realistic SD1.5 rank-32 kohya files, as a ratio to just reading the bytes.

    python -m lorasearch.eval.bench_ingest --n 16 --rank 32

Generates N SD1.5 kohya LoRAs (UNet + text encoder, 264 modules, fp16, ~38 MB each at
rank 32) with the project's writers, then in one run measures, side by side:
  read   — reading every file's bytes once (the I/O floor of any indexer),
  load   — parsing + validating into factors (lorasearch.adapters),
  canon  — QR/SVD canonical form, encode — the default encoder,
  index  — the whole `Lorasearch.index_dir` (all of the above + catalog + FAISS).
Both passes run with the files in the page cache (read once before timing), so the ratio is
compute over memory-speed I/O, the harder case for the indexer.
"""
from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path


def _read_all(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                total += len(chunk)
    return total


def run(n: int = 16, rank: int = 32, workdir: str | None = None, device: str = "cpu") -> dict:
    from lorasearch.adapters import find_adapters, load_adapter
    from lorasearch.adapters.writers import random_adapter, write_adapter
    from lorasearch.api import Lorasearch
    from lorasearch.canonical import canonicalize_many
    from lorasearch.encoders import get_encoder

    tmp = Path(workdir or tempfile.mkdtemp(prefix="lorasearch-bench-"))
    folder = tmp / "adapters"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ad = random_adapter("sd15", rank=rank, seed=i)
        write_adapter(ad, folder / f"lora_{i:03d}.safetensors", "kohya", dtype="F16")
    paths = find_adapters(folder)
    nbytes = _read_all(paths)  # warm the page cache

    t = time.perf_counter(); _read_all(paths); t_read = time.perf_counter() - t
    t = time.perf_counter(); adapters = [load_adapter(p) for p in paths]; t_load = time.perf_counter() - t
    t = time.perf_counter(); canon = canonicalize_many(adapters, device=device); t_canon = time.perf_counter() - t
    enc = get_encoder(None)
    t = time.perf_counter(); enc.encode(canon); t_enc = time.perf_counter() - t
    del adapters, canon

    ls = Lorasearch(tmp / "index", device=device, create=True)
    t = time.perf_counter(); rep = ls.index_dir(folder, progress=False); t_index = time.perf_counter() - t
    assert len(rep.added) == n and not rep.errors, rep.summary()
    t = time.perf_counter(); ls.index_dir(folder, progress=False); t_noop = time.perf_counter() - t
    if workdir is None:
        shutil.rmtree(tmp, ignore_errors=True)
    mb = nbytes / 1e6
    return {
        "machine": f"{platform.machine()} {platform.processor() or ''} ({_ncpu()} cores)".strip(),
        "date": date.today().isoformat(), "n": n, "rank": rank, "mb_per_file": round(mb / n, 1),
        "read_s": t_read, "load_s": t_load, "canon_s": t_canon, "encode_s": t_enc, "index_s": t_index,
        "reindex_unchanged_s": t_noop,
        "read_MBps": mb / t_read, "index_MBps": mb / t_index, "adapters_per_s": n / t_index,
        "index_over_read": t_index / t_read,
    }


def _ncpu() -> int:
    import os

    return os.cpu_count() or 1


def format_markdown(r: dict) -> str:
    rows = [
        ("read bytes (floor)", r["read_s"]), ("parse + validate", r["load_s"]),
        ("canonicalize", r["canon_s"]), ("encode (sketch)", r["encode_s"]),
        ("`index_dir` total", r["index_s"]), ("re-index, nothing changed", r["reindex_unchanged_s"]),
    ]
    out = [f"{r['n']} SD1.5 kohya rank-{r['rank']} files, {r['mb_per_file']} MB each — {r['machine']}, {r['date']}",
           "", "| stage | seconds | × read |", "|---|---|---|"]
    out += [f"| {name} | {s:.2f} | {s / r['read_s']:.1f} |" for name, s in rows]
    out += ["", f"indexing: {r['adapters_per_s']:.2f} adapters/s, {r['index_MBps']:.0f} MB/s "
                f"(reading alone: {r['read_MBps']:.0f} MB/s); index/read = {r['index_over_read']:.1f}×"]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    print(format_markdown(run(a.n, a.rank, device=a.device)))


if __name__ == "__main__":
    main()
