"""The first streaming pass over an input: value checks, per-gene cell and value totals, integer detection."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from data_tools.readers import InputReader
from sclabel_dist.data.input_rules import MAX_COUNT, MAX_FLOAT32, check_values, value_kind_of
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
    # rows of each block the reader yielded, in order: the --shuffle plan replays the serial shuffle's draws
    block_sizes: list[int] | None = None


def scan_input(
    reader: InputReader,
    block_rows: int = 4096,
    progress: bool = True,
    start: int = 0,
    stop: int | None = None,
) -> InputStats:
    """Stream every row block once; NaN/inf or negative values raise SclabelError naming the file and row.

    start/stop scan rows [start, stop) only (a parallel plan scans ranges in several processes, merge_stats).
    """
    ncols = len(reader.var_names)
    cells = np.zeros(ncols, dtype=np.int64)
    sums = np.zeros(ncols, dtype=np.float64)
    nnz, all_int, max_value = 0, True, 0.0
    sizes: list[int] = []
    stop = reader.num_rows if stop is None else stop
    bar = tqdm(
        total=stop - start, desc=f"scan {reader.path}", unit="cells", disable=not progress, leave=False
    )
    for first, block in reader.blocks(block_rows, start):
        if first >= stop:
            break
        block = block[: stop - first] if first + block.shape[0] > stop else block
        block.eliminate_zeros()
        check_values(block, "auto", reader.path, first)
        cells += np.bincount(block.indices, minlength=ncols)
        sums += np.bincount(block.indices, weights=block.data.astype(np.float64), minlength=ncols)
        if all_int and block.data.dtype.kind == "f":
            all_int = bool(np.all(block.data == np.round(block.data)))
        if block.nnz:
            max_value = max(max_value, float(block.data.max()))
        nnz += block.nnz
        sizes.append(block.shape[0])
        bar.update(block.shape[0])
    bar.close()
    if reader.num_rows == 0:
        raise SclabelError(f"{reader.path}: no cells")
    return InputStats(stop - start, nnz, cells, sums, all_int, max_value, sizes)


def merge_stats(parts: list[InputStats]) -> InputStats:
    """The stats of consecutive row ranges of one input, as one scan of all of them would give."""
    return InputStats(
        sum(p.num_rows for p in parts),
        sum(p.nnz for p in parts),
        np.sum([p.cells_per_column for p in parts], axis=0),
        np.sum([p.sum_per_column for p in parts], axis=0),
        all(p.all_integer for p in parts),
        max(p.max_value for p in parts),
        [n for p in parts for n in p.block_sizes or []],
    )


def _first_bad_row(reader: InputReader, kind: str) -> None:
    """Raise SclabelError naming the first row whose values `kind` cannot store; one more pass, error path only."""
    for start, block in reader.blocks(4096):
        check_values(block, kind, reader.path, start)


def decide_value_kind(stats: InputStats, reader: InputReader, asked: str) -> str:
    """'counts' or 'lognorm': the flag if given, else the shared rule (data/input_rules.py) over the file's hint and values.

    The chosen kind is checked here, before anything is written: non-integer or > 2^32-1 counts, or values
    beyond float32, raise naming the row.
    """
    hint = getattr(reader, "counts_hint", None)
    if asked not in ("auto", "counts", "lognorm"):
        raise SclabelError(f"--value-kind {asked!r}: choose counts, lognorm or auto")
    if asked == "auto" and hint is True and not stats.all_integer:
        _first_bad_row(reader, "counts")  # the row, before the rule's file-level refusal
    kind = asked if asked != "auto" else value_kind_of(stats.all_integer, stats.max_value, hint, reader.path)
    fits = stats.max_value <= MAX_FLOAT32
    if kind == "counts":
        fits = stats.all_integer and stats.max_value <= MAX_COUNT
    if not fits:
        _first_bad_row(reader, kind)
    if asked == "auto" and kind == "lognorm" and hint is None:
        # Said out loud, naming the first non-integer value (found in the first block of a real log-normalised
        # file): one stray value would otherwise turn a count matrix into "lognorm" silently.
        try:
            _first_bad_row(reader, "counts")
        except SclabelError as exc:
            print(f"note: {exc}; no counts hint in the file, so it is stored as log-normalised")
    return kind
