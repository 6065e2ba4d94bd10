"""Kill trials: SIGKILL ``lorasearch index`` / ``add`` / ``remove`` and index creation at random
moments, then check that the index is still whole (issue 7).

Each trial runs the real CLI entry point (``lorasearch.cli:main``) in a child process. The child
imports everything first and says "ready" (so the kill clock does not spend itself in imports);
the parent sends it the command line, waits a random delay drawn uniformly over the command's
calibrated duration (until it prints its result line) times 1.1, 2 or 3 (creation trials: the
first 60-180 ms), and sends SIGKILL. A trial counts only if the child was still running when
killed; trials run until every kind has its number of SIGKILLs. After each kill:

- the index opens read-only (a creation trial may also find no index yet, never a broken one),
  its catalog and FAISS agree (``LoraIndex.check``: ids and a sample of vectors), and every
  family answers a search for one of its own stored vectors at cosine ~1;
- nothing acknowledged is lost: the catalog count never moves against the command (``index`` /
  ``add`` never lose rows that were there, ``remove`` never resurrects), and a command that
  printed its result line before the kill left exactly the state it reported;
- it opens writable (the kernel dropped the writer lock) and re-running the command to the end
  (through the Python API) gives the right count.

    nice python -m lorasearch.eval.bench.kill_trials --trials 60 --out eval/results/kill_trials.md
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


CHILD = r"""
import json, sys
from lorasearch import cli
import lorasearch.api, lorasearch.adapters, lorasearch.canonical, lorasearch.encoders, lorasearch.indexer
try:
    import torch
except ImportError:
    pass
