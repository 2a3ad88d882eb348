"""PartBuffer: the rows of the shard part being filled, in arrays allocated once and reused for every part.

Concatenating pending blocks per part (vstack, then slicing and narrowing copies) allocates several
part-sized temporaries per flush; glibc keeps the freed holes between live blocks, so peak RSS crept up with
the input size. Copying each block's rows straight into reused arrays keeps the writer's memory flat.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Mapping, Sequence
from functools import cache

import numpy as np
import scipy.sparse as sp


class PartBuffer:
    """Fixed-capacity CSR rows plus obs codes; `add` copies rows in, `view` exposes them, `clear` resets."""

    def __init__(
        self, max_rows: int, nnz_hint: int, num_genes: int, value_dtype: np.dtype, obs_columns: Sequence[str]
    ):
        self.max_rows = max_rows
        self.num_genes = num_genes
        self.indptr = np.zeros(max_rows + 1, dtype=np.int64)
        self.indices = np.empty(max(nnz_hint, 1), dtype=np.int32)
        self.data = np.empty(max(nnz_hint, 1), dtype=value_dtype)
        self.codes = {c: np.empty(max_rows, dtype=np.int32) for c in obs_columns}
        self.num_rows = 0
        self.nnz = 0

    @property
    def room(self) -> int:
        return self.max_rows - self.num_rows

    def add(self, block: sp.csr_matrix, codes: Mapping[str, np.ndarray], start: int, stop: int) -> None:
        """Copy rows [start, stop) of `block` (and their codes) after the rows already held."""
        lo, hi = int(block.indptr[start]), int(block.indptr[stop])
        rows, nnz = stop - start, hi - lo
        assert rows <= self.room, "caller flushes before the buffer overflows"
        self._reserve(self.nnz + nnz)
        self.indices[self.nnz : self.nnz + nnz] = block.indices[lo:hi]
        self.data[self.nnz : self.nnz + nnz] = block.data[lo:hi]
        # Row offsets of the block, shifted from the block's own origin to the buffer's.
        self.indptr[self.num_rows + 1 : self.num_rows + rows + 1] = (
            block.indptr[start + 1 : stop + 1] - lo + self.nnz
        )
        for col, dest in self.codes.items():
            dest[self.num_rows : self.num_rows + rows] = codes[col][start:stop]
        self.num_rows += rows
        self.nnz += nnz

    def _reserve(self, nnz: int) -> None:
        """Grow geometrically when a part holds more non-zeros than the hint (rare: the hint is the mean)."""
        if nnz <= len(self.indices):
            return
        size = max(nnz, int(len(self.indices) * 1.5))
        self.indices = np.concatenate([self.indices[: self.nnz], np.empty(size - self.nnz, np.int32)])
        self.data = np.concatenate([self.data[: self.nnz], np.empty(size - self.nnz, self.data.dtype)])

    def view(self) -> tuple[sp.csr_matrix, dict[str, np.ndarray]]:
        """The held rows as a CSR matrix and codes; views into the buffer, valid until the next add/clear."""
        n, nnz = self.num_rows, self.nnz
        matrix = sp.csr_matrix(
            (self.data[:nnz], self.indices[:nnz], self.indptr[: n + 1]), shape=(n, self.num_genes), copy=False
        )
        return matrix, {c: v[:n] for c, v in self.codes.items()}

    def clear(self) -> None:
        self.num_rows = 0
        self.nnz = 0


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc only; a no-op elsewhere).

    Per-block temporaries (remapping, checks, dtype narrowing) leave holes that glibc keeps; trimming once per
    written part keeps peak RSS flat as inputs grow, at no measurable cost.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
