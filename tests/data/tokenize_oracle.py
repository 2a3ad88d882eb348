"""The numpy twins of the compiled kernels (sclabel_dist/data/kernels.py), kept as reference oracles.

The same rules as the kernels in flat vectorised numpy (within-row sorts are one np.sort of packed 64-bit keys
row | 32-bit key | position): they agree exactly at evaluation, and every property test of test_tokenize.py
runs against both. Training subsets and masks are drawn differently (each deterministic given its rng).
They lived in production code as a fallback while numba is a hard dependency; here they check the kernels.
"""

from __future__ import annotations

import numpy as np

from sclabel_dist.config import TokenizeConfig
from sclabel_dist.data.masking import num_masked
from sclabel_dist.vocab import CLS_ID, NUM_SPECIAL


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


_SCALE = 1e4


def value_keys(data: np.ndarray) -> np.ndarray:
    """uint32 keys ordered like the (non-negative) values: float32 bit patterns, or integers clipped."""
    if data.dtype.kind == "f":
        return np.maximum(data.astype(np.float32), 0).view(np.uint32)
    if data.dtype.itemsize <= 4 and data.dtype.kind == "u":
        return data.astype(np.uint32)
    return np.clip(data, 0, np.iinfo(np.uint32).max).astype(np.uint32)


def bin_values(indptr: np.ndarray, data: np.ndarray, num_bins: int) -> np.ndarray:
    """int64 per-cell quantile bins 1..num_bins (module docstring), over all of each row's values."""
    total = int(indptr[-1])
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    keys = value_keys(data)
    order, rank = sort_within_rows(indptr, keys)
    sk = keys[order]
    counts = np.diff(indptr)
    row = np.repeat(np.arange(len(counts)), counts)
    # The first sorted index of each run of equal values in a row: ties get the same (lowest) rank.
    new_run = np.ones(total, dtype=bool)
    new_run[1:] = (sk[1:] != sk[:-1]) | (row[1:] != row[:-1])
    first = np.maximum.accumulate(np.where(new_run, np.arange(total), 0))
    low = first - indptr[:-1][row]
    out = np.empty(total, dtype=np.int64)
    out[order] = 1 + (low * num_bins) // counts[row]
    return out


def continuous_values(indptr: np.ndarray, data: np.ndarray, lognorm: np.ndarray) -> np.ndarray:
    """float32 log1p(count / total * 1e4) for count rows (total over all the row's counts); lognorm rows as is."""
    counts = np.diff(indptr)
    row = np.repeat(np.arange(len(counts)), counts)
    x = data.astype(np.float64)
    totals = np.bincount(row, weights=x, minlength=len(counts))
    norm = np.log1p(x / np.maximum(totals[row], 1e-12) * _SCALE)
    return np.where(lognorm[row], x, norm).astype(np.float32)


def select_genes(
    indptr: np.ndarray, data: np.ndarray, k: int, how: str, rng: np.random.Generator | None
) -> np.ndarray:
    """Bool over the non-zeros: all of a row's genes when it has <= k, else k of them (random or top by value)."""
    counts = np.diff(indptr)
    total = int(indptr[-1])
    keep = np.ones(total, dtype=bool)
    long_rows = np.flatnonzero(counts > k)
    if len(long_rows) == 0:
        return keep
    # Sort only the long rows' elements: the short ones are kept whole.
    sub_counts = counts[long_rows]
    sub_ptr = np.concatenate([[0], np.cumsum(sub_counts)]).astype(np.int64)
    sub_pos = np.repeat(indptr[long_rows] - sub_ptr[:-1], sub_counts) + np.arange(int(sub_ptr[-1]))
    if how == "random":
        if rng is None:
            rng = np.random.default_rng()
        keys = rng.integers(0, 1 << 32, size=len(sub_pos), dtype=np.uint64)
    else:
        # Descending value; the position tie-break of sort_within_rows is ascending gene index.
        keys = np.iinfo(np.uint32).max - value_keys(data[sub_pos])
    order, rank = sort_within_rows(sub_ptr, keys)
    keep[sub_pos[order]] = rank < k
    return keep


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


