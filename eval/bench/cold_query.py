"""Cold ``lorasearch query`` on the demo collection ÷ ``python -c "import faiss, numpy"``, paired.

    python -m lorasearch.eval.bench.cold_query --runs 7

Builds an index of ``data/demo`` once (not timed), then starts both commands in turn — A B A B …
— as fresh processes and reports the median of the per-pair ratios (pairing keeps the ratio
meaningful when a shared machine's speed drifts). Also lists which heavy modules the query
process imported (``torch`` must not be among them with the default encoder).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "transformers", "peft", "diffusers", "scipy", "sklearn", "pandas", "pyarrow", "tqdm")


def _time(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--demo", default=str(Path(__file__).resolve().parents[2] / "data" / "demo"))
    a = ap.parse_args()
    demo = Path(a.demo)
    query = sorted((demo / "queries").glob("*"))[0]
    tmp = Path(tempfile.mkdtemp(prefix="lorasearch-coldq-"))
    try:
        idx = tmp / "index"
        base = [shutil.which("lorasearch") or "lorasearch"]
        subprocess.run(base + ["--index", str(idx), "index", str(demo)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        qcmd = base + ["--index", str(idx), "query", str(query), "-k", "10"]
        ref = [sys.executable, "-c", "import faiss, numpy"]
        _time(qcmd), _time(ref)                                   # warm the page cache
        pairs = [(_time(qcmd), _time(ref)) for _ in range(a.runs)]
        probe = ("import sys, runpy; sys.argv = ['lorasearch', '--index', %r, 'query', %r];"
                 "import atexit; atexit.register(lambda: print('IMPORTED', *sorted(m for m in %r if m in sys.modules),"
                 " file=sys.stderr));from lorasearch.cli import main; main()") % (str(idx), str(query), HEAVY)
        err = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stderr
        heavy = next((l.split()[1:] for l in err.splitlines() if l.startswith("IMPORTED")), ["?"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    q = statistics.median(p[0] for p in pairs)
    r = statistics.median(p[1] for p in pairs)
    ratio = statistics.median(p[0] / p[1] for p in pairs)
    print(f"cold query median {q:.3f} s; import faiss, numpy median {r:.3f} s; "
          f"paired ratio median {ratio:.2f}x over {a.runs} pairs; heavy modules imported: {heavy or 'none'}")


if __name__ == "__main__":
    main()
