"""Which ``Lorasearch`` facade a request uses: readers never wait for a writer.

Each worker thread keeps its own read-only facade (its own SQLite connection, WAL: reads see the
last committed state and never block a writer). Writes go through one read-write facade, one at a
time; the index's cross-process writer lock (``flock``) is then taken per operation, so a CLI
``lorasearch add`` in another process and this server take turns. A write that finds the lock held
says so on stderr and waits at most ``write_wait`` seconds, then fails with ``IndexLockedError``.
"""
from __future__ import annotations

import sys
import threading
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from lorasearch.api import Lorasearch
from lorasearch.errors import IndexLockedError


class Facades:
    def __init__(self, index_path: Path, device: str = "cpu", write_wait: float = 10.0):
        self.index_path = Path(index_path)
        self.device = device
        self.write_wait = float(write_wait)
        self._local = threading.local()
        self._opened: list[Lorasearch] = []
        self._opened_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._writer: Lorasearch | None = None

    def reader(self) -> Lorasearch:
        ls = getattr(self._local, "ls", None)
        if ls is None:
            ls = Lorasearch(self.index_path, device=self.device, readonly=True)
            self._local.ls = ls
            with self._opened_lock:
                self._opened.append(ls)
        return ls

    @contextmanager
    def writer(self) -> Iterator[Lorasearch]:
        if not self._write_lock.acquire(blocking=False):
            note(f"a write waits for another write request (up to {self.write_wait:g}s)")
            if not self._write_lock.acquire(timeout=self.write_wait):
                raise IndexLockedError(f"{self.index_path}: another write request is still running after "
                                       f"{self.write_wait:g}s; retry later")
        try:
            if self._writer is None:
                self._writer = Lorasearch(self.index_path, device=self.device, lock_timeout=0.0)
            yield self._writer
        finally:
            self._write_lock.release()

    def run_write(self, fn):
        """``fn(ls)`` holding the index's writer lock; if another process holds it, say so on
        stderr and wait at most ``write_wait`` seconds (then ``IndexLockedError``)."""
        with self.writer() as ls, ExitStack() as held:
            try:
                held.enter_context(ls.index.writer(timeout=0))
            except IndexLockedError as e:
                if self.write_wait <= 0:
                    raise
                note(f"{e} -- waiting up to {self.write_wait:g}s")
                held.enter_context(ls.index.writer(timeout=self.write_wait))
            return fn(ls)

    def close(self) -> None:
        with self._opened_lock:
            for ls in self._opened:
                try:
                    ls.close()
                except Exception:  # noqa: BLE001 -- closing at shutdown; nothing left to report to
                    pass
            self._opened.clear()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def note(message: str) -> None:
    print(f"lorasearch serve: note: {message}", file=sys.stderr, flush=True)
