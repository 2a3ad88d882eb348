"""Compiled per-row kernels of the loader (numba): the tokeniser and gene bag, the CSR row gather, COO -> CSR.

The tokeniser makes one pass per cell of a CSR block, with the rules of tokenize.py's docstring, reading a
batch's rows where its window holds them and filling the gene bag in the same pass (numba_tokens); the numpy
oracle they are tested against is tests/data/tokenize_oracle.py.

Why compiled: the numpy path makes ~20 passes over every non-zero (packing, sorting, scattering) and is
memory bound at ~10k cells/s per core; here each cell is handled in cache in O(nnz) (a counting sort for
integer values, partial Fisher-Yates for the random subset and the mask), ~10x faster, GIL released so the
loader's threads run it in parallel. Randomness: two 64-bit seeds drawn from the caller's numpy Generator
start a splitmix64 stream per cell, so the output is a pure function of (block, cfg, rng state); with
`cell_keys` each cell's streams come from (those seeds, its key) alone, not from its place in the batch.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.core import cgutils, types
from numba.extending import intrinsic

from sclabel_dist.config import TokenizeConfig
from sclabel_dist.vocab import CLS_ID, NUM_SPECIAL, PAD_ID

_MAX_COUNTING = 4096  # integer values below this are binned by a counting sort, others by argsort
_SCALE = 1e4
_BAG_TABLE = 64  # integer counts below this take their gene-bag weight from a per-cell table


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@njit(nogil=True, cache=True, inline="always")
def _next(state: np.uint64) -> tuple:
    """splitmix64: (next state, 64 random bits). A cheap in-kernel stream, seeded per cell from the rng."""
    state = state + _GOLDEN
    z = state
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return state, z ^ (z >> np.uint64(31))


@njit(nogil=True, cache=True, inline="always")
def _below(bits: np.uint64, bound: int) -> int:
    """A uniform integer in [0, bound) from the top 32 random bits: multiply-shift, no division (Lemire)."""
    return ((bits >> np.uint64(32)) * np.uint64(bound)) >> np.uint64(32)


@njit(nogil=True, cache=True)
def _bins_general(v: np.ndarray, n: int, num_bins: int, out: np.ndarray) -> None:
    """out[j] = 1 + floor(num_bins * (values of the cell strictly below v[j]) / n), by a stable argsort."""
    order = np.argsort(v[:n], kind="mergesort")
    first = 0
    for t in range(n):
        if t > 0 and v[order[t]] != v[order[t - 1]]:
            first = t
        out[order[t]] = 1 + (first * num_bins) // n


@njit(nogil=True, cache=True)
def _kernel(
    indptr,
    indices,
    data,
    lognorm,
    rows,
    integer_values,
    seeds,
    num_mask,
    k,
    num_bins,
    binned,
    top,
    gene_ids,
    targets,
    inputs,
    masked,
    attention,
    bag,
    bag_offsets,
    bag_ids,
    bag_weights,
):
    """Output row i is the block's row rows[i] (read in place: no gathered copy of the batch first). Every
    element of the outputs is written (they come from np.empty), and with `bag` the row's gene bag too."""
    width = 1
    for i in range(len(rows)):
        r = rows[i]
        width = max(width, indptr[r + 1] - indptr[r])
    length = gene_ids.shape[1]
    # Scratch reused by every cell: no allocation per cell.
    hist = np.zeros(_MAX_COUNTING + 2, dtype=np.int64)
    v = np.empty(width, dtype=np.float64)
    tv = np.empty(width, dtype=np.float64)
    keep = np.empty(width, dtype=np.bool_)
    idx = np.empty(width, dtype=np.int64)
    src = np.empty(width + 1, dtype=np.int64)  # column -> the row's non-zero it holds (masking the bag)
    table = np.empty(_BAG_TABLE, dtype=np.float64)
    for i in range(len(rows)):
        r = rows[i]
        s, e = indptr[r], indptr[r + 1]
        n = e - s
        o = bag_offsets[i]
        gi, ti, ii, mi, ai = gene_ids[i], targets[i], inputs[i], masked[i], attention[i]
        gi[0] = CLS_ID
        ai[0] = True
        ti[0] = 0
        ii[0] = 0
        mi[0] = False
        vmax = 0.0
        total = 0.0
        integral = True
        ordered = True
        for j in range(n):
            x = np.float64(data[s + j])
            v[j] = x
            total += x
            vmax = max(vmax, x)
            if not integer_values and x != np.floor(x):
                integral = False
            if bag:
                bag_ids[o + j] = indices[s + j] + NUM_SPECIAL
                if j > 0 and indices[s + j] <= indices[s + j - 1]:
                    ordered = False
        # Values are computed over every gene of the cell, before the subset is taken.
        counting = binned and integral and vmax < _MAX_COUNTING
        if n == 0:
            pass
        elif counting:
            # Counting sort: counts are small integers, so binning is O(nnz + max) per cell; afterwards
            # hist[c] is the bin of value c (1 + floor(num_bins * #values below c / n)).
            m = int(vmax) + 1
            hist[: m + 1] = 0
            for j in range(n):
                hist[int(v[j]) + 1] += 1
            for t in range(1, m):
                hist[t] += hist[t - 1]
            for t in range(m):
                hist[t] = 1 + (hist[t] * num_bins) // n
        elif binned:
            _bins_general(v, n, num_bins, tv)
        if n <= k:
            keep[:n] = True
        elif top:
            # Descending value, ties by ascending gene index: a stable sort of -v.
            keep[:n] = False
            order = np.argsort(-v[:n], kind="mergesort")
            for t in range(k):
                keep[order[t]] = True
        else:
            # Partial Fisher-Yates over the smaller side: pick the k to keep, or the n - k to drop.
            pick = min(k, n - k)
            flag = pick == k
            keep[:n] = not flag
            for t in range(n):
                idx[t] = t
            state = seeds[i, 0]
            for t in range(pick):
                state, bits = _next(state)
                q = t + _below(bits, n - t)
                idx[t], idx[q] = idx[q], idx[t]
                keep[idx[t]] = flag
        scale = _SCALE / max(total, 1e-12)
        logn = lognorm[r]
        if bag and not logn:
            # The bag's weights: log1p per 10k, the same expression as the oracle's continuous_values
            # (tests/data/tokenize_oracle.py); most counts are small integers and take theirs from a per-cell
            # table (a log1p per element cost twice the whole tokeniser).
            btotal = max(total, 1e-12)
            table[:] = -1.0  # filled on first use: log-values are >= 0
        if bag:
            if logn:
                for j in range(n):
                    bag_weights[o + j] = data[s + j]
            else:
                for j in range(n):
                    x = v[j]
                    t = int(x)
                    if t == x and t < _BAG_TABLE:
                        if table[t] < 0.0:
                            table[t] = np.log1p(t / btotal * _SCALE)
                        bag_weights[o + j] = table[t]
                    else:
                        bag_weights[o + j] = np.log1p(x / btotal * _SCALE)
        # The kept positions, compacted without a branch (a random subset mispredicts every other test).
        nk = 0
        for j in range(n):
            src[nk + 1] = j
            nk += keep[j]
        for col in range(1, nk + 1):
            j = src[col]
            if counting:
                val = np.float64(hist[int(v[j])])
            elif binned:
                val = tv[j]
            elif logn:
                val = v[j]
            else:
                val = np.log1p(v[j] * scale)
            gi[col] = indices[s + j] + NUM_SPECIAL
            ti[col] = val
            ii[col] = val
            ai[col] = True
            mi[col] = False
        col = nk + 1
        for c in range(col, length):  # padding
            gi[c] = PAD_ID
            ti[c] = 0
            ii[c] = 0
            ai[c] = False
            mi[c] = False
        m = num_mask[i]
        if m > 0:
            for t in range(nk):
                idx[t] = t + 1
            state = seeds[i, 1]
            for t in range(m):
                state, bits = _next(state)
                q = t + _below(bits, nk - t)
                idx[t], idx[q] = idx[q], idx[t]
                c = idx[t]
                mi[c] = True
                ii[c] = 0
                if bag:
                    # The bag must not leak a masked value: zero the weight of the token's gene (in a row
                    # with unsorted genes, its first occurrence, as numba_gene_bag does).
                    if ordered:
                        bag_weights[o + src[c]] = 0.0
                    else:
                        g = gi[c]
                        for j in range(n):
                            if bag_ids[o + j] == g:
                                bag_weights[o + j] = 0.0
                                break


