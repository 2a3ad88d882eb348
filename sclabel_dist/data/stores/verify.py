"""Whole-shard sha256 checks for stores written without a crc32c per chunk, once per shard version.

Stores written before the writer added per-chunk crc32c (sharded.py checks those on every read) have only
the per-shard sha256 of index.json. Such shards are hashed when a store is first opened and the result is
remembered by each file's size and mtime, so the cost is paid once per shard version, not per run. A file
rewritten in place (new mtime) is hashed again; bit rot that keeps the mtime is caught only by
`sclabel-data validate` or a re-ingest (which adds the per-chunk checks). In object storage the verdict is
remembered by each object's size and ETag instead of the mtime.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sclabel_dist.data import format as fmt
from sclabel_dist.data.stores.location import as_path, is_remote
from sclabel_dist.errors import SclabelError

CACHE_ENV = "SCLABEL_CACHE_DIR"  # where the record of verified shards lives (default ~/.cache/sclabel-dist)


def cache_file() -> Path:
    root = (
        os.environ.get(CACHE_ENV)
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sclabel-dist"
    )
    return Path(root) / "verified-shards.json"


def _stamp(shard_dir: Path) -> list[list]:
    """[relative path, size, mtime_ns or ETag] of every file of a shard: what a cached verdict is valid for."""
    out = []
    for f in sorted((p for p in shard_dir.rglob("*") if p.is_file()), key=lambda p: p.relative_to(shard_dir)):
        st = f.stat()
        version = st.e_tag if is_remote(f) else st.st_mtime_ns
        out.append([f.relative_to(shard_dir).as_posix(), st.st_size, version])
    return out


def verify_shards(store: str | Path, shards: list[fmt.ShardEntry]) -> None:
    """Raise SclabelError naming the first shard whose files do not hash to index.json's sha256."""
    if not shards:
        return
    path = cache_file()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    changed = False
    for s in shards:
        d = as_path(store) / s.path
        d = d if is_remote(d) else d.resolve()
        if not d.is_dir():
            raise SclabelError(f"{d}: shard missing (listed in index.json)")
        stamp = _stamp(d)
        hit = cache.get(str(d))
        if hit == {"sha256": s.sha256, "files": stamp}:
            continue
        if fmt.shard_checksum(d) != s.sha256:
            raise SclabelError(
                f"{d}: shard checksum mismatch (corrupt or modified); see `sclabel-data validate`, or re-ingest"
            )
        cache[str(d)] = {"sha256": s.sha256, "files": stamp}
        changed = True
    if changed:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fmt.write_json_atomic(path, cache)
        except OSError:
            pass  # an unwritable cache only means hashing again next time