def numpy_arrays(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    lognorm: np.ndarray,
    cfg: TokenizeConfig,
    how: str,
    mask: bool,
    rng: np.random.Generator | None,
) -> tuple[np.ndarray, ...]:
    """kernels.numba_arrays in flat numpy passes and packed-key sorts (the oracle the kernels are checked
    against)."""
    n = len(indptr) - 1
    if cfg.value_encoding == "binned":
        values = bin_values(indptr, data, cfg.num_bins)
        vdtype = np.int64
    else:
        values = continuous_values(indptr, data, lognorm)
        vdtype = np.float32
    keep = select_genes(indptr, data, cfg.max_len - 1, how, rng)
    counts = np.diff(indptr)
    row = np.repeat(np.arange(n, dtype=np.int64), counts)[keep]
    kept = np.bincount(row, minlength=n).astype(np.int64)
    kptr = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
    length = cfg.max_len if cfg.pad_to_max_len else 1 + int(kept.max(initial=0))
    # Column of each kept token: 1 + its place among the row's kept tokens (column 0 is CLS).
    flat = row * length + 1 + np.arange(len(row), dtype=np.int64) - kptr[:-1][row]
    gene_ids = np.zeros((n, length), dtype=np.int64)
    gene_ids[:, 0] = CLS_ID
    gene_ids.reshape(-1)[flat] = indices[keep].astype(np.int64) + NUM_SPECIAL
    targets = np.zeros((n, length), dtype=vdtype)
    targets.reshape(-1)[flat] = values[keep]
    attention = np.arange(length)[None, :] <= kept[:, None]
    masked = np.zeros((n, length), dtype=bool)
    if mask and cfg.mask_ratio > 0:
        masked.reshape(-1)[flat] = mask_tokens(kptr, cfg.mask_ratio, rng or np.random.default_rng())
    inputs = np.where(masked, np.zeros((), dtype=vdtype), targets)
    return gene_ids, inputs, attention, masked, targets


def gene_bag_arrays(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    lognorm: np.ndarray,
    gene_ids: np.ndarray,
    masked: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token ids, row offsets, weights) of every non-zero gene of the block, for the model's gene bag
    (the numpy reference; kernels.numba_gene_bag gives the same in one pass per cell).

    The weights are the continuous values (log1p per 10k over all of the cell's counts) whatever the token
    encoding, so the bag carries absolute levels that per-cell bins drop. A gene whose token value is masked
    gets weight 0: the bag must not leak what the MLM objective asks the model to predict.
    """
    total = int(indptr[-1])
    ids = indices[:total].astype(np.int64) + NUM_SPECIAL
    weights = continuous_values(indptr, data[:total], lognorm)
    if masked.any():
        # (row, token id) pairs packed in one int64: row < 2**31, token ids < 2**32.
        rows, cols = np.nonzero(masked)
        hidden = (rows.astype(np.int64) << 32) | gene_ids[rows, cols]
        row = np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))
        weights[np.isin((row << 32) | ids, hidden)] = 0.0
    return ids, np.asarray(indptr[:-1], dtype=np.int64), weights


def take_rows(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """kernels.take_rows: (indptr, indices, data) of CSR rows `rows` in that order, by one gather."""
    lengths = indptr[rows + 1] - indptr[rows]
    out = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    src = np.repeat(indptr[rows] - out[:-1], lengths) + np.arange(int(out[-1]))
    return out, indices[src], data[src]


def numpy_tokens(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    lognorm: np.ndarray,
    cfg: TokenizeConfig,
    how: str,
    mask: bool,
    rng: np.random.Generator | None,
    *,
    rows: np.ndarray | None = None,
    bag: bool = False,
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...] | None]:
    """kernels.numba_tokens: gather the rows, tokenise them, then their gene bag."""
    if rows is not None:
        rows = np.asarray(rows, dtype=np.int64)
        indptr, indices, data = take_rows(np.asarray(indptr, dtype=np.int64), indices, data, rows)
        lognorm = np.asarray(lognorm)[rows]
    arrays = numpy_arrays(indptr, indices, data, lognorm, cfg, how, mask, rng)
    bag_arrays = gene_bag_arrays(indptr, indices, data, lognorm, arrays[0], arrays[3]) if bag else None
    return arrays, bag_arrays