def numba_tokens(
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
    cell_keys: np.ndarray | None = None,
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...] | None]:
    """((gene_ids, inputs, attention, masked, targets), (bag ids, offsets, weights) or None) of rows `rows`
    of a CSR block (default: all, in order), in one pass per cell that reads the rows where they lie.

    The same arrays as numba_arrays, then numba_gene_bag, on take_rows(..., rows) (the tests check that), so
    a batch needs no gathered copy of its rows and no second pass for the bag. `lognorm` is per block row.
    cell_keys: int [n], one per output row: its gene subset and mask then depend on (rng, key) only, so a
    cell draws the same mask in any batch (the world-size-invariant order keys cells by epoch position).
    """
    from sclabel_dist.data.masking import num_masked

    nrows = len(indptr) - 1
    if rows is None:
        rows = np.arange(nrows, dtype=np.int64)
    else:
        rows = np.asarray(rows, dtype=np.int64)
        # The kernel reads without bounds checks.
        if len(rows) and (rows.min() < 0 or rows.max() >= nrows):
            raise IndexError(f"rows outside the block's {nrows} rows")
    indices, data = np.ascontiguousarray(indices), np.ascontiguousarray(data)
    assert len(indices) >= indptr[-1] and len(data) >= indptr[-1]
    n = len(rows)
    k = cfg.max_len - 1
    counts = indptr[rows + 1] - indptr[rows]
    kept = np.minimum(counts, k)
    length = cfg.max_len if cfg.pad_to_max_len else 1 + int(kept.max(initial=0))
    binned = cfg.value_encoding == "binned"
    vdtype = np.int64 if binned else np.float32
    if mask and cfg.mask_ratio > 0:
        num_mask = num_masked(kept, cfg.mask_ratio)
    else:
        num_mask = np.zeros(n, dtype=np.int64)
    if rng is None and ((how == "random" and (counts > k).any()) or num_mask.any()):
        rng = np.random.default_rng()
    # Two 64-bit seeds (subset, mask) from the caller's Generator: the output is a function of its state.
    seeds = rng.integers(0, 1 << 63, size=2, dtype=np.uint64) if rng is not None else np.zeros(2, np.uint64)
    seeds = cell_seeds(seeds, n, cell_keys)
    # np.empty: the kernel writes every element (zeroing them first cost a pass over ~6 MB per batch).
    gene_ids = np.empty((n, length), dtype=np.int64)
    targets = np.empty((n, length), dtype=vdtype)
    inputs = np.empty((n, length), dtype=vdtype)
    masked = np.empty((n, length), dtype=bool)
    attention = np.empty((n, length), dtype=bool)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    size = int(offsets[-1]) if bag else 0
    ids = np.empty(size, dtype=np.int64)
    weights = np.empty(size, dtype=np.float32)
    _kernel(
        indptr,
        indices,
        data,
        lognorm,
        rows,
        data.dtype.kind in "ui",
        seeds,
        num_mask,
        k,
        cfg.num_bins,
        binned,
        how == "top",
        gene_ids,
        targets,
        inputs,
        masked,
        attention,
        bag,
        offsets,
        ids,
        weights,
    )
    arrays = (gene_ids, inputs, attention, masked, targets)
    return arrays, ((ids, offsets[:-1], weights) if bag else None)


