"""The CellStore protocol every cell source implements, and CSRBlock, the rows it returns."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from sclabel_dist.data import kernel_warmup
from sclabel_dist.errors import SclabelError
from sclabel_dist.vocab import GeneVocab

# The raw paths (CSRBlock.take, soma_store's COO -> CSR) keep numpy twins of their kernels, taken while the
# kernels are not ready (kernel_warmup) and, for soma_store, without numba; the tokeniser uses kernels.py always.
HAVE_NUMBA = importlib.util.find_spec("numba") is not None


def take_rows_numpy(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """kernels.take_rows without numba: the same arrays, one slice per row (~3x its time, holding the GIL)."""
    starts, ends = indptr[rows], indptr[rows + 1]
    out_indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(ends - starts, out=out_indptr[1:])
    spans = list(zip(starts.tolist(), ends.tolist(), strict=True))
    if not spans:
        return out_indptr, indices[:0].copy(), data[:0].copy()
    return (
        out_indptr,
        np.concatenate([indices[s:e] for s, e in spans]),
        np.concatenate([data[s:e] for s, e in spans]),
    )


@dataclass
class CSRBlock:
    """Rows of a store in vocabulary gene space: CSR arrays plus a per-row log-normalised flag.

    indptr int64 [n + 1]; indices integer gene indices 0..num_genes-1 (token id = index + NUM_SPECIAL), sorted
    within a row; data the values (integer counts, or float log-normalised values where lognorm[i]). indices
    and data keep the store's narrow dtypes (uint16, uint8...): consumers cast if they need to.
    """

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    lognorm: np.ndarray
    num_genes: int
    ids: np.ndarray | None = None  # int64 per row: (store index << 40) | store row, set by the Corpus

    @property
    def num_rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def to_scipy(self) -> Any:
        """A scipy.sparse.csr_matrix view of the block (num_rows x num_genes)."""
        import scipy.sparse as sp

        return sp.csr_matrix((self.data, self.indices, self.indptr), shape=(self.num_rows, self.num_genes))

    def take(self, rows: np.ndarray) -> CSRBlock:
        """The block's rows in the order `rows` (a vectorised CSR row gather)."""
        rows = np.asarray(rows, dtype=np.int64)
        ids = None if self.ids is None else self.ids[rows]
        if kernel_warmup.compiled_ready():
            from sclabel_dist.data.kernels import take_rows

            indptr, indices, data = take_rows(self.indptr, self.indices, self.data, rows)
        else:
            indptr, indices, data = take_rows_numpy(self.indptr, self.indices, self.data, rows)
        return CSRBlock(indptr, indices, data, self.lognorm[rows], self.num_genes, ids)

    @staticmethod
    def concat(blocks: Sequence[CSRBlock], num_genes: int) -> CSRBlock:
        """Blocks stacked row-wise (a single block is returned as is, not copied)."""
        if not blocks:
            return CSRBlock.empty(num_genes)
        if len(blocks) == 1:
            return blocks[0]
        sizes = [b.nnz for b in blocks]
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        indptr = np.concatenate([[0]] + [b.indptr[1:] + o for b, o in zip(blocks, offsets, strict=False)])
        return CSRBlock(
            indptr.astype(np.int64),
            np.concatenate([b.indices for b in blocks]),
            np.concatenate([b.data for b in blocks]),
            np.concatenate([b.lognorm for b in blocks]),
            num_genes,
            None if any(b.ids is None for b in blocks) else np.concatenate([b.ids for b in blocks]),
        )

    @staticmethod
    def empty(num_genes: int) -> CSRBlock:
        return CSRBlock(
            np.zeros(1, np.int64),
            np.zeros(0, np.int32),
            np.zeros(0, np.float32),
            np.zeros(0, bool),
            num_genes,
        )


@runtime_checkable
class CellStore(Protocol):
    """A source of cells: rows in one vocabulary, read by sorted row ids, with obs columns for selection."""

    uri: str
    vocab: GeneVocab
    num_rows: int

    @property
    def num_genes(self) -> int: ...

    def value_kinds(self) -> list[tuple[int, int, str]]:
        """(start, stop, value_kind) row ranges covering the store; value_kind is 'counts' or 'lognorm'."""
        ...

    def read_rows(self, rows: np.ndarray) -> CSRBlock:
        """The rows `rows` (sorted ascending, unique, int64) in that order; fast when they form runs."""
        ...

    def obs_values(self, column: str) -> np.ndarray:
        """The obs column as an object array of strings (None where missing), one per row."""
        ...

    def datasets(self) -> np.ndarray:
        """The dataset name of every row (object array): the unit of a held-out validation split."""
        ...

    def close(self) -> None: ...


def lognorm_flags(kinds: list[tuple[int, int, str]], rows: np.ndarray) -> np.ndarray:
    """Bool per row of `rows`: whether its range is log-normalised."""
    out = np.zeros(len(rows), dtype=bool)
    for start, stop, kind in kinds:
        if kind == "lognorm":
            out |= (rows >= start) & (rows < stop)
    return out


def runs(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, stops) of the maximal runs of consecutive ids in sorted `rows`."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return rows, rows
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    first = np.concatenate([[0], breaks])
    last = np.concatenate([breaks, [len(rows)]])
    return rows[first], rows[last - 1] + 1


def checked_rows(rows: np.ndarray, num_rows: int, uri: str) -> np.ndarray:
    """Sorted row ids as int64, refused with the store's name when they fall outside [0, num_rows)."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) and (rows[0] < 0 or rows[-1] >= num_rows):
        raise SclabelError(f"{uri}: row ids out of range [0, {num_rows})")
    return rows
