"""Atomic writes: every file or directory that others read is built under a temp name beside it, then renamed.

One rule for all writers (stores, bundles, checkpoints, outputs): a reader, or a run after a crash, sees the
old version or the new one, never half of either; a failed write leaves no temp behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temp_path(path: Path, tag: str = "tmp") -> Path:
    """`.NAME.TAG-PID` beside `path`: hidden, and named by its writer's pid so that stale ones can be told apart."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


def remove(path: Path) -> None:
    """Remove a file or a directory tree if present."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write to a temp file, fsync, then rename over `path`; a failed write (disk full) leaves no temp file."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, obj: Any, *, indent: int = 1, sort_keys: bool = False) -> None:
    """`obj` as JSON, written by write_text_atomic."""
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys))


def replace_into_place(src: Path, dst: Path, aside: Path | None = None) -> None:
    """Rename `src` onto `dst`. An existing directory `dst` (which os.replace cannot overwrite unless empty) is
    first moved to `aside` and removed after, so `dst` is never a half-written directory."""
    if dst.is_dir() and not dst.is_symlink():
        aside = aside or temp_path(dst, "old")
        remove(aside)
        os.replace(dst, aside)
        os.replace(src, dst)
        remove(aside)
    else:
        os.replace(src, dst)


@contextmanager
def replaced_on_success(path: str | Path, tag: str = "tmp") -> Iterator[Path]:
    """Yield a fresh temp path beside `path` (write a file or build a directory there); renamed onto `path`
    when the block ends without error, removed when it raises (or when the rename itself fails)."""
    path = Path(path)
    tmp = temp_path(path, tag)
    remove(tmp)
    try:
        yield tmp
        replace_into_place(tmp, path)
    finally:
        remove(tmp)
