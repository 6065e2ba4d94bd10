"""Watch a folder: poll it and index adapters as they appear, change or disappear.

A file is read only once its (size, mtime) has been the same for two consecutive polls, so a
file still being written (copy, download) is normally never read. A writer that pauses longer
than that can still leave a half-written file: a file that fails to parse while its mtime is
younger than ``settle`` seconds (default max(5, 4·interval)) is silently retried; only an older
one is reported, once, and retried when it changes again. Polling, not inotify: it works the same
on network file systems and in containers, and the cost is one stat per adapter. A busy index
(another writer) or a vanished ``root`` skips a round.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from lorasearch.errors import IndexLockedError, MissingError
from lorasearch.ingest import Sync, prune_missing, scan
from lorasearch.results import SyncReport


def watch(sync: Sync, root: str | os.PathLike, interval: float = 2.0, prune: bool = True,
          stop: Callable[[], bool] | None = None,
          on_report: Callable[[SyncReport], None] | None = None,
          on_note: Callable[[str], None] | None = None, settle: float | None = None) -> None:
    from lorasearch.adapters import find_adapters

    root = Path(root)
    if not root.is_dir():
        raise MissingError(f"{root}: not a directory")
    settle = max(5.0, 4 * interval) if settle is None else settle
    note = on_note or (lambda _msg: None)
    seen: dict[str, tuple[int, int]] = {}
    failed: dict[str, tuple[int, int]] = {}
    while True:
        try:
            current = scan(find_adapters(root))
        except MissingError:
            note(f"{root} is gone; waiting for it to come back")
            current = None
        if current is not None:
            stable = [Path(p) for p, st in current.items() if seen.get(p) == st and failed.get(p) != st]
            try:
                report = sync.run(stable, progress=False, stats=current) if stable else SyncReport()
                held = []
                for p, msg in report.errors:
                    st = current.get(p)
                    if st is not None and time.time() - st[1] / 1e9 < settle:
                        held.append((p, msg))       # young file: probably still being written
                    elif st is not None:
                        failed[p] = st
                report.errors = [e for e in report.errors if e not in held]
                if prune:
                    # what the last scan saw (symlinks included) and this one does not is gone
                    prune_missing(sync.index, root, set(current), report, also=set(seen))
            except IndexLockedError as e:
                note(f"{e} (retrying)")
                report = SyncReport()
                current = seen                      # try the same files again next round
            if on_report and (report.added or report.updated or report.removed or report.errors):
                on_report(report)
            seen = current
        if stop is not None and stop():
            return
        time.sleep(interval)
