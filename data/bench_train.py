"""Benchmark: batched multi-LoRA training vs a sequential peft loop, same adapters, same steps.

    python -m lorasearch.data.bench_train --n 8 --steps 20 --device cpu [--json]

Both sides train the same ``n`` MiniLM adapters (mixed tasks and ranks, batch 16 each) for the
same number of steps, from the same initialisation, and evaluate them on the same held-out sets;
the wall time of each side includes everything a user would wait for (model load, training,
evaluation). Reported as adapters per minute and the ratio, plus the process CPU time of each side
(on a shared CPU box the wall clock is noisy; CPU time is not).
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from lorasearch.data import language as lang
from lorasearch.data.tasks import TASKS, get_task


def bench(n: int = 8, steps: int = 20, device: str = "cpu", batch_size: int = 16, threads: int = 1) -> dict:
    torch.set_num_threads(threads)
    names = list(TASKS)
    specs = [lang.RunSpec(task=names[i % len(names)], rank=(4, 8, 16)[i % 3], alpha=16.0, lr=1e-3, steps=steps,
                          seed=i, batch_size=batch_size, n_train=256) for i in range(n)]
    datas = [lang.task_data(get_task(s.task), 0, s.n_train, 100) for s in specs]
    lang.load_base(device)   # warm the file cache so neither side pays the first read
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    t, c = time.perf_counter(), time.process_time()
    seq = [lang.train_peft(s, d, device=device, shared_init=True) for s, d in zip(specs, datas)]
    sync()
    t_seq, c_seq = time.perf_counter() - t, time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    bat = lang.train_batched(specs, datas, device=device)
    sync()
    t_bat, c_bat = time.perf_counter() - t, time.process_time() - c
    gap = max(abs(a - b) for r1, r2 in zip(seq, bat) for a, b in zip(r1.loss_curve, r2.loss_curve))
    return dict(n=n, steps=steps, batch_size=batch_size, device=str(device), threads=threads,
                machine=platform.machine(), cpu=platform.processor() or platform.machine(),
                sequential_s=round(t_seq, 2), batched_s=round(t_bat, 2),
                sequential_adapters_per_min=round(60 * n / t_seq, 2),
                batched_adapters_per_min=round(60 * n / t_bat, 2),
                speedup=round(t_seq / t_bat, 2), sequential_cpu_s=round(c_seq, 2), batched_cpu_s=round(c_bat, 2),
                cpu_time_speedup=round(c_seq / c_bat, 2), max_loss_curve_gap=gap)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    r = bench(a.n, a.steps, a.device, a.batch_size, a.threads)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"{r['n']} adapters × {r['steps']} steps, batch {r['batch_size']}, {r['device']}: "
              f"sequential peft {r['sequential_s']} s ({r['sequential_adapters_per_min']}/min), "
              f"batched {r['batched_s']} s ({r['batched_adapters_per_min']}/min), speed-up {r['speedup']}×")


if __name__ == "__main__":
    main()
