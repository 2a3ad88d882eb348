"""The first streaming pass over an input: value checks, per-gene cell and value totals, integer detection."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from data_tools.readers import InputReader
from data_tools.writer import check_block
from sclabel_dist.errors import SclabelError


@dataclass
class InputStats:
    """What one pass over an input learns: sizes, per-column cells / value sums, whether values are integers."""

    num_rows: int
    nnz: int
    cells_per_column: np.ndarray  # int64 [num_cols]
    sum_per_column: np.ndarray  # float64 [num_cols]
    all_integer: bool
    max_value: float


def scan_input(reader: InputReader, block_rows: int = 4096, progress: bool = True) -> InputStats:
    """Stream every row block once; NaN/inf or negative values raise SclabelError naming the file and row."""
    ncols = len(reader.var_names)
    cells = np.zeros(ncols, dtype=np.int64)
    sums = np.zeros(ncols, dtype=np.float64)
    nnz, all_int, max_value = 0, True, 0.0
    bar = tqdm(
        total=reader.num_rows, desc=f"scan {reader.path}", unit="cells", disable=not progress, leave=False
    )
    for start, block in reader.blocks(block_rows):
        block.eliminate_zeros()
        check_block(block, "auto", reader.path, start)
        cells += np.bincount(block.indices, minlength=ncols)
        sums += np.bincount(block.indices, weights=block.data.astype(np.float64), minlength=ncols)
        if all_int and block.data.dtype.kind == "f":
            all_int = bool(np.all(block.data == np.round(block.data)))
        if block.nnz:
            max_value = max(max_value, float(block.data.max()))
        nnz += block.nnz
        bar.update(block.shape[0])
    bar.close()
    if reader.num_rows == 0:
        raise SclabelError(f"{reader.path}: no cells")
    return InputStats(reader.num_rows, nnz, cells, sums, all_int, max_value)


def decide_value_kind(stats: InputStats, reader: InputReader, asked: str) -> str:
    """'counts' or 'lognorm': the flag if given (counts verified), else the file's hint, else the values."""
    hint = getattr(reader, "counts_hint", None)
    if asked == "counts" or (asked == "auto" and hint is True):
        # A file that says it holds counts (uns["X_is_integer_counts"]) is held to it like the flag.
        if not stats.all_integer:
            # Find the first offending row to name it; one more pass only on this error path.
            for start, block in reader.blocks(4096):
                check_block(block, "counts", reader.path, start)
        return "counts"
    if asked == "lognorm":
        return "lognorm"
    if asked != "auto":
        raise SclabelError(f"--value-kind {asked!r}: choose counts, lognorm or auto")
    return "counts" if (hint is None and stats.all_integer) else "lognorm"
