"""Direct element-range reads of the store's 1-D sharded Zarr v3 arrays (sharding_indexed over blosc).

Why not zarr-python: its generic path costs an event-loop round trip and ~100 Python objects per slice (tasks,
coroutines, indexers), and that garbage makes the collector run full passes over the whole process (100-250 ms
each with torch loaded), stalling every thread. Here a slice costs one pread per run of stored inner chunks and
one blosc decompress per chunk straight into the caller's array (a scratch chunk only at the slice's ends),
with the GIL released in both, so the loader's reader threads decode in parallel. The layout is checked from
zarr.json when an array is opened; anything else (another codec chain, big-endian, no sharding) gives None and
the caller reads it through zarr.

In object storage (an S3Path) the same layout is read with byte-range requests instead of preads: a window's
reads are planned first (`fetch_remote`: the shard indexes it lacks, then every chunk span it needs, each round
all in flight at once through location.py) and then decoded from the fetched buffers by the same code, crc32c
checks included.

Verified reads: the writer appends a crc32c to every inner chunk (codec chain bytes -> blosc -> crc32c) and
writes every chunk, so here each chunk read is checked before it is decoded, and a shard file or chunk that is
absent inside the array is an error naming the file (it would otherwise read as zeros). Arrays written before
(no crc32c) are read as before, absent chunks as fill values: stores of that writer are verified by their
per-shard sha256 when first opened instead (verify.py).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from sclabel_dist.data.stores.location import S3Path, fetch_ranges, fetch_tails, is_remote
from sclabel_dist.errors import SclabelError

_EMPTY = np.uint64(2**64 - 1)  # a shard index entry (offset, nbytes) of an inner chunk never written
_CHECKSUM_BYTES = 4  # crc32c after the shard index, and after each chunk when the chain ends in crc32c


class ShardedArray:
    """A 1-D sharded blosc array: shard indexes loaded once per shard file, chunks decoded on demand."""

    def __init__(self, path: Path | S3Path, meta: dict):
        self.path = path
        self.remote = is_remote(path)
        self.size = int(meta["shape"][0])
        self.dtype = np.dtype(meta["data_type"])
        self.shard = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        config = meta["codecs"][0]["configuration"]
        self.chunk = int(config["chunk_shape"][0])
        self.chunks_per_shard = self.shard // self.chunk
        # Written with a crc32c per chunk (and every chunk stored): verify each chunk, refuse absent ones.
        self.checked = [c["name"] for c in config["codecs"]][-1] == "crc32c"
        self.fill = self.dtype.type(meta.get("fill_value") or 0)
        sep = meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/")
        self._key = "c" + sep + "{}"
        self._index: dict[int, np.ndarray | None] = {}
        self._fetching: dict[int, Future] = {}  # object stores: shard indexes being fetched by some thread
        self._lock = threading.Lock()

    def _shard_index(self, s: int) -> np.ndarray | None:
        """(chunks_per_shard, 2) uint64 (offset, nbytes) of shard file s; None when the file is absent."""
        if s in self._index:
            return self._index[s]
        file = self.path / self._key.format(s)
        n = self.chunks_per_shard * 16
        if self.remote:
            self._set_index(s, fetch_tails([file], [n + _CHECKSUM_BYTES])[0])
            return self._index[s]
        try:
            with open(file, "rb") as f:
                f.seek(-(n + _CHECKSUM_BYTES), os.SEEK_END)
                raw = f.read(n + _CHECKSUM_BYTES)
        except FileNotFoundError:
            index = None
        except OSError as exc:
            raise SclabelError(f"{file}: cannot read the shard index ({exc})") from None
        else:
            _check_crc(raw[:n], raw[n:], file)
            index = np.frombuffer(raw[:n], dtype="<u8").reshape(-1, 2)
        with self._lock:
            self._index[s] = index
        return index

    def _set_index(self, s: int, raw: Any) -> None:
        """Record shard file s's index from its fetched tail (None: the object does not exist)."""
        index = None
        if raw is not None:
            n = self.chunks_per_shard * 16
            file = self.path / self._key.format(s)
            if len(raw) < n + _CHECKSUM_BYTES:
                raise SclabelError(f"{file}: truncated shard ({len(raw)} bytes, its index alone is {n + 4})")
            raw = bytes(raw)
            _check_crc(raw[:n], raw[n:], file)
            index = np.frombuffer(raw[:n], dtype="<u8").reshape(-1, 2)
        with self._lock:
            self._index[s] = index

    def file(self, s: int) -> Any:
        return self.path / self._key.format(s)

    def spans(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """(shard file, byte start, byte length) that read_into(lo, hi) reads (indexes must be loaded)."""
        out = []
        for s, base, pos, end in self._shard_spans(lo, hi):
            index = self._index.get(s)
            if index is None:
                continue  # read_into raises (or fills) for an absent shard file
            rows = index[(pos - base) // self.chunk : (end - 1 - base) // self.chunk + 1]
            rows = rows[rows[:, 0] != _EMPTY]
            if len(rows):
                start = int(rows[:, 0].min())
                out.append((s, start, int((rows[:, 0] + rows[:, 1]).max()) - start))
        return out

    def read_into(self, lo: int, hi: int, out: np.ndarray, fetched: dict | None = None) -> None:
        """out[:] = array[lo:hi] (out: 1-D, contiguous, hi - lo elements, this array's dtype).

        fetched: {(file, start, length): bytes} from fetch_remote (an object-store array reads nothing else)."""
        from numcodecs import blosc

        assert 0 <= lo <= hi <= self.size and out.shape == (hi - lo,) and out.dtype == self.dtype
        scratch = None
        for s, base, pos, end in self._shard_spans(lo, hi):
            index = self._shard_index(s)
            if index is None:
                if not self.checked:  # zarr's default skips a shard of fill values: no file is zeros
                    out[pos - lo : end - lo] = self.fill
                    continue
                # That writer stores every chunk: an absent shard file is lost data, not zeros.
                raise SclabelError(
                    f"{self.path / self._key.format(s)}: shard file missing (elements {pos}-{end} of "
                    f"{self.path}); the store is damaged, see `sclabel-data validate`"
                )
            c0, c1 = (pos - base) // self.chunk, (end - 1 - base) // self.chunk + 1
            offsets, nbytes = index[c0:c1, 0], index[c0:c1, 1]
            stored = offsets != _EMPTY
            buf, start = self._read_stored(s, offsets[stored], nbytes[stored], fetched)
            for c in range(c0, c1):
                e0 = base + c * self.chunk
                a, b = max(pos, e0), min(end, e0 + self.chunk)
                dst = out[a - lo : b - lo]
                if not stored[c - c0]:
                    if self.checked:  # that writer stores every chunk, fill-valued ones included
                        raise SclabelError(
                            f"{self.path / self._key.format(s)}: chunk {c} missing (elements {a}-{b} of "
                            f"{self.path}); the store is damaged, see `sclabel-data validate`"
                        )
                    dst[:] = self.fill
                    continue
                off = int(offsets[c - c0]) - start
                src = buf[off : off + int(nbytes[c - c0])]
                if self.checked:
                    src = _verified(src, self.path / self._key.format(s), c)
                if b - a == self.chunk:
                    blosc.decompress(src, dst)  # the whole chunk: straight into the output
                else:
                    if scratch is None:
                        scratch = np.empty(self.chunk, dtype=self.dtype)
                    blosc.decompress(src, scratch)
                    dst[:] = scratch[a - e0 : b - e0]

    def will_need(self, lo: int, hi: int) -> None:
        """Start reading the stored bytes of elements [lo, hi) into the page cache, asynchronously.

        A cold read is one blocking pread per slice, so a reader thread has one request in flight and waits
        on each; this hint queues every slice of a window at once (read_into then finds them cached)."""
        if self.remote:
            return  # object stores: fetch_remote requests a window's bytes up front instead
        for s, base, pos, end in self._shard_spans(lo, hi):
            index = self._shard_index(s)
            if index is not None:
                rows = index[(pos - base) // self.chunk : (end - 1 - base) // self.chunk + 1]
                rows = rows[rows[:, 0] != _EMPTY]
                if len(rows):
                    start = int(rows[:, 0].min())
                    span = int((rows[:, 0] + rows[:, 1]).max()) - start
                    fd = os.open(self.path / self._key.format(s), os.O_RDONLY)
                    try:
                        os.posix_fadvise(fd, start, span, os.POSIX_FADV_WILLNEED)
                    finally:
                        os.close(fd)

    def _shard_spans(self, lo: int, hi: int):
        """(shard number, its first element, span start, span end) for each shard that [lo, hi) touches."""
        pos = lo
        while pos < hi:
            s = pos // self.shard
            base = s * self.shard
            end = min(hi, base + self.shard)
            yield s, base, pos, end
            pos = end

    def _read_stored(
        self, s: int, offsets: np.ndarray, nbytes: np.ndarray, fetched: dict | None = None
    ) -> tuple[np.ndarray, int]:
        """The bytes spanning the given stored chunks of shard file s, and the file offset they start at."""
        if len(offsets) == 0:
            return np.empty(0, dtype=np.uint8), 0
        start = int(offsets.min())
        span = int((offsets + nbytes).max()) - start
        if self.remote:
            key = (str(self.file(s)), start, span)
            got = fetched.get(key) if fetched is not None else None
            if got is None:  # a read not planned by fetch_remote (a single-array caller): fetch it now
                got = fetch_ranges([(self.file(s), [start], [start + span])])[0][0]
            if len(got) != span:
                raise SclabelError(f"{self.file(s)}: truncated shard ({len(got)} of {span} bytes)")
            return np.frombuffer(got, dtype=np.uint8), start
        buf = np.empty(span, dtype=np.uint8)  # not zero-filled: the pread overwrites it
        # One pread: zarr writes a shard's chunks back to back in order, so the span is what is needed.
        fd = os.open(self.path / self._key.format(s), os.O_RDONLY)
        try:
            got = os.preadv(fd, [buf], start)
        finally:
            os.close(fd)
        if got != span:
            raise SclabelError(f"{self.path / self._key.format(s)}: truncated shard ({got} of {span} bytes)")
        return buf, start


def fetch_remote(requests: Sequence[tuple[ShardedArray, int, int]]) -> dict:
    """The bytes that read_into(lo, hi) needs for every (array, lo, hi) of object-store arrays, fetched in two
    concurrent rounds: the shard indexes not yet cached, then every chunk span (one get_ranges per object).
    Returns the `fetched` mapping read_into takes."""
    _load_indexes(requests)
    per_file: dict[str, tuple[Any, set[tuple[int, int]]]] = {}
    for a, lo, hi in requests:
        for s, start, span in a.spans(lo, hi):
            f = a.file(s)
            per_file.setdefault(str(f), (f, set()))[1].add((start, span))
    plan = [(f, sorted(r)) for f, r in per_file.values()]
    got = fetch_ranges([(f, [a for a, _ in r], [a + n for a, n in r]) for f, r in plan])
    return {
        (str(f), start, span): buf
        for (f, r), bufs in zip(plan, got, strict=True)
        for (start, span), buf in zip(r, bufs, strict=True)
    }


def _load_indexes(requests: Sequence[tuple[ShardedArray, int, int]]) -> None:
    """Fetch the shard indexes the requests need that are not cached, all at once. An index another reader
    thread is already fetching is waited for, not fetched again: the first windows of a stream all start
    with cold indexes, and without this each would fetch every one of them (more requests queued ahead of
    the first batch's own)."""
    mine: dict[tuple[int, int], tuple[ShardedArray, int, Future]] = {}
    theirs: list[Future] = []
    for a, lo, hi in requests:
        for s, *_ in a._shard_spans(lo, hi):
            with a._lock:
                if s in a._index or (id(a), s) in mine:
                    continue
                if s in a._fetching:
                    theirs.append(a._fetching[s])
                else:
                    fut: Future = Future()
                    a._fetching[s] = fut
                    mine[(id(a), s)] = (a, s, fut)
    if mine:
        todo = list(mine.values())
        error: BaseException | None = None
        try:
            tails = fetch_tails(
                [a.file(s) for a, s, _ in todo],
                [a.chunks_per_shard * 16 + _CHECKSUM_BYTES for a, _, _ in todo],
            )
            for (a, s, _), raw in zip(todo, tails, strict=True):
                a._set_index(s, raw)
        except BaseException as exc:
            error = exc
            raise
        finally:  # waiters get the index (now cached) or this thread's error
            for a, s, fut in todo:
                with a._lock:
                    a._fetching.pop(s, None)
                if error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(error)
    for fut in theirs:
        fut.result()


def _verified(chunk: np.ndarray, file: Path, c: int) -> np.ndarray:
    """The chunk without its trailing crc32c, after checking it (google_crc32c: zarr's own dependency)."""
    import google_crc32c

    body = chunk[:-_CHECKSUM_BYTES]
    if len(chunk) < _CHECKSUM_BYTES or google_crc32c.value(body) != int.from_bytes(
        chunk[-_CHECKSUM_BYTES:].tobytes(), "little"
    ):
        raise SclabelError(
            f"{file}: chunk {c} fails its crc32c check (corrupt shard; see `sclabel-data validate`)"
        )
    return body


def _check_crc(payload: bytes, stored: bytes, file: Path) -> None:
    try:
        import google_crc32c
    except ImportError:  # zarr's crc32c codec needs it, so it is normally there
        return
    if google_crc32c.value(payload) != int.from_bytes(stored, "little"):
        raise SclabelError(f"{file}: shard index checksum mismatch (corrupt or half-written shard)")


def has_chunk_checksums(path: Path | S3Path) -> bool:
    """Whether the sharded array at `path` was written with a crc32c per inner chunk (checked on every read)."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
        inner = meta["codecs"][0]["configuration"]["codecs"]
        return meta["codecs"][0]["name"] == "sharding_indexed" and inner[-1]["name"] == "crc32c"
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return False


def open_sharded(path: Path | S3Path) -> ShardedArray | None:
    """The array at `path` when its zarr.json is the layout read here, else None (read it through zarr)."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    return ShardedArray(path, meta) if _supported(meta) else None


def read_whole(path: Path) -> np.ndarray | None:
    """All of a local one-chunk 1-D array in the writer's layout for small arrays (bytes -> zstd -> crc32c:
    a shard's indptr), read with one file read and checked; None for any other layout (read it with zarr).

    Opening a store reads every shard's indptr: through zarr that is a group, an array and an event-loop
    round trip per shard (~14 ms each, and importing zarr itself), here one read and one decompress."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
        codecs = [c["name"] for c in meta["codecs"]]
        size = int(meta["shape"][0])
        ok = (
            meta["zarr_format"] == 3
            and meta["node_type"] == "array"
            and len(meta["shape"]) == 1
            and meta["chunk_grid"]["name"] == "regular"
            and int(meta["chunk_grid"]["configuration"]["chunk_shape"][0]) >= size > 0
            and meta.get("chunk_key_encoding", {"name": "default"})["name"] == "default"
            and not meta.get("storage_transformers")
            and codecs == ["bytes", "zstd", "crc32c"]
            and meta["codecs"][0].get("configuration", {}).get("endian", "little") == "little"
            and np.little_endian
        )
        dtype = np.dtype(meta["data_type"])
        sep = meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/")
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None
    if not ok or dtype.kind not in "iu":
        return None
    file = path / f"c{sep}0"
    try:
        raw = file.read_bytes()
    except FileNotFoundError:  # zarr does not write a chunk of fill values (and reads it as such)
        return np.full(size, meta.get("fill_value") or 0, dtype=dtype)
    except OSError as exc:
        raise SclabelError(f"{file}: unreadable ({exc})") from None
    import google_crc32c
    from numcodecs import zstd

    body = raw[:-_CHECKSUM_BYTES]
    if len(raw) < _CHECKSUM_BYTES or google_crc32c.value(body) != int.from_bytes(
        raw[-_CHECKSUM_BYTES:], "little"
    ):
        raise SclabelError(f"{file}: fails its crc32c check (corrupt shard; see `sclabel-data validate`)")
    try:
        out = np.frombuffer(zstd.decompress(body), dtype=dtype.newbyteorder("<"))
    except (RuntimeError, ValueError) as exc:
        raise SclabelError(f"{file}: cannot decompress ({exc})") from None
    if len(out) < size:
        raise SclabelError(f"{file}: {len(out)} elements, zarr.json says {size} (damaged shard)")
    return out[:size]


def _supported(meta: dict) -> bool:
    try:
        if meta["zarr_format"] != 3 or meta["node_type"] != "array" or len(meta["shape"]) != 1:
            return False
        dtype = np.dtype(meta["data_type"])
        grid = meta["chunk_grid"]
        key = meta.get("chunk_key_encoding", {"name": "default"})
        if dtype.kind not in "uif" or grid["name"] != "regular" or key["name"] != "default":
            return False
        if meta.get("storage_transformers") or len(meta["codecs"]) != 1:
            return False
        shard = meta["codecs"][0]
        config = shard["configuration"]
        chunk = int(config["chunk_shape"][0])
        if shard["name"] != "sharding_indexed" or config.get("index_location", "end") != "end":
            return False
        if int(grid["configuration"]["chunk_shape"][0]) % chunk:
            return False
        inner = [c["name"] for c in config["codecs"]]
        index = [c["name"] for c in config["index_codecs"]]
        little = all(
            c.get("configuration", {}).get("endian", "little") == "little"
            for c in config["codecs"] + config["index_codecs"]
            if c["name"] == "bytes"
        )
        fill = meta.get("fill_value", 0)
        return (
            inner in (["bytes", "blosc"], ["bytes", "blosc", "crc32c"])
            and index == ["bytes", "crc32c"]
            and little
            and isinstance(fill, int | float)
            and np.little_endian
        )
    except (KeyError, TypeError, ValueError, IndexError):
        return False