def cell_seeds(seeds: np.ndarray, n: int, cell_keys: np.ndarray | None) -> np.ndarray:
    """uint64 [n, 2]: the start states of each cell's two splitmix64 streams (subset, mask).

    Without keys cell i starts at seed + i * golden (the batch order decides). With keys the start is a
    splitmix64 hash of seed + key * golden, so no two keyed cells start on the same stream."""
    if cell_keys is None:
        steps = np.arange(n, dtype=np.uint64)
    else:
        steps = np.asarray(cell_keys, dtype=np.int64).astype(np.uint64)
        assert len(steps) == n, "one key per cell"
    z = seeds[None, :].astype(np.uint64) + steps[:, None] * _GOLDEN  # wraps mod 2**64, as in the kernel
    if cell_keys is None:
        return np.ascontiguousarray(z)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return np.ascontiguousarray(z ^ (z >> np.uint64(31)))


def numba_arrays(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    lognorm: np.ndarray,
    cfg: TokenizeConfig,
    how: str,
    mask: bool,
    rng: np.random.Generator | None,
) -> tuple[np.ndarray, ...]:
    """(gene_ids, inputs, attention, masked, targets) of a CSR block (oracle: tests/data/tokenize_oracle.py)."""
    return numba_tokens(indptr, indices, data, lognorm, cfg, how, mask, rng)[0]


