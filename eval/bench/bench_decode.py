"""Tensor decoding of the reader (numpy, no torch) against torch's own conversion and a plain copy.

    python -m eval.bench.bench_decode --values 16000000 --repeat 5

For F16, BF16 and F8_E4M3 it times, side by side in one process on the same mmap'd file:
``SafetensorsFile.array`` (ours), torch ``frombuffer(...).to(float32)`` (the baseline the reader used
for fp8 before) and ``np.copy`` of the raw bytes (a memory-bandwidth yardstick: any decoder must at
least read the input and write 4 bytes per value). Median of ``--repeat`` runs; also the peak extra
memory of one decode (tracemalloc counts numpy allocations): one float32 result = 4 bytes per value.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np


def _time(fn, repeat: int) -> float:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _peak(fn) -> int:
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--values", type=int, default=16_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    import torch
    from safetensors.torch import save_file

    from lorasearch.adapters.safetensors_strict import open_safetensors

    n = args.values
    x = torch.randn(n) * 0.05
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, dt in (("F16", torch.float16), ("BF16", torch.bfloat16), ("F8_E4M3", torch.float8_e4m3fn)):
            p = Path(d) / f"{name}.safetensors"
            save_file({"t": x.to(dt)}, str(p))
            st = open_safetensors(p)
            info = st.tensors["t"]
            raw = np.frombuffer(st.buffer(), np.uint8, info.end - info.start, info.start)
            ours = lambda: st.array("t")  # noqa: E731
            base = lambda: torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dt).to(torch.float32).numpy()  # noqa: E731
            copy = lambda: np.copy(raw)  # noqa: E731
            # the reader before this change: bf16 widened then shifted (two full-size arrays)
            prev = (lambda: (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)) \
                if name == "BF16" else None
            assert np.array_equal(ours(), base(), equal_nan=True)
            ours(); base(); copy()
            t_ours, t_base, t_copy = _time(ours, args.repeat), _time(base, args.repeat), _time(copy, args.repeat)
            t_prev, peak_prev = (_time(prev, args.repeat), _peak(prev)) if prev else (None, None)
            tracemalloc.start()
            ours()
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            rows.append({"dtype": name, "values": n, "ours_s": round(t_ours, 4), "torch_s": round(t_base, 4),
                         "raw_copy_s": round(t_copy, 4), "ours_vs_torch": round(t_ours / t_base, 2),
                         "ours_vs_raw_copy": round(t_ours / t_copy, 2), "peak_bytes_per_value": round(peak / n, 2),
                         **({"previous_s": round(t_prev, 4), "ours_vs_previous": round(t_ours / t_prev, 2),
                             "previous_peak_bytes_per_value": round(peak_prev / n, 2)} if prev else {})})
            del raw, ours, base, copy, prev      # views into the mmap must go before it closes
            st.close()
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
