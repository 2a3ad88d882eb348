"""ZarrCellStore: the sharded Zarr v3 cell store (layout in sclabel_dist/data/format.py) as a CellStore.

The runs of a read_rows call become element slices of `indices` and `data`. Arrays in the writer's layout
(sharding over blosc) are read directly (sharded.py: chunks decoded into one preallocated output per array, GIL
released, no zarr objects per slice), in the calling thread: the loader's reader threads are the parallelism.
Other layouts go through zarr, all slices in one asyncio.gather on its event loop (decoding in Rust threads with
the `zarrs` codec pipeline when it is installed).

A store at s3://bucket/prefix is read the same way, through byte-range requests: a read_rows call fetches every
byte range of its rows at once (sharded.fetch_remote) and then decodes; the loader's read-ahead keeps
`read_threads * read_ahead` windows in flight, which is what hides the per-request latency.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from sclabel_dist.data import format as fmt
from sclabel_dist.data.stores.base import CSRBlock, checked_rows, lognorm_flags, runs
from sclabel_dist.data.stores.location import as_path, is_remote
from sclabel_dist.data.stores.sharded import (
    ShardedArray,
    fetch_remote,
    has_chunk_checksums,
    open_sharded,
    read_whole,
)
from sclabel_dist.data.stores.verify import verify_shards
from sclabel_dist.errors import SclabelError
from sclabel_dist.vocab import GeneVocab


def use_zarrs_pipeline() -> bool:
    """Switch zarr to the Rust `zarrs` codec pipeline when installed (several times faster decoding)."""
    try:
        import zarr
        import zarrs  # noqa: F401
    except ImportError:
        return False
    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
    return True


class ZarrCellStore:
    """A cell store directory opened read-only: indptr of every shard in RAM, indices/data read on demand."""

    def __init__(
        self, uri: str | Path, *, zarrs: bool = True, direct: bool = True, vocab: GeneVocab | None = None
    ):
        """vocab: the run's vocabulary, used as this store's when its hash is the one index.json records
        (parsing vocab.json again costs ~0.1 s of a 20,000-gene vocabulary at every open)."""
        self.uri = str(uri)
        self.root = as_path(uri)
        self.remote = is_remote(self.root)
        # zarrs cannot read through obstore (format.zarr_pipeline); switched on by the first local array that
        # is read through zarr (the writer's layout is read without zarr: importing it alone takes ~0.2 s).
        self._zarrs = zarrs and not self.remote
        self.index = fmt.read_index(self.root)
        if vocab is not None and vocab.hash == self.index.vocab_hash:
            self.vocab = vocab
        else:
            self.vocab = GeneVocab.from_json(
                self.root / fmt.VOCAB_FILE, self.index.vocab_hash, fmt.INDEX_FILE
            )
        self.num_rows = self.index.num_rows
        self._offsets = self.index.row_offsets()
        # Each shard's opening is a few small reads: in object storage each is a round trip, so they overlap.
        with ThreadPoolExecutor(16 if self.remote else 1) as pool:
            opened = list(pool.map(lambda s: self._open_shard(s, direct), self.index.shards))
        # Shards written without per-chunk crc32c are checked whole, once per shard version (verify.py).
        verify_shards(
            self.root,
            [shard for shard, (legacy, *_) in zip(self.index.shards, opened, strict=True) if legacy],
        )
        self._indptr: list[np.ndarray] = [indptr for _, indptr, _ in opened]
        self._arrays: list[tuple[Any, Any]] = [arrays for _, _, arrays in opened]
        self._kinds = [
            (int(o), int(o) + s.num_rows, s.value_kind)
            for o, s in zip(self._offsets[:-1], self.index.shards, strict=True)
        ]

    def _open_shard(self, shard: fmt.ShardEntry, direct: bool) -> tuple[bool, np.ndarray, tuple[Any, Any]]:
        """(written without per-chunk crc32c, indptr, (indices, data) readers) of one shard."""
        where = self.root / shard.path
        fast = [open_sharded(where / name) for name in (fmt.INDICES, fmt.DATA)]
        if not self.remote and direct and fast[0] is not None and fast[1] is not None:
            # The writer's layout on local disk: no zarr at all (plain file reads; opening the store's shards
            # through zarr took most of the ~0.5 s before the first batch, benchmarks/RESULTS.md issue 20).
            whole = read_whole(where / fmt.INDPTR)
            if whole is not None:
                indptr = whole.astype(np.int64)
                self._check_indptr(indptr, shard, where)
                return not (fast[0].checked and fast[1].checked), indptr, (fast[0], fast[1])
        if self._zarrs:
            use_zarrs_pipeline()
        legacy = not all(has_chunk_checksums(where / n) for n in (fmt.INDICES, fmt.DATA))
        # indptr is checked here, once (crc32c by zarr, then its shape against the index), because a
        # wrong indptr would silently shift every row read through it.
        indptr, indices, data = fmt.open_shard_arrays(self.root, shard)
        self._check_indptr(indptr, shard, where)
        if direct and all(a is not None for a in fast):
            return legacy, indptr, (fast[0], fast[1])
        return legacy, indptr, (indices, data)

    @staticmethod
    def _check_indptr(indptr: np.ndarray, shard: fmt.ShardEntry, where: Any) -> None:
        if len(indptr) != shard.num_rows + 1 or indptr[0] != 0 or indptr[-1] != shard.nnz:
            raise SclabelError(f"{where}: indptr disagrees with index.json (damaged shard)")
        if np.any(indptr[1:] < indptr[:-1]):
            raise SclabelError(f"{where}: indptr not monotone (damaged shard)")

    @property
    def num_genes(self) -> int:
        return self.index.num_genes

    def value_kinds(self) -> list[tuple[int, int, str]]:
        return list(self._kinds)

    def _slices(self, rows: np.ndarray) -> tuple[list[tuple[int, int, int]], np.ndarray]:
        """(shard, lo, hi) element slices covering sorted `rows`, and the rows' lengths in order."""
        out, lengths = [], []
        for a, b in zip(*(x.tolist() for x in runs(rows)), strict=True):
            # A run that crosses a shard boundary is cut there: each shard has its own arrays.
            while a < b:
                s = int(np.searchsorted(self._offsets, a, side="right")) - 1
                end = min(b, int(self._offsets[s + 1]))
                ip = self._indptr[s]
                la, lb = a - int(self._offsets[s]), end - int(self._offsets[s])
                out.append((s, int(ip[la]), int(ip[lb])))
                lengths.append(np.diff(ip[la : lb + 1]))
                a = end
        return out, np.concatenate(lengths)

    def read_rows(self, rows: np.ndarray) -> CSRBlock:
        rows = checked_rows(rows, self.num_rows, self.uri)
        if len(rows) == 0:
            return CSRBlock.empty(self.num_genes)
        slices, lengths = self._slices(rows)
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        if all(isinstance(self._arrays[s][0], ShardedArray) for s, _, _ in slices):
            # rows scattered over a chunk (the elastic order's slices) are read as one span per chunk run:
            # a partial read decodes its whole chunk, so one read per row decoded each chunk dozens of times
            covers = [
                coalesce(slices, {s: self._arrays[s][k].chunk for s in {s for s, _, _ in slices}})
                for k in (0, 1)
            ]
            requests = [(self._arrays[s][k], lo, hi) for k in (0, 1) for s, lo, hi, _ in covers[k]]
            fetched = None
            if self.remote:  # every byte range of the window requested at once, then decoded
                fetched = fetch_remote(requests)
            else:
                for array, lo, hi in requests:
                    array.will_need(lo, hi)
            indices, data = (
                self._read_direct(slices, covers[k], k, int(indptr[-1]), fetched) for k in (0, 1)
            )
        else:
            parts = _gather([(self._arrays[s][k], lo, hi) for s, lo, hi in slices for k in (0, 1)])
            # Native dtypes (uint16 genes, uint8/uint16 counts) are kept: a cast would cost a pass per block.
            indices = np.concatenate(parts[0::2])
            data = np.concatenate(parts[1::2])
        return CSRBlock(indptr, indices, data, lognorm_flags(self._kinds, rows), self.num_genes)

    def _read_direct(
        self,
        slices: list[tuple[int, int, int]],
        covers: list[tuple[int, int, int, list[int]]],
        k: int,
        total: int,
        fetched: dict | None = None,
    ) -> np.ndarray:
        """Array k (0 indices, 1 data) over the element slices, decoded into one array (dtypes promoted);
        each cover (coalesce) is decoded once and its slices copied out."""
        out = np.empty(total, dtype=np.result_type(*{self._arrays[s][k].dtype for s, _, _ in slices}))
        at = np.concatenate([[0], np.cumsum([hi - lo for _, lo, hi in slices])]).tolist()
        for s, lo, hi, members in covers:
            array = self._arrays[s][k]
            if len(members) == 1 and array.dtype == out.dtype:
                array.read_into(lo, hi, out[at[members[0]] : at[members[0]] + hi - lo], fetched)
                continue
            # several slices in one span, or a shard of another dtype (uint8 and uint16 counts in one block)
            span = np.empty(hi - lo, dtype=array.dtype)
            array.read_into(lo, hi, span, fetched)
            for m in members:
                _, mlo, mhi = slices[m]
                out[at[m] : at[m] + mhi - mlo] = span[mlo - lo : mhi - lo]
        return out

    def obs_values(self, column: str) -> np.ndarray:
        if column not in self.index.obs_columns:
            raise SclabelError(
                f"{self.uri}: no obs column {column!r}; present: {sorted(self.index.obs_columns)}"
            )
        cats = np.array(list(self.index.obs_columns[column]) + [None], dtype=object)
        with ThreadPoolExecutor(16 if self.remote else 1) as pool:
            codes = np.concatenate(
                list(pool.map(lambda s: fmt.read_obs_codes(self.root, s, column), self.index.shards))
            )
        return cats[np.where(codes < 0, len(cats) - 1, codes)]

    def datasets(self) -> np.ndarray:
        names = np.array([s.dataset for s in self.index.shards], dtype=object)
        return np.repeat(names, [s.num_rows for s in self.index.shards])

    def close(self) -> None:
        self._arrays.clear()


