"""StoreWriter: stream CSR row blocks of one dataset into a cell store, atomically (layout in format.py).

Crash safety: a new store is built in a sibling temp directory and renamed into place at close; an append
writes its shards under shards/.tmp-*, renames them into place, and replaces index.json LAST. A SIGKILL at any
point leaves the old store (still valid) or nothing with an index.json; stale temp dirs are removed by the
next writer. Memory is bounded by one part (rows_per_shard rows) whatever the input size.
Concurrency: a writer holds the store's lock (store_lock.py) from reading the index to replacing it. Several
datasets appended by one command share one index and commit once (`commit=False`, then `commit_appends`).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from data_tools.part_buffer import PartBuffer, release_freed_memory
from data_tools.store_lock import StoreLock
from data_tools.tempfiles import clean_stale
from sclabel_dist.atomic import replace_into_place, write_json_atomic
from sclabel_dist.data import format as fmt
from sclabel_dist.data.input_rules import check_values
from sclabel_dist.errors import SclabelError
from sclabel_dist.vocab import GeneVocab

MODES = ("create", "append", "overwrite")
_DATASET_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def _tmp_prefix(store: Path) -> str:
    """Temp names beside a store: '.NAME.tmp-<pid>...' (a staged store's own temps share its prefix)."""
    return f".{store.name.lstrip('.')}.tmp-"


def _compressor(name: str, kind: str) -> tuple[Any, Any]:
    from zarr.codecs import BloscCodec, Crc32cCodec

    # lz4 rather than zstd: random 256-row reads ran 1.7x faster for 17% more disk, and the loader is
    # decode-bound. Bitshuffle suits small integer counts (4.6x smaller); gene indices compress the same with
    # byte shuffle (1.6x) and decode 1.3x faster (bitshuffle was a third of the loader's decode time);
    # byte shuffle suits float32.
    bitshuffle = kind != "f" and name != fmt.INDICES
    # A crc32c per inner chunk (4 bytes, ~0.05 ms per MB to check) lets the loader verify every read.
    return BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle" if bitshuffle else "shuffle"), Crc32cCodec()


def _checked() -> tuple[Any, Any]:
    """zstd (zarr's default) plus a crc32c: indptr and obs codes are verified on read like the rows."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return ZstdCodec(), Crc32cCodec()


# the same bytes in any process (see format.zarr_own_pipeline)
@fmt.zarr_own_pipeline()
def write_part(
    part_dir: Path,
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    obs_codes: Mapping[str, np.ndarray],
    value_kind: str,
    num_genes: int,
    mean_nnz: float,
    dataset: str,
) -> tuple[str, str]:
    """Write one shard group (indptr, indices, data, obs codes); returns (indices dtype, data dtype)."""
    import zarr

    num_rows, nnz = len(indptr) - 1, len(data)
    idx_dt = fmt.indices_dtype(num_genes)
    max_value = float(data.max()) if nnz else 0.0
    val_dt = fmt.data_dtype(value_kind, max_value)
    chunk = fmt.chunk_elements(mean_nnz)
    shard = min(fmt.shard_elements(mean_nnz), max(chunk, -(-nnz // chunk) * chunk))
    group = zarr.open_group(
        str(part_dir),
        mode="w",
        attributes={"num_rows": num_rows, "nnz": nnz, "value_kind": value_kind, "dataset": dataset},
    )
    indptr = indptr.astype(np.uint64)
    group.create_array(
        fmt.INDPTR, shape=indptr.shape, chunks=indptr.shape, dtype=np.uint64, compressors=_checked()
    )[:] = indptr
    for name, values, dt in ((fmt.INDICES, indices, idx_dt), (fmt.DATA, data, val_dt)):
        arr = group.create_array(
            name,
            shape=(nnz,),
            chunks=(chunk,),
            shards=(shard,),
            dtype=dt,
            compressors=_compressor(name, dt.kind),
            fill_value=0,
            # Every chunk stored, zero-valued ones too: the reader treats an absent chunk as lost data.
            config={"write_empty_chunks": True},
        )
        if nnz:
            arr[:] = values.astype(dt, copy=False)
    for col, codes in obs_codes.items():
        n = max(len(codes), 1)
        group.create_array(
            f"{fmt.OBS_GROUP}/{col}", shape=codes.shape, chunks=(n,), dtype=np.int32, compressors=_checked()
        )[:] = codes
    return idx_dt.name, val_dt.name


def checked_block(matrix: sp.csr_matrix, value_kind: str, source: str, first_row: int) -> sp.csr_matrix:
    """A block's rows checked for the value kind and narrowed to what a part buffers (uint32/float32, int32).

    Shared by StoreWriter and the parallel part writer (ingest_parts.py), so both store the same bytes.
    """
    if not matrix.has_canonical_format:
        matrix = matrix.copy()
        matrix.sum_duplicates()
    check_values(matrix, value_kind, source, first_row)
    # Narrow the buffered values now (float64 -> 4 bytes): the pending part is the writer's whole memory.
    # check_values above bounds the values by the stored dtype, so neither cast can overflow.
    if value_kind == "lognorm":
        matrix.data = matrix.data.astype(np.float32, copy=False)
    else:
        matrix.data = matrix.data.astype(np.uint32, copy=False)
    matrix.indices = matrix.indices.astype(np.int32, copy=False)
    return matrix


def _encode_categories(values: np.ndarray, categories: list[str]) -> np.ndarray:
    """int32 codes of `values` into `categories` (extended in first-seen order); missing values get -1.

    Vectorised with pandas.factorize: only the few distinct values go through Python, not every cell.
    """
    import pandas as pd

    series = pd.Series(values, dtype=object)
    missing = series.isna().to_numpy()
    local, uniques = pd.factorize(series.where(missing, series.astype(str)), use_na_sentinel=True)
    if len(uniques) == 0:  # every value missing
        return np.full(len(values), fmt.MISSING_CODE, dtype=np.int32)
    lookup = {c: i for i, c in enumerate(categories)}
    table = np.empty(len(uniques), dtype=np.int32)
    for k, key in enumerate(uniques):
        if key not in lookup:
            lookup[key] = len(categories)
            categories.append(key)
        table[k] = lookup[key]
    return np.where(local >= 0, table[np.maximum(local, 0)], fmt.MISSING_CODE).astype(np.int32)


class StoreWriter:
    """Write one dataset into a store: write_block(csr in vocab space, obs) ..., then close() -> StoreIndex."""

    def __init__(
        self,
        store: str | Path,
        vocab: GeneVocab,
        dataset: str,
        *,
        value_kind: str,
        obs_columns: Sequence[str] = (),
        rows_per_shard: int | None = None,
        mean_nnz_hint: float | None = None,
        mode: str = "create",
        source: str = "",
        match_report: dict | None = None,
        index: fmt.StoreIndex | None = None,
        commit: bool = True,
    ):
        if mode not in MODES:
            raise SclabelError(f"store mode {mode!r}: choose from {MODES}")
        if value_kind not in fmt.VALUE_KINDS:
            raise SclabelError(f"value_kind {value_kind!r}: choose from {fmt.VALUE_KINDS}")
        if not _DATASET_NAME.match(dataset):
            raise SclabelError(f"dataset name {dataset!r}: use letters, digits, '_', '.', '-'")
        self.store = Path(store)
        self.vocab = vocab
        self.dataset = dataset
        self.value_kind = value_kind
        self.obs_columns = list(obs_columns)
        self.rows_per_shard = rows_per_shard
        self.mean_nnz = mean_nnz_hint
        self.mode = mode
        self.source = source
        self.match_report = match_report
        # commit=False (append only): close() keeps the shards staged and extends `index` in memory; the
        # caller, holding the store lock, commits every dataset with one index (commit_appends).
        self.commit = commit
        if not commit and mode != "append":
            raise SclabelError("StoreWriter(commit=False) is for appends; a new store commits by its rename")
        self.num_rows = 0
        self.nnz = 0
        self._part: PartBuffer | None = None  # allocated at the first block, once its dtype is known
        self._shards: list[fmt.ShardEntry] = []
        self._closed = False
        self._lock = StoreLock(self.store)
        self._lock.acquire()
        self._locked = True
        try:
            self._stage_root = self._prepare(index)
        except BaseException:
            self._unlock()
            raise

    # -- setup ------------------------------------------------------------------------------------------

    def _prepare(self, index: fmt.StoreIndex | None) -> Path:
        """Pick the temp root we write under and load the existing index (or extend the given one) in append mode."""
        parent = self.store.parent
        parent.mkdir(parents=True, exist_ok=True)
        clean_stale(parent, _tmp_prefix(self.store))
        if self.mode == "append":
            self.index = index if index is not None else fmt.read_index(self.store)
            if self.index.vocab_hash != self.vocab.hash:
                raise SclabelError(
                    f"{self.store}: store vocabulary hash {self.index.vocab_hash[:12]} differs from this "
                    f"vocabulary {self.vocab.hash[:12]}; ingest with --vocab {self.store / fmt.VOCAB_FILE}"
                )
            if any(d.name == self.dataset for d in self.index.datasets):
                raise SclabelError(
                    f"{self.store}: dataset {self.dataset!r} already in the store; pick another --dataset-name"
                )
            shards = self.store / fmt.SHARDS_DIR
            clean_stale(shards, ".tmp-")
            # A dataset dir that index.json does not list was left by an append killed before its commit.
            shutil.rmtree(shards / self.dataset, ignore_errors=True)
            self._final_root = self.store
            root = shards / f".tmp-{os.getpid()}-{self.dataset}"
            root.mkdir(parents=True)
            return root
        if self.mode == "create" and self.store.exists():
            raise SclabelError(f"{self.store}: already exists; use --append to add a dataset or --overwrite")
        if self.mode == "overwrite":
            check_replaceable(self.store)
        self.index = fmt.StoreIndex(vocab_hash=self.vocab.hash, num_genes=len(self.vocab))
        self._final_root = parent / f"{_tmp_prefix(self.store)}{os.getpid()}"
        shutil.rmtree(self._final_root, ignore_errors=True)
        (self._final_root / fmt.SHARDS_DIR).mkdir(parents=True)
        self.vocab.to_json(self._final_root / fmt.VOCAB_FILE)
        root = self._final_root / fmt.SHARDS_DIR / f".tmp-{os.getpid()}-{self.dataset}"
        root.mkdir()
        return root

    # -- writing ----------------------------------------------------------------------------------------

    def _codes(self, obs: Mapping[str, Any] | None, n: int) -> dict[str, np.ndarray]:
        out = {}
        for col in self.obs_columns:
            if obs is None or col not in obs:
                raise SclabelError(f"{self.source or self.dataset}: obs column {col!r} missing in block")
            values = np.asarray(obs[col], dtype=object)
            if len(values) != n:
                raise SclabelError(f"obs column {col!r}: {len(values)} values for {n} rows")
            cats = self.index.obs_columns.setdefault(col, [])
            out[col] = _encode_categories(values, cats)
        return out

    def write_block(self, matrix: Any, obs: Mapping[str, Any] | None = None) -> None:
        """Append rows (CSR with num_genes columns, vocabulary space) and their obs values."""
        matrix = sp.csr_matrix(matrix)
        if matrix.shape[1] != len(self.vocab):
            raise SclabelError(
                f"block has {matrix.shape[1]} columns; the vocabulary has {len(self.vocab)} (remap first)"
            )
        if matrix.shape[0] == 0:
            return
        pending = self._part.num_rows if self._part is not None else 0
        matrix = checked_block(matrix, self.value_kind, self.source or self.dataset, self.num_rows + pending)
        if self.mean_nnz is None:
            self.mean_nnz = matrix.nnz / matrix.shape[0]
        if self.rows_per_shard is None:
            self.rows_per_shard = fmt.rows_per_part(self.mean_nnz)
        if self._part is None:
            nnz_hint = int(self.rows_per_shard * self.mean_nnz * 1.25)
            self._part = PartBuffer(
                self.rows_per_shard, nnz_hint, len(self.vocab), matrix.data.dtype, self.obs_columns
            )
        codes = self._codes(obs, matrix.shape[0])
        start = 0
        while start < matrix.shape[0]:
            stop = min(matrix.shape[0], start + self._part.room)
            self._part.add(matrix, codes, start, stop)
            start = stop
            if self._part.room == 0:
                self._flush()

    def _flush(self) -> None:
        """Write the buffered rows as one part and empty the buffer."""
        assert self._part is not None and self._part.num_rows
        part = self._part
        part_rel = f"{fmt.SHARDS_DIR}/{self.dataset}/{fmt.part_name(len(self._shards))}"
        part_dir = self._stage_root / fmt.part_name(len(self._shards))
        n, nnz = part.num_rows, part.nnz
        idx_dt, val_dt = write_part(
            part_dir,
            part.indptr[: n + 1],
            part.indices[:nnz],
            part.data[:nnz],
            {c: v[:n] for c, v in part.codes.items()},
            self.value_kind,
            len(self.vocab),
            self.mean_nnz or 1.0,
            self.dataset,
        )
        self._shards.append(
            fmt.ShardEntry(
                path=part_rel,
                dataset=self.dataset,
                num_rows=n,
                nnz=nnz,
                row_offset=self.index.num_rows + self.num_rows,
                value_kind=self.value_kind,
                indices_dtype=idx_dt,
                data_dtype=val_dt,
                sha256=fmt.shard_checksum(part_dir),
            )
        )
        self.num_rows += n
        self.nnz += nnz
        part.clear()
        release_freed_memory()

    # -- commit / abort -----------------------------------------------------------------------------------

    def close(self) -> fmt.StoreIndex:
        """Flush, move shards into place, write the report, then replace index.json last; returns the index.

        With commit=False only the flush and the in-memory index: the shards stay staged (see commit_appends).
        """
        if self._closed:
            return self.index
        try:
            if self._part is not None and self._part.num_rows:
                self._flush()
            self.index.datasets.append(
                fmt.DatasetEntry(
                    self.dataset, self.source, self.value_kind, self.num_rows, self.nnz, self._report_rel
                )
            )
            self.index.shards.extend(self._shards)
            self.index.num_rows += self.num_rows
            self.index.nnz += self.nnz
            self._closed = True
            if self.commit:
                self.publish()
                fmt.write_index(self._final_root, self.index)
                if self.mode != "append":
                    _swap_into_place(self._final_root, self.store)
        finally:
            self._unlock()
        return self.index

    def _unlock(self) -> None:
        if self._locked:
            self._locked = False
            self._lock.release()

    @property
    def _report_rel(self) -> str:
        return f"{fmt.REPORTS_DIR}/{self.dataset}.json"

    def publish(self) -> None:
        """Move the finished dataset's shards into place and write its report (index.json not yet)."""
        root = self._final_root
        os.replace(self._stage_root, root / fmt.SHARDS_DIR / self.dataset)
        (root / fmt.REPORTS_DIR).mkdir(exist_ok=True)
        write_json_atomic(root / self._report_rel, self.match_report or {})

    def abort(self) -> None:
        """Drop everything this writer wrote (also after an uncommitted close); an existing store is left untouched."""
        _settle_zarr_writes()
        self._unlock()
        self._closed = True
        shutil.rmtree(self._stage_root, ignore_errors=True)
        if self.mode != "append":
            shutil.rmtree(self._final_root, ignore_errors=True)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:  # the last flush or the commit failed (a full disk): drop what was staged
            self.abort()
            raise


def commit_appends(store: Path, index: fmt.StoreIndex, writers: Sequence[StoreWriter]) -> None:
    """Publish datasets closed with commit=False, then replace index.json once (the caller holds the lock).

    A kill before the index is replaced leaves unreferenced shards/<dataset> dirs, which the same command
    removes when it is run again (StoreWriter._prepare), so a multi-input append lands all or nothing.
    """
    for w in writers:
        w.publish()
    fmt.write_index(store, index)


def _settle_zarr_writes(timeout: float = 60.0) -> None:
    """Wait for zarr chunk writes still in flight after one of them failed.

    zarr writes a shard's chunks in one gather on its own event loop; when one write fails (a full disk) the
    error comes back at once while the others carry on. Left alone they could recreate files under a staged
    directory removed just after, and they die at exit with a page of asyncio tracebacks.
    """
    import asyncio

    from zarr.core import sync as zsync

    if zsync.loop[0] is None or not zsync.loop[0].is_running():
        return

    async def settle() -> None:
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if others:
            await asyncio.wait(others, timeout=timeout)

    zsync.sync(settle())


def check_replaceable(store: Path) -> None:
    """--overwrite replaces a cell store (or an empty directory), never a directory holding anything else."""
    if not store.exists() or (store.is_dir() and not any(store.iterdir())):
        return
    ours = {fmt.INDEX_FILE, fmt.VOCAB_FILE, fmt.REPORTS_DIR, fmt.SHARDS_DIR}
    try:
        fmt.read_index(store)
    except SclabelError:
        raise SclabelError(f"{store}: exists and is not a cell store; refusing to replace it") from None
    # (also the writer's own temp names: `.index.json.tmp-PID` of a run killed mid-commit)
    other = sorted(p.name for p in store.iterdir() if p.name not in ours and ".tmp-" not in p.name)
    if other:
        raise SclabelError(
            f"{store}: holds entries the store writer did not write ({', '.join(other[:5])}); "
            "refusing to replace it: move them out or choose another --out"
        )


def _swap_into_place(staged: Path, store: Path) -> None:
    """Rename a finished staged store onto `store`, moving an old one aside first (overwrite); the aside name
    shares the store's temp prefix, so a run killed in between leaves what clean_stale removes."""
    replace_into_place(staged, store, aside=store.parent / f"{_tmp_prefix(store)}{os.getpid()}-old")


@contextmanager
def staged_store(store: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A temp path to build a whole new store in (several datasets), renamed onto `store` on success only."""
    store = Path(store)
    if store.exists() and not overwrite:
        raise SclabelError(f"{store}: already exists; use --append to add a dataset or --overwrite")
    check_replaceable(store)
    store.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(store.parent, _tmp_prefix(store))
    staged = store.parent / f"{_tmp_prefix(store)}{os.getpid()}-staged"
    shutil.rmtree(staged, ignore_errors=True)
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    _swap_into_place(staged, store)