@njit(nogil=True, cache=True)
def _bag_kernel(indptr, indices, data, lognorm, gene_ids, masked, ids, weights):
    # Most counts are small integers: their log-values come from a per-cell table (a log1p per element cost
    # twice the whole tokeniser), computed by the same expression as the oracle's continuous_values (tests/data/tokenize_oracle.py).
    table = np.empty(_BAG_TABLE, dtype=np.float64)
    for i in range(len(indptr) - 1):
        s, e = indptr[i], indptr[i + 1]
        total = 0.0
        ordered = True
        for j in range(s, e):
            total += data[j]
            ids[j] = indices[j] + NUM_SPECIAL
            if j > s and indices[j] <= indices[j - 1]:
                ordered = False
        if lognorm[i]:
            for j in range(s, e):
                weights[j] = data[j]
        else:
            total = max(total, 1e-12)
            table[:] = -1.0  # filled on first use: log-values are >= 0
            for j in range(s, e):
                x = np.float64(data[j])
                t = int(x)
                if t == x and t < _BAG_TABLE:
                    if table[t] < 0.0:
                        table[t] = np.log1p(t / total * _SCALE)
                    weights[j] = table[t]
                else:
                    weights[j] = np.log1p(x / total * _SCALE)
        p, last = s, -1
        for c in range(1, gene_ids.shape[1]):
            if not masked[i, c]:
                continue
            g = gene_ids[i, c]
            if ordered:
                # Stores keep a row's genes sorted and tokens follow gene order: one merge walk per row.
                if g < last:
                    p = s
                last = g
                while p < e and ids[p] < g:
                    p += 1
                if p < e and ids[p] == g:
                    weights[p] = 0.0
            else:
                for j in range(s, e):
                    if ids[j] == g:
                        weights[j] = 0.0
                        break


def numba_gene_bag(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    lognorm: np.ndarray,
    gene_ids: np.ndarray,
    masked: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token ids, row offsets, weights) of every non-zero gene of the block, for the model's gene bag, in one
    pass per cell. The weights are the continuous values (log1p per 10k over all of the cell's counts) whatever
    the token encoding, so the bag carries absolute levels that per-cell bins drop; a gene whose token value
    is masked gets weight 0 (the bag must not leak what MLM asks for). Oracle: tests/data/tokenize_oracle.py.
    The loader gets the same from numba_tokens(bag=True) within the tokeniser's pass; this one takes tokens made
    elsewhere, and is what the tests hold the fused pass to."""
    total = int(indptr[-1])
    ids = np.empty(total, dtype=np.int64)
    weights = np.empty(total, dtype=np.float32)
    _bag_kernel(indptr, indices, data, lognorm, gene_ids, masked, ids, weights)
    return ids, np.asarray(indptr[:-1], dtype=np.int64), weights


@intrinsic
def _copy_bytes(typingctx, dst, src, nbytes):
    """memcpy(dst, src, nbytes) on raw addresses: numba's slice assignment copies element by element (~7x
    slower than memcpy for uint16 rows), and a ctypes memcpy would make the kernel uncacheable."""
    sig = types.void(types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        d, s, n = args
        ptr = cgutils.voidptr_t
        cgutils.raw_memcpy(builder, builder.inttoptr(d, ptr), builder.inttoptr(s, ptr), n, 1)
        return context.get_dummy_value()

    return sig, codegen


@njit(nogil=True, cache=True)
def _gather_rows(indptr, indices, data, rows, out_indptr, out_indices, out_data):
    si, sd = indices.itemsize, data.itemsize
    pi, pd = indices.ctypes.data, data.ctypes.data
    qi, qd = out_indices.ctypes.data, out_data.ctypes.data
    for r in range(len(rows)):
        src, dst = indptr[rows[r]], out_indptr[r]
        n = out_indptr[r + 1] - dst
        _copy_bytes(qi + dst * si, pi + src * si, n * si)
        _copy_bytes(qd + dst * sd, pd + src * sd, n * sd)


def take_rows(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, indices, data) of CSR rows `rows` in that order: one memcpy per row and array, GIL released."""
    indices, data = np.ascontiguousarray(indices), np.ascontiguousarray(data)
    # The kernel copies raw bytes without bounds checks: rows are checked by the indexing below, and the
    # source arrays must hold what indptr points at.
    assert len(indices) >= indptr[-1] and len(data) >= indptr[-1] and (np.diff(indptr) >= 0).all()
    lengths = indptr[rows + 1] - indptr[rows]
    out_indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out_indptr[1:])
    nnz = int(out_indptr[-1])
    out_indices = np.empty(nnz, dtype=indices.dtype)
    out_data = np.empty(nnz, dtype=data.dtype)
    _gather_rows(indptr, indices, data, rows, out_indptr, out_indices, out_data)
    return out_indptr, out_indices, out_data


