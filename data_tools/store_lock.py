"""One writer per store at a time: an exclusive flock held from reading the index to committing the new one.

Why: an append reads index.json at prepare and replaces it whole at commit, so two appends that overlap lose
one dataset (the later commit drops the earlier one's entry). The lock file sits beside the store
(`.NAME.lock`) so that creating, overwriting and appending all serialise on it, and it is removed by its
holder before release, so nothing is left behind. A waiter checks, after locking, that the file it locked is
still the one at the path (the holder may have unlinked it meanwhile) and retries otherwise.

Object storage has no flock: there the commit of index.json is a conditional put instead (If-None-Match for
a new store, If-Match on the ETag read at the start for an append; remote_store.py), so of two racing
writers one wins and the other fails cleanly. This lock is for local stores only (ingest stages an s3://
output on local disk, under a lock of its own temp directory).
"""

from __future__ import annotations

import fcntl
import os
import sys
import threading
from pathlib import Path

from sclabel_dist.errors import SclabelError

_held: dict[
    str, list[int]
] = {}  # lock path -> [fd, depth]: re-entrant within one process (ingest + its writers)
_guard = threading.Lock()


def lock_path(store: str | Path) -> Path:
    """The lock file of a store: `.NAME.lock` in its parent directory."""
    if "://" in str(store):
        raise SclabelError(
            f"{store}: object storage has no lock; `sclabel-data ingest -o s3://...` commits there with a "
            "conditional put instead (data_tools/remote_store.py)"
        )
    store = Path(store).absolute()
    return store.parent / f".{store.name.lstrip('.')}.lock"


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "another process"
    except OSError:
        return "another process"


class StoreLock:
    """acquire() blocks (saying once who holds it) until this process holds the store; release() undoes one acquire()."""

    def __init__(self, store: str | Path):
        self.path = lock_path(store)

    def acquire(self) -> None:
        key = str(self.path)
        with _guard:
            if key in _held:
                _held[key][1] += 1
                return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        told = False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not told:
                    print(
                        f"{self.path}: waiting for the writer holding it ({_holder(self.path)})",
                        file=sys.stderr,
                    )
                    told = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder unlinked it before releasing: lock the new file instead
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:200]}\n".encode())
        with _guard:
            _held[key] = [fd, 1]

    def release(self) -> None:
        key = str(self.path)
        with _guard:
            entry = _held.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _held[key]
        # Unlink while still holding it: a waiter then sees a stale inode and retries on a fresh file.
        self.path.unlink(missing_ok=True)
        os.close(entry[0])

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
