"""The writer lock: one writer per index across processes, readers never take it.

``fcntl.flock`` rather than a pid file with O_EXCL: the kernel drops the lock when the
holding process dies (even on SIGKILL), so a crashed writer can never leave a stale lock
that someone has to delete by hand. The holder writes its pid into the file only so the
refusal message can name it.
"""
from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from lorasearch.errors import IndexLockedError, UsageError


def holder_pid(path: str | os.PathLike) -> int | None:
    """The pid recorded by the current (or last) holder, or None if unknown."""
    try:
        text = Path(path).read_text().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


class WriterLock:
    """Exclusive, non-reentrant flock on ``path``; ``label`` names the index in messages."""

    def __init__(self, path: str | os.PathLike, label: str):
        self.path = Path(path)
        self.label = label
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, timeout: float = 0.0) -> None:
        """Take the lock, waiting at most ``timeout`` seconds (0 = fail at once)."""
        if self._fd is not None:
            raise RuntimeError("WriterLock.acquire called twice")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + max(0.0, float(timeout))
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    pid = holder_pid(self.path)
                    who = f"pid {pid}" if pid else "an unknown process"
                    waited = f" after waiting {timeout:g}s" if timeout else ""
                    raise IndexLockedError(
                        f"{self.label}: index is locked by another writer ({who}){waited}; "
                        "retry when it finishes or pass a lock timeout") from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "WriterLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class LockedWriterMixin:
    """Re-entrant use of a store's ``WriterLock``: the first ``_acquire`` takes the flock (waiting up
    to ``lock_timeout`` unless told otherwise), nested ones only count. Needs ``readonly``, ``root``,
    ``lock_timeout``, ``_lock`` (a WriterLock) and ``_lock_depth`` on the store."""

    def _acquire(self, timeout: float | None = None) -> None:
        if self.readonly:
            raise UsageError(f"{self.root}: index is open read-only")
        if self._lock_depth == 0:
            Path(self.root).mkdir(parents=True, exist_ok=True)
            self._lock.acquire(self.lock_timeout if timeout is None else timeout)
        self._lock_depth += 1

    def _release(self) -> None:
        self._lock_depth -= 1
        if self._lock_depth == 0:
            self._lock.release()

    @contextmanager
    def _writing(self) -> Iterator[None]:
        self._acquire()
        try:
            yield
        finally:
            self._release()
