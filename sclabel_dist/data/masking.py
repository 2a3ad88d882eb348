"""The masked-gene objective's mask size: an exact number of real tokens per cell (the kernels draw which)."""

from __future__ import annotations

import numpy as np


def num_masked(num_real: np.ndarray, ratio: float) -> np.ndarray:
    """Tokens to mask per cell: round(ratio * n), at least one when the cell has a gene, none at ratio 0."""
    n = np.asarray(num_real, dtype=np.int64)
    if ratio <= 0:
        return np.zeros_like(n)
    return np.where(n > 0, np.clip(np.rint(ratio * n).astype(np.int64), 1, n), 0)
