"""`sclabel-data validate STORE`: recompute shard checksums and check the index and CSR structure; name what is wrong."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sclabel_dist.data import format as fmt
from sclabel_dist.data.stores.location import as_path
from sclabel_dist.errors import SclabelError
from sclabel_dist.vocab import GeneVocab

_READ = 1 << 22  # elements read at a time from indices / data


def check_shard(store: Path, index: fmt.StoreIndex, s: fmt.ShardEntry, checksums: bool = True) -> list[str]:
    """Problems of one shard: missing, checksum, indptr, index bounds and order, dtypes, values, obs codes."""
    where = f"shard {s.path}"
    d = store / s.path
    if not d.is_dir():
        return [f"{where}: missing"]
    problems = []
    if checksums and fmt.shard_checksum(d) != s.sha256:
        problems.append(f"{where}: checksum mismatch (corrupted or modified)")
    try:
        indptr, indices, data = fmt.open_shard_arrays(store, s)
        if len(indptr) != s.num_rows + 1 or indptr[0] != 0 or indptr[-1] != s.nnz:
            return [
                *problems,
                f"{where}: indptr has {len(indptr)} entries ending at {indptr[-1]}; index says {s.num_rows} rows, {s.nnz} nnz",
            ]
        if np.any(np.diff(indptr) < 0):
            return [*problems, f"{where}: indptr not monotone (row {int(np.argmax(np.diff(indptr) < 0))})"]
        if indices.shape != (s.nnz,) or data.shape != (s.nnz,):
            return [
                *problems,
                f"{where}: indices {indices.shape} / data {data.shape} do not hold {s.nnz} values",
            ]
        if str(indices.dtype) != s.indices_dtype or str(data.dtype) != s.data_dtype:
            problems.append(
                f"{where}: dtypes {indices.dtype}/{data.dtype} differ from index {s.indices_dtype}/{s.data_dtype}"
            )
        starts = np.zeros(s.nnz + 1, dtype=bool)
        starts[indptr[:-1]] = True  # positions where a new row begins: the index may go down there
        for lo in range(0, s.nnz, _READ):
            hi = min(lo + _READ, s.nnz)
            idx = indices[max(lo - 1, 0) : hi].astype(np.int64)
            if idx.size and idx.max() >= index.num_genes:
                problems.append(f"{where}: gene index {int(idx.max())} >= num_genes {index.num_genes}")
                break
            step = np.diff(idx) <= 0
            row_start = starts[max(lo - 1, 0) + 1 : hi]
            if np.any(step & ~row_start):
                k = max(lo - 1, 0) + 1 + int(np.argmax(step & ~row_start))
                problems.append(
                    f"{where}: gene indices not strictly increasing in row {int(np.searchsorted(indptr, k, 'right')) - 1}"
                )
                break
            vals = data[lo:hi]
            if vals.dtype.kind == "f" and (not np.all(np.isfinite(vals)) or np.any(vals < 0)):
                problems.append(f"{where}: NaN, infinite or negative values")
                break
        group_obs = [c for c in index.obs_columns]
        for c in group_obs:
            codes = fmt.read_obs_codes(store, s, c)
            if (
                len(codes) != s.num_rows
                or codes.max(initial=-1) >= len(index.obs_columns[c])
                or codes.min(initial=0) < -1
            ):
                problems.append(f"{where}: obs column {c!r} codes out of range or wrong length")
    except SclabelError as exc:
        problems.append(str(exc))
    except Exception as exc:  # a corrupted chunk surfaces as a codec / JSON / OS error from zarr
        problems.append(f"{where}: unreadable ({type(exc).__name__}: {exc})")
    return problems


def validate_store(store: str | Path, checksums: bool = True) -> tuple[list[str], list[str]]:
    """(problems, warnings) of a store (a directory or s3://...); no problems means valid."""
    store = as_path(store)
    try:
        index = fmt.read_index(store)
    except SclabelError as exc:
        return [str(exc)], []
    problems: list[str] = []
    warnings: list[str] = []
    try:
        vocab = GeneVocab.from_json(store / fmt.VOCAB_FILE, index.vocab_hash, fmt.INDEX_FILE)
        if len(vocab) != index.num_genes:
            problems.append(f"{fmt.VOCAB_FILE}: {len(vocab)} genes but index.json says {index.num_genes}")
    except SclabelError as exc:
        problems.append(str(exc))
    offset = 0
    for s in index.shards:
        if s.row_offset != offset:
            problems.append(f"shard {s.path}: row_offset {s.row_offset}, expected {offset}")
        offset += s.num_rows
    if offset != index.num_rows or sum(s.nnz for s in index.shards) != index.nnz:
        problems.append(
            f"index.json: num_rows/nnz ({index.num_rows}/{index.nnz}) differ from the shards' sums"
        )
    for d in index.datasets:
        shards = [s for s in index.shards if s.dataset == d.name]
        if sum(s.num_rows for s in shards) != d.num_rows:
            problems.append(
                f"dataset {d.name}: {d.num_rows} rows listed, shards hold {sum(s.num_rows for s in shards)}"
            )
        if not (store / d.report).is_file():
            problems.append(f"dataset {d.name}: match report {d.report} missing")
    known = {d.name for d in index.datasets}
    for s in index.shards:
        if s.dataset not in known:
            problems.append(f"shard {s.path}: dataset {s.dataset!r} not in the dataset list")
        problems += check_shard(store, index, s, checksums)
    shards_dir = store / fmt.SHARDS_DIR
    if shards_dir.is_dir():
        listed = {s.path for s in index.shards}
        for p in shards_dir.iterdir():
            if p.name not in known:
                warnings.append(
                    f"{p}: not referenced by index.json (left by an interrupted ingest; removed by the next append)"
                )
                continue
            # A shard directory of a listed dataset that the index leaves out: cells the loader never reads
            # (an index.json edited, or restored from an older copy).
            for part in sorted(p.iterdir()):
                if f"{fmt.SHARDS_DIR}/{p.name}/{part.name}" not in listed:
                    warnings.append(
                        f"{part}: shard directory not referenced by index.json (its cells are never read)"
                    )
    return problems, warnings


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sclabel-data validate", description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--no-checksums", action="store_true", help="skip recomputing sha256 (structure only)")
    args = p.parse_args(argv)
    problems, warnings = validate_store(args.store, checksums=not args.no_checksums)
    for w in warnings:
        print(f"warning: {w}")
    for msg in problems:
        print(f"INVALID: {msg}")
    if problems:
        print(f"{args.store}: {len(problems)} problem(s)")
        return 1
    index = fmt.read_index(args.store)
    print(f"{args.store}: valid ({index.num_rows} cells, {index.num_shards} shards)")
    return 0