@njit(nogil=True, cache=True)
def _sort_rows(indptr, indices, data):
    """Sort each row's genes ascending (rows of a var order that is not the vocabulary's)."""
    for i in range(len(indptr) - 1):
        s, e = indptr[i], indptr[i + 1]
        for t in range(s + 1, e):
            if indices[t] <= indices[t - 1]:
                order = np.argsort(indices[s:e])
                indices[s:e] = indices[s:e][order]
                data[s:e] = data[s:e][order]
                break


@njit(nogil=True, cache=True)
def _coo_rows_in_order(dim0, dim1, values, joinids, gene_of_col, indptr, indices, data):
    """One sequential pass when the rows arrive in joinid order (TileDB's global order, the usual case);
    False as soon as one does not, leaving the arrays to _coo_counting_sort."""
    pos, row, last, prev_gene, unsorted = 0, -1, -1, -1, False
    for k in range(len(dim0)):
        if dim0[k] != last:
            last = dim0[k]
            r = np.searchsorted(joinids, last)  # once per row, not per non-zero
            if r <= row:
                return False
            indptr[row + 1 : r + 1] = pos
            row, prev_gene = r, -1
        gene = gene_of_col[dim1[k]]
        if gene >= 0:
            unsorted |= gene <= prev_gene
            prev_gene = gene
            indices[pos] = gene
            data[pos] = values[k]
            pos += 1
    indptr[row + 1 :] = pos
    if unsorted:
        _sort_rows(indptr, indices, data)
    return True


@njit(nogil=True, cache=True)
def _coo_counting_sort(dim0, dim1, values, joinids, gene_of_col, indptr, indices, data):
    """Rows in any order: count each row's in-vocabulary entries, then scatter them (stable per row)."""
    indptr[:] = 0
    for k in range(len(dim0)):
        if gene_of_col[dim1[k]] >= 0:
            indptr[np.searchsorted(joinids, dim0[k]) + 1] += 1
    for i in range(len(joinids)):
        indptr[i + 1] += indptr[i]
    cursor = indptr[:-1].copy()
    for k in range(len(dim0)):
        gene = gene_of_col[dim1[k]]
        if gene >= 0:
            row = np.searchsorted(joinids, dim0[k])
            indices[cursor[row]] = gene
            data[cursor[row]] = values[k]
            cursor[row] += 1
    _sort_rows(indptr, indices, data)


def coo_to_csr(
    dim0: np.ndarray,
    dim1: np.ndarray,
    values: np.ndarray,
    joinids: np.ndarray,
    gene_of_col: np.ndarray,
    index_dtype: type,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, indices, data) of a SOMA COO result: row i holds joinid joinids[i] (sorted), genes mapped
    through gene_of_col (-1 = dropped) and ascending within each row; GIL released."""
    nnz = len(dim0)
    indptr = np.zeros(len(joinids) + 1, dtype=np.int64)
    indices = np.empty(nnz, dtype=index_dtype)
    data = np.empty(nnz, dtype=np.float32)
    args = (dim0, dim1, values, joinids, gene_of_col, indptr, indices, data)
    if not _coo_rows_in_order(*args):
        _coo_counting_sort(*args)
    kept = int(indptr[-1])
    return indptr, indices[:kept], data[:kept]
