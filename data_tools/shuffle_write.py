"""Out-of-core global shuffle of rows: spill blocks to seeded random buckets on disk, then emit each bucket permuted.

Assigning every row to one of B buckets uniformly at random and then permuting each bucket uniformly gives a
uniformly random permutation of all rows, while only one block and then one bucket are ever in memory.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from data_tools.tempfiles import spill_dir

BUCKET_NNZ = 1 << 22  # non-zeros per bucket: bounds the memory of the second pass


def num_buckets(nnz: int, num_rows: int, bucket_nnz: int = BUCKET_NNZ) -> int:
    """Buckets so that each holds about bucket_nnz non-zeros (and at least one row on average)."""
    return int(max(1, min(num_rows, -(-nnz // bucket_nnz))))


def shuffled_blocks(
    blocks: Iterable[tuple[sp.csr_matrix, Mapping[str, np.ndarray]]],
    columns: Sequence[str],
    num_cols: int,
    buckets: int,
    seed: int,
    workdir: str | Path | None = None,
) -> Iterator[tuple[sp.csr_matrix, dict[str, np.ndarray]]]:
    """Yield the rows of `blocks` (CSR + obs values) in a seeded uniformly random order, bucket by bucket."""
    rng = np.random.default_rng(seed)
    tmp = spill_dir("shuffle", workdir)
    categories: dict[str, dict[Any, int]] = {c: {} for c in columns}
    try:
        for mat, obs in blocks:
            mat = sp.csr_matrix(mat)
            dest = rng.integers(0, buckets, size=mat.shape[0])
            codes = {c: _encode(obs[c], categories[c]) for c in columns}
            for b in np.unique(dest):
                rows = np.flatnonzero(dest == b)
                sub = mat[rows]
                _append(tmp / f"{b}.nnz", np.diff(sub.indptr).astype(np.int64))
                _append(tmp / f"{b}.idx", sub.indices.astype(np.int32))
                _append(tmp / f"{b}.val", sub.data.astype(np.float64))
                for c in columns:
                    _append(tmp / f"{b}.obs.{columns.index(c)}", codes[c][rows])
        decoders = {c: np.array([*categories[c].keys(), None], dtype=object) for c in columns}
        for b in range(buckets):
            if not (tmp / f"{b}.nnz").exists():
                continue
            row_nnz = np.fromfile(tmp / f"{b}.nnz", dtype=np.int64)
            indptr = np.concatenate([[0], np.cumsum(row_nnz)])
            mat = sp.csr_matrix(
                (np.fromfile(tmp / f"{b}.val"), np.fromfile(tmp / f"{b}.idx", dtype=np.int32), indptr),
                shape=(len(row_nnz), num_cols),
            )
            perm = rng.permutation(len(row_nnz))
            obs = {
                c: decoders[c][np.fromfile(tmp / f"{b}.obs.{i}", dtype=np.int32)[perm]]
                for i, c in enumerate(columns)
            }
            for f in tmp.glob(f"{b}.*"):
                f.unlink()
            yield mat[perm], obs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _encode(values: np.ndarray, cats: dict[Any, int]) -> np.ndarray:
    """Values -> int32 codes in a growing dictionary; None/NaN -> -1 (decoded back to None)."""
    out = np.empty(len(values), dtype=np.int32)
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            out[i] = -1
        else:
            out[i] = cats.setdefault(v, len(cats))
    return out


def _append(path: Path, arr: np.ndarray) -> None:
    with open(path, "ab") as fh:
        fh.write(np.ascontiguousarray(arr).tobytes())
