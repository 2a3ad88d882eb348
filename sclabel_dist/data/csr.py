"""CSR operations shared by tokenisation, masking and the stores: pure numpy over (indptr, flat elements)."""

from __future__ import annotations

import numpy as np


def sort_within_rows(indptr: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, rank): the flat elements sorted by (row, key, position) and each sorted element's rank in its row.

    `keys` are unsigned integers < 2**32. One np.sort of row << 48 | key << 16 | position-in-row when rows and
    row lengths fit 16 bits (vectorised AVX-512 sort: ~1 ms per 400k elements); np.lexsort otherwise.
    """
    counts = np.diff(indptr)
    n = len(counts)
    total = int(indptr[-1])
    row = np.repeat(np.arange(n, dtype=np.int64), counts)
    if n < (1 << 15) and (counts.max(initial=0) < (1 << 16)):
        pos = np.arange(total, dtype=np.uint64) - indptr[:-1].astype(np.uint64)[row]
        packed = (row.astype(np.uint64) << np.uint64(48)) | (keys.astype(np.uint64) << np.uint64(16)) | pos
        packed.sort()
        order = indptr[(packed >> np.uint64(48)).astype(np.int64)] + (packed & np.uint64(0xFFFF)).astype(
            np.int64
        )
    else:
        order = np.lexsort((np.arange(total), keys, row))
    rank = np.arange(total, dtype=np.int64) - indptr[:-1][row]
    return order, rank