def coalesce(
    slices: list[tuple[int, int, int]], chunk: Mapping[int, int] | Sequence[int]
) -> list[tuple[int, int, int, list[int]]]:
    """(shard, lo, hi, members): sorted element slices joined where the next one starts in the chunk the
    previous one ends in (chunk[shard] elements a chunk), so no chunk is decoded twice and none is decoded
    that no slice needs; members are the indices of the slices each span covers."""
    covers: list[list] = []
    for i, (s, lo, hi) in enumerate(slices):
        if covers:
            last = covers[-1]
            cs, clo, chi = last[:3]
            if cs == s and chi > clo and hi > lo and lo // chunk[s] <= (chi - 1) // chunk[s]:
                last[2] = max(chi, hi)
                last[3].append(i)
                continue
        covers.append([s, lo, hi, [i]])
    return [(s, lo, hi, members) for s, lo, hi, members in covers]


def _gather(requests: list[tuple[Any, int, int]]) -> list[np.ndarray]:
    """arr[lo:hi] for every request, fetched concurrently on zarr's event loop."""
    from zarr.core.sync import sync

    async def run() -> list[Any]:
        return await asyncio.gather(*(arr._async_array.getitem((slice(lo, hi),)) for arr, lo, hi in requests))

    return [np.asarray(x) for x in sync(run())]
