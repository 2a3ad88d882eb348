"""The cell-store layout: index.json schema, array names, dtypes, chunk sizing and read helpers (single source of truth).

A store is a directory::

    STORE/
      index.json                      StoreIndex (below), replaced atomically and LAST by every writer
      vocab.json                      the GeneVocab all shards index into (its sha256 is index.vocab_hash)
      reports/<dataset>.json          the gene match report of each dataset
      shards/<dataset>/part_NNNNN/    one Zarr v3 group per shard, rows in global order
          zarr.json                   group attrs: {"num_rows", "nnz", "value_kind"}
          indptr                      uint64 [num_rows + 1], one chunk (held in RAM by readers)
          indices                     uint16 (num_genes <= 65535) else uint32 [nnz], gene index 0..num_genes-1
                                      (token id = gene index + NUM_SPECIAL); sharding codec, chunks sized in
                                      elements from the mean non-zeros per cell so one chunk holds a run of rows
          data                        [nnz]: counts in the smallest unsigned dtype holding the shard's max,
                                      float32 for log-normalised input (value_kind "lognorm"); same chunking
          obs/<column>                int32 [num_rows] codes into index.obs_columns[column]; -1 = missing

A store may also live at s3://bucket/prefix (stores/location.py): the same keys, except that a shard uploaded
by `ingest -o s3://...` is named `shards/<dataset>/part_NNNNN.<token>` (a random token per ingest run, so two
racing writers never overwrite each other's objects; ShardEntry.path holds the full name). index.json is put
last there too, by a conditional put (data_tools/remote_store.py).

Rows of a shard are CSR: row r is ``indices[indptr[r]:indptr[r+1]]``; a run [a, b) is one contiguous slice.
Within a row, gene indices are strictly increasing. Categories of obs columns are global to the store (in
index.json) and only ever extended, so appending a dataset never rewrites earlier shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sclabel_dist.atomic import write_json_atomic
from sclabel_dist.checksums import sha256_tree
from sclabel_dist.errors import SclabelError

FORMAT_NAME = "sclabel-cellstore"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
VOCAB_FILE = "vocab.json"
REPORTS_DIR = "reports"
SHARDS_DIR = "shards"
INDPTR = "indptr"
INDICES = "indices"
DATA = "data"
OBS_GROUP = "obs"
VALUE_KINDS = ("counts", "lognorm")
MISSING_CODE = -1

# Sizing targets, in elements: a chunk holds ~CHUNK_ROWS cells (one loader read), a part ~PART_NNZ non-zeros
# (bounded writer memory: one part is buffered), a zarr shard file ~SHARD_CHUNKS chunks (few files on disk).
CHUNK_ROWS = 64
PART_NNZ = 1 << 23
SHARD_CHUNKS = 64
MIN_CHUNK, MAX_CHUNK = 1 << 12, 1 << 21
MIN_PART_ROWS, MAX_PART_ROWS = 256, 1 << 18


@dataclass
class DatasetEntry:
    """One ingested input: its name, source, value kind, size and match report path (relative to the store)."""

    name: str
    source: str
    value_kind: str
    num_rows: int
    nnz: int
    report: str


@dataclass
class ShardEntry:
    """One shard: its directory (relative to the store), rows, offset in global row order and checksum."""

    path: str
    dataset: str
    num_rows: int
    nnz: int
    row_offset: int
    value_kind: str
    indices_dtype: str
    data_dtype: str
    sha256: str


@dataclass
class StoreIndex:
    """The parsed index.json: everything a reader needs without opening a shard."""

    vocab_hash: str
    num_genes: int
    num_rows: int = 0
    nnz: int = 0
    datasets: list[DatasetEntry] = field(default_factory=list)
    shards: list[ShardEntry] = field(default_factory=list)
    obs_columns: dict[str, list[str]] = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = INDEX_FILE) -> StoreIndex:
        if raw.get("format") != FORMAT_NAME:
            raise SclabelError(f"{where}: not a sclabel cell store (format={raw.get('format')!r})")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise SclabelError(
                f"{where}: store format_version {version} is not supported (this code reads "
                f"{FORMAT_VERSION}); re-ingest the data or upgrade sclabel-dist"
            )
        try:
            return cls(
                vocab_hash=raw["vocab_hash"],
                num_genes=int(raw["num_genes"]),
                num_rows=int(raw["num_rows"]),
                nnz=int(raw["nnz"]),
                datasets=[DatasetEntry(**d) for d in raw["datasets"]],
                shards=[ShardEntry(**s) for s in raw["shards"]],
                obs_columns={k: list(v) for k, v in raw["obs_columns"].items()},
            )
        except (KeyError, TypeError) as exc:
            raise SclabelError(f"{where}: malformed index ({exc})") from None

    def row_offsets(self) -> np.ndarray:
        """int64 [num_shards + 1]: global row where each shard starts (last = num_rows)."""
        sizes = np.array([s.num_rows for s in self.shards], dtype=np.int64)
        return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# dtypes and sizing


def indices_dtype(num_genes: int) -> np.dtype:
    """Gene indices fit uint16 up to 65,535 genes, else uint32."""
    return np.dtype(np.uint16 if num_genes <= np.iinfo(np.uint16).max else np.uint32)


def counts_dtype(max_value: int) -> np.dtype:
    """The smallest unsigned integer dtype holding `max_value`."""
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise SclabelError(f"count {max_value} does not fit uint64")


def data_dtype(value_kind: str, max_value: float) -> np.dtype:
    """Counts: smallest unsigned integer; log-normalised: float32."""
    if value_kind == "counts":
        return counts_dtype(int(max_value))
    if value_kind == "lognorm":
        return np.dtype(np.float32)
    raise SclabelError(f"unknown value_kind {value_kind!r}; choose from {VALUE_KINDS}")


def _pow2_at_least(x: float) -> int:
    return 1 << max(0, int(np.ceil(np.log2(max(x, 1.0)))))


def chunk_elements(mean_nnz: float) -> int:
    """Inner chunk size in elements: a run of ~CHUNK_ROWS cells, a power of two within bounds."""
    return int(np.clip(_pow2_at_least(CHUNK_ROWS * max(mean_nnz, 1.0)), MIN_CHUNK, MAX_CHUNK))


def shard_elements(mean_nnz: float) -> int:
    """Zarr shard (file) size in elements: SHARD_CHUNKS inner chunks."""
    return chunk_elements(mean_nnz) * SHARD_CHUNKS


def rows_per_part(mean_nnz: float) -> int:
    """Rows per store shard (part) so that one part holds ~PART_NNZ non-zeros."""
    return int(np.clip(PART_NNZ / max(mean_nnz, 1.0), MIN_PART_ROWS, MAX_PART_ROWS))


def part_name(i: int) -> str:
    return f"part_{i:05d}"


# ----------------------------------------------------------------------------------------------------------
# files


def read_index(store: str | Path) -> StoreIndex:
    """Parse STORE/index.json (a local path or s3://...), checking the format name and version."""
    from sclabel_dist.data.stores.location import as_path

    path = as_path(store) / INDEX_FILE
    if not path.is_file():
        raise SclabelError(f"{store}: not a cell store (no {INDEX_FILE}; the ingest may not have finished)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SclabelError(f"{path}: unreadable JSON ({exc})") from None
    return StoreIndex.from_dict(raw, where=str(path))


def write_index(store: str | Path, index: StoreIndex) -> None:
    """Atomically replace STORE/index.json."""
    write_json_atomic(Path(store) / INDEX_FILE, index.to_dict())


def _as_path(store: Any) -> Any:
    from sclabel_dist.data.stores.location import as_path

    return as_path(store)


def open_group(path: Any) -> Any:
    """The zarr group at a local path or an S3Path, read-only (open its arrays inside zarr_pipeline(path))."""
    import zarr

    from sclabel_dist.data.stores.location import is_remote

    return path.zarr_group() if is_remote(path) else zarr.open_group(str(path), mode="r")


def zarr_pipeline(path: Any) -> Any:
    """A context in which arrays under `path` are opened: zarr's own codec pipeline for object storage.

    The zarrs pipeline re-creates an obstore store in its own runtime and its reads through it never
    complete (zarrs 0.2 / obstore 0.12); an array keeps the pipeline it was opened with. zarr's config is
    process-wide, so remote opens hold a lock while it is switched (they are few: a store's open, validate)."""
    from sclabel_dist.data.stores.location import is_remote

    return zarr_own_pipeline() if is_remote(path) else contextlib.nullcontext()


_PIPELINE_LOCK = threading.RLock()


@contextlib.contextmanager
def zarr_own_pipeline() -> Any:
    """A context in which zarr uses its own codec pipeline, whatever a reader in this process switched on.

    Remote opens need it (above); writers too: zarrs compresses to other bytes than numcodecs does, so a shard
    written after a local read switched the process to zarrs would differ from the same shard written in a
    fresh process (a parallel ingest's workers), and the stores would not be byte-identical."""
    import zarr

    with _PIPELINE_LOCK:  # read while no one holds it: the global value, not another opener's switch
        zarrs = "zarrs" in str(zarr.config.get("codec_pipeline.path"))
    if not zarrs:  # zarr's own pipeline already (no local store switched to zarrs): nothing to hold
        yield
        return
    with (
        _PIPELINE_LOCK,
        zarr.config.set({"codec_pipeline.path": "zarr.core.codec_pipeline.BatchedCodecPipeline"}),
    ):
        yield


def open_shard_arrays(store: str | Path, shard: ShardEntry) -> tuple[np.ndarray, Any, Any]:
    """(indptr as int64 numpy, indices zarr.Array, data zarr.Array) of one shard, opened read-only."""
    path = _as_path(store) / shard.path
    try:
        with zarr_pipeline(path):
            group = open_group(path)
            indptr = np.asarray(group[INDPTR][:], dtype=np.int64)
            return indptr, group[INDICES], group[DATA]
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as exc:
        # A failed crc32c is a ValueError from zarr, a RuntimeError from the zarrs pipeline.
        raise SclabelError(f"{path}: shard unreadable ({type(exc).__name__}: {exc})") from None


def read_obs_codes(store: str | Path, shard: ShardEntry, column: str) -> np.ndarray:
    """int32 codes of obs `column` for every row of a shard (-1 where the shard's dataset lacks the column)."""
    path = _as_path(store) / shard.path
    try:
        with zarr_pipeline(path):
            return np.asarray(open_group(path)[f"{OBS_GROUP}/{column}"][:], dtype=np.int32)
    except KeyError:
        return np.full(shard.num_rows, MISSING_CODE, dtype=np.int32)


def dataset_shards(index: StoreIndex, names: Sequence[str]) -> list[ShardEntry]:
    """The shards of the named datasets, in global order."""
    known = {d.name for d in index.datasets}
    missing = [n for n in names if n not in known]
    if missing:
        raise SclabelError(f"dataset(s) {missing} not in store; present: {sorted(known)}")
    return [s for s in index.shards if s.dataset in set(names)]


def shard_checksum(shard_dir: str | Path) -> str:
    """A shard's index.json checksum: sha256 over its files, their sorted relative paths and bytes."""
    from sclabel_dist.data.stores.location import as_path, is_remote

    path = as_path(shard_dir)
    if not is_remote(path):
        return sha256_tree(path)
    h = hashlib.sha256()  # the same digest as sha256_tree, object by object (a zarr shard file: a few MB)
    for f in sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path)):
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()
