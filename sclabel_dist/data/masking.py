"""The masked-gene objective's mask: a seeded, exact number of real tokens per cell, vectorised over a batch."""

from __future__ import annotations

import numpy as np

from sclabel_dist.data.csr import sort_within_rows


def num_masked(num_real: np.ndarray, ratio: float) -> np.ndarray:
    """Tokens to mask per cell: round(ratio * n), at least one when the cell has a gene, none at ratio 0."""
    n = np.asarray(num_real, dtype=np.int64)
    if ratio <= 0:
        return np.zeros_like(n)
    return np.where(n > 0, np.clip(np.rint(ratio * n).astype(np.int64), 1, n), 0)


def mask_tokens(indptr: np.ndarray, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Bool over the flat real tokens of a CSR-shaped token list (row i = tokens indptr[i]:indptr[i+1]).

    Each row gets exactly num_masked(n_i) masked tokens, chosen uniformly: a random key per token, sorted
    within its row; the first k are masked. CLS and padding are not in the list, so they are never masked.
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    total = int(indptr[-1])
    counts = np.diff(indptr)
    k = num_masked(counts, ratio)
    out = np.zeros(total, dtype=bool)
    if total == 0 or not k.any():
        return out
    keys = rng.integers(0, 1 << 32, size=total, dtype=np.uint64)
    order, rank = sort_within_rows(indptr, keys)
    row = np.repeat(np.arange(len(counts)), counts)
    out[order] = rank < k[row]
    return out