print("ready", flush=True)
sys.argv = ["lorasearch"] + json.loads(sys.stdin.readline())
cli.main()
"""

REPO = Path(__file__).resolve().parents[2]
GALLERY = REPO / "data" / "demo" / "gallery"


class Child:
    """A pre-warmed CLI process waiting for its command line."""

    def __init__(self, cwd: str):
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=cwd,
                                     env=dict(os.environ, OMP_NUM_THREADS="1", LORASEARCH_INDEX=""))

    def start(self, args: list[str]) -> None:
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"child did not start: {self.proc.stderr.read()[-2000:]}")
        self.proc.stdin.write(json.dumps(args) + "\n")
        self.proc.stdin.flush()

    def kill_after(self, delay: float) -> tuple[bool, str, int]:
        """(was it still running when killed, its stdout, its exit status)."""
        deadline = time.perf_counter() + delay
        while time.perf_counter() < deadline and self.proc.poll() is None:
            time.sleep(min(0.002, max(0.0, deadline - time.perf_counter())))
        alive = self.proc.poll() is None
        if alive:
            self.proc.send_signal(signal.SIGKILL)
        out, _err = self.proc.communicate()
        return alive, out, self.proc.returncode


def adapters_in(folder: Path) -> list[Path]:
    from lorasearch.adapters import find_adapters
    return [Path(os.path.realpath(p)) for p in find_adapters(folder)]


def verify(root: Path, lower: int | None, upper: int | None, exact: int | None, may_be_missing: bool) -> list[str]:
    """Problems with the index at ``root`` after a kill (empty: all good)."""
    from lorasearch.errors import MissingError
    from lorasearch.indexer import LoraIndex

    problems = []
    try:
        ro = LoraIndex.open(root, readonly=True, device="cpu")
    except MissingError as e:
        return [] if may_be_missing else [f"missing after kill: {e}"]
    except Exception as e:                      # e.g. "not a lorasearch catalog": the bug this guards
        return [f"does not open: {type(e).__name__}: {e}"]
    with ro:
        n = ro.count()
        res = ro.check()
        if not res["ok"]:
            problems += [f"check: {p}" for p in res["problems"]]
        if exact is not None and n != exact:
            problems.append(f"count {n} != {exact} acknowledged")
        if lower is not None and n < lower:
            problems.append(f"count {n} < {lower} before the command (acknowledged rows lost)")
        if upper is not None and n > upper:
            problems.append(f"count {n} > {upper} before the remove (removed rows came back)")
        for family in ro.families():
            one = ro.records(family)[0]["id"]
            top = ro.search(ro.embeddings([one]), family, 1)[0]
            if not top or top[0][1] < 0.999:
                problems.append(f"{family}: its own vector is not found at cosine 1 ({top})")
    try:
        with LoraIndex.open(root, device="cpu") as rw:
            if not rw.check()["ok"]:
                problems.append("writable open: check failed")
    except Exception as e:
        problems.append(f"writable open: {type(e).__name__}: {e}")
    return problems


def run(trials: int = 50, seed: int = 0, workdir: str | None = None, log=print) -> dict:
    from lorasearch.api import Lorasearch
    from lorasearch.indexer import LoraIndex

    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="lorasearch-kill-", dir=workdir))
    try:
        gallery = tmp / "gallery"
        shutil.copytree(GALLERY, gallery)
        small = tmp / "small"
        small.mkdir()
        for p in sorted(gallery.iterdir())[:6]:
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, small / p.name)
        everything = adapters_in(gallery)
        n_small = len(adapters_in(small))
        main_ix = tmp / "ix"
        with Lorasearch(main_ix, create=True, device="cpu") as ls:
            ls.index_dir(gallery)
            total = ls.index.count()
        log(f"gallery: {total} adapters; small: {n_small}")

        def api(root):
            return Lorasearch(root, create=True, device="cpu")

        plans = {"create": [], "index": [], "add": [], "remove": []}

        def plan(kind: str):
            """(child args, folder-state setup, expectations, re-run) for one trial of ``kind``."""
            if kind == "create":
                root = tmp / f"new-{len(plans['create'])}"
                return root, ["--index", str(root), "--device", "cpu", "index", str(small)], \
                    dict(lower=None, upper=None, may_be_missing=True), \
                    lambda ls: ls.index_dir(small), n_small, f"{n_small} added"
            picks = rng.sample(everything, 3)
            with api(main_ix) as ls:
                if kind in ("index", "add"):
                    ls.remove([str(p) for p in picks])        # make the command do real work
                else:
                    ls.add(picks)
                before = ls.index.count()
            if kind == "index":
                args, rerun, want, done = ["index", str(gallery)], lambda ls: ls.index_dir(gallery), total, "3 added"
            elif kind == "add":
                args, rerun, want, done = ["add"] + [str(p) for p in picks], lambda ls: ls.add(picks), total, "3 added"
            else:
                args, rerun, want, done = ["remove"] + [str(p) for p in picks], \
                    lambda ls: ls.remove([str(p) for p in picks]), total - 3, "3 removed"
            exp = dict(lower=before if kind != "remove" else None, upper=before if kind == "remove" else None,
                       may_be_missing=False)
            return main_ix, ["--index", str(main_ix), "--device", "cpu"] + args, exp, rerun, want, done

        # calibrate: how long each command runs once its imports are done
        durations = {}
        for kind in ("index", "add", "remove"):
            root, args, _exp, _rerun, _want, _done = plan(kind)
            child = Child(str(tmp))
            child.start(args)
            t = time.perf_counter()
            child.proc.stdout.readline()                 # its result line: the work is done by then
            durations[kind] = time.perf_counter() - t    # (interpreter teardown after it is not sampled)
            child.proc.communicate()
            with api(main_ix) as ls:
                ls.index_dir(gallery)
        durations["create"] = 0.06
        log("calibrated durations (s): " + ", ".join(f"{k} {v:.2f}" for k, v in durations.items()))

        stats = {k: {"killed": 0, "finished_first": 0, "failures": 0, "acknowledged_before_kill": 0,
                     "repairs": 0, "no_index_yet": 0, "after_a_commit": 0} for k in plans}

        def exp_before(kind, exp):
            return 0 if kind == "create" else (exp["lower"] if kind != "remove" else exp["upper"])
        failures = []
        nxt = Child(str(tmp))
        for kind in _schedule(stats, trials, rng):
            child, nxt = nxt, Child(str(tmp))            # the next one imports while this one runs
            root, args, exp, rerun, want, done = plan(kind)
            plans[kind].append(root)
            # the calibration drifts with the shared machine's load: stretch the window for some trials
            delay = rng.uniform(0, durations[kind] * rng.choice((1.1, 2.0, 3.0)))
            child.start(args)
            alive, out, code = child.kill_after(delay)
            st = stats[kind]
            if not alive:
                st["finished_first"] += 1
            else:
                st["killed"] += 1
            acknowledged = done in out
            if alive:                               # where did the kill land?
                if not (root / "catalog.sqlite").exists():
                    st["no_index_yet"] += 1
                else:
                    with LoraIndex.open(root, readonly=True, device="cpu") as ix:
                        now = ix.count()
                    st["after_a_commit"] += int(now != exp_before(kind, exp))
            st["acknowledged_before_kill"] += int(alive and acknowledged)
            problems = verify(root, exact=want if acknowledged else None, **exp)
            if (root / "catalog.sqlite").exists() and not problems:
                with LoraIndex.open(root, readonly=True, device="cpu") as ix:
                    ix.check()
                    st["repairs"] += len(ix.repairs)   # snapshots that had to be rebuilt (not a failure)
            try:
                with api(root) as ls:
                    rerun(ls)
                with LoraIndex.open(root, readonly=True, device="cpu") as ix:
                    if ix.count() != want or not ix.check()["ok"]:
                        problems.append(f"re-run ends with {ix.count()} adapters, want {want}")
            except Exception as e:
                problems.append(f"re-run: {type(e).__name__}: {e}")
            if kind == "remove":
                with api(main_ix) as ls:
                    ls.index_dir(gallery)               # back to the full gallery
            done_so_far = sum(v["killed"] + v["finished_first"] for v in stats.values())
            if done_so_far % 20 == 0:
                log(f"{done_so_far} trials, {len(failures) + bool(problems)} failed")
            if problems:
                st["failures"] += 1
                failures.append({"kind": kind, "delay_s": round(delay, 4), "killed": alive, "problems": problems})
                log(f"FAIL {kind} at {delay:.3f}s: {problems}")
            if kind == "create":
                shutil.rmtree(root, ignore_errors=True)
        nxt.proc.kill()
        nxt.proc.communicate()
        return {"stats": stats, "failures": failures, "durations": durations, "trials_per_kind": trials,
                "gallery": total}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _schedule(stats: dict, trials: int, rng: random.Random):
    """Kinds in random order until each has ``trials`` SIGKILLs (a child that finished before its
    kill does not count), at most 3x as many runs."""
    runs = 0
    while runs < 3 * trials * len(stats):
        short = [k for k, st in stats.items() if st["killed"] < trials]
        if not short:
            return
        runs += 1
        yield rng.choice(short)


def to_markdown(res: dict, machine: str, seconds: float) -> str:
    lines = [f"# Kill trials (issue 7)\n",
             f"Machine: {machine}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"{seconds / 60:.1f} min, run with `nice`.\n",
             "Command: `nice python -m lorasearch.eval.bench.kill_trials --trials "
             f"{res['trials_per_kind']}` (demo gallery, {res['gallery']} adapters; creation trials index a "
             "6-adapter folder into a new index). SIGKILL at a uniform random moment of the command after its "
             "imports, over 1.1x, 2x or 3x its calibrated duration (" + ", ".join(f"{k} {v:.2f} s" for k, v in res["durations"].items())
             + "). A trial is counted as killed only if the process was still running.\n",
             "| command | SIGKILLs | killed before the index existed | killed after the command committed rows | "
             "printed its result, then killed | finished before the kill (not counted) | snapshot repairs seen | failures |",
             "|---|---|---|---|---|---|---|---|"]
    keys = ("killed", "no_index_yet", "after_a_commit", "acknowledged_before_kill", "finished_first", "repairs",
            "failures")
    tot = dict.fromkeys(keys, 0)
    for kind, st in res["stats"].items():
        lines.append(f"| {kind} | " + " | ".join(str(st[k]) for k in keys) + " |")
        for k in tot:
            tot[k] += st[k]
    lines.append("| **all** | " + " | ".join(f"**{tot[k]}**" if k in ("killed", "failures") else str(tot[k])
                                            for k in keys) + " |")
    lines.append("\nChecked after every trial: the index opens read-only (creation: or is absent, never half-made), "
                 "`check()` (catalog ids == FAISS ids, sample vectors byte-equal), each family finds its own vector at "
                 "cosine 1, the count never moves against the command (and equals what a printed result reported), "
                 "the index opens writable, and re-running the command to the end gives the right count.")
    if res["failures"]:
        lines.append("\n## Failures\n")
        lines += [f"- {f['kind']} at {f['delay_s']} s: {'; '.join(f['problems'])}" for f in res["failures"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=50, help="trials per command kind (4 kinds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the Markdown report here")
    args = p.parse_args(argv)
    from lorasearch.eval.bench_index import _machine
    t = time.perf_counter()
    res = run(args.trials, args.seed, log=lambda m: print(m, file=sys.stderr, flush=True))
    md = to_markdown(res, _machine(), time.perf_counter() - t)
    if args.out:
        Path(args.out).write_text(md)
    print(md)
    if res["failures"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
