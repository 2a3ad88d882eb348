"""How an input matrix is read, decided once for ingest, SOMA stores and annotation: which var column holds
Ensembl IDs, which values are acceptable, and whether they are counts or log-normalised.

Two copies of a rule drift, and then two commands disagree about the same file; every reader imports these.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from sclabel_dist.errors import SclabelError

# var columns that may hold Ensembl IDs beside the gene names; the first one present wins, in this order.
ENSEMBL_COLUMNS = ("ensembl", "ensembl_id", "ensembl_ids", "gene_ids", "gene_id", "feature_id")

# Log1p of counts per 10k tops out near log1p(1e4) ~ 9.2; far above that a non-integer matrix was
# normalised but never logged (or is a count matrix with a stray non-integer value): neither kind fits.
MAX_LOGNORM_VALUE = 30.0
# Counts are stored as unsigned integers of at most 32 bits; log-normalised values as float32.
MAX_COUNT = int(np.iinfo(np.uint32).max)
MAX_FLOAT32 = float(np.finfo(np.float32).max)


def pick_ensembl_column(
    columns: Sequence[str], asked: str | None = None, where: object = "", exclude: Iterable[str] = ()
) -> str | None:
    """The var column holding Ensembl IDs: the one asked for, else the first of ENSEMBL_COLUMNS present
    (leaving out `exclude`, e.g. the column already read as gene names); None when there is none."""
    if asked:
        if asked not in columns:
            raise SclabelError(f"{where}: var column {asked!r} not found; present: {sorted(columns)}")
        return asked
    skip = set(exclude)
    return next((c for c in ENSEMBL_COLUMNS if c in columns and c not in skip), None)


def check_values(matrix: object, value_kind: str, where: object, first_row: int = 0) -> None:
    """Raise SclabelError naming the file and row of the first value no kind (`value_kind` 'auto') or the
    given kind can hold: NaN/inf, negatives, non-integer or too large counts, values beyond float32.

    `matrix` is a scipy CSR matrix (rows [first_row, first_row + n) of the file)."""
    data = matrix.data  # type: ignore[attr-defined]
    if data.dtype.kind not in "biuf":
        raise SclabelError(f"{where}: unsupported value dtype {data.dtype}")
    bad = None
    if data.dtype.kind == "f":
        nonfinite = ~np.isfinite(data)
        if nonfinite.any():
            bad = ("NaN or infinite expression value", nonfinite)
    if bad is None and data.dtype.kind != "u":
        neg = data < 0
        if neg.any():
            bad = (
                "negative expression values: the data look scaled or centred; give raw counts or "
                "log1p-normalised values instead",
                neg,
            )
    if bad is None and value_kind == "counts" and data.dtype.kind == "f":
        frac = data != np.round(data)
        if frac.any():
            bad = ("non-integer value declared as counts (use --value-kind lognorm)", frac)
    if bad is None and value_kind == "counts" and data.size and data.max() > MAX_COUNT:
        bad = (
            f"count above {MAX_COUNT} (counts are stored as unsigned 32-bit integers at most)",
            data > MAX_COUNT,
        )
    if bad is None and value_kind == "lognorm" and data.size and data.max() > MAX_FLOAT32:
        bad = ("value beyond float32 range (log-normalised values are stored as float32)", data > MAX_FLOAT32)
    if bad is not None:
        what, mask = bad
        k = int(np.argmax(mask))
        row = int(np.searchsorted(matrix.indptr, k, side="right")) - 1  # type: ignore[attr-defined]
        raise SclabelError(f"{where}: row {first_row + row}: {what} ({data[k]!r})")


def value_kind_of(is_integer: bool, max_value: float, declared: bool | None, where: object) -> str:
    """'counts' or 'lognorm' from whether every value is an integer, the largest value and the file's hint.

    declared: the file's own word (uns['X_is_integer_counts']); True holds the values to it, False means
    log-normalised even when the values happen to be integers.
    """
    if declared is True and not is_integer:
        raise SclabelError(f"{where}: uns['X_is_integer_counts'] is true but X holds non-integer values")
    if is_integer and declared is not False:
        return "counts"
    if max_value > MAX_LOGNORM_VALUE:
        raise SclabelError(
            f"{where}: non-integer values up to {max_value:.6g}: normalised but apparently not log-transformed, "
            "or counts with non-integer values; give raw counts or log1p(normalised counts)"
        )
    return "lognorm"


def detect_value_kind(matrix: object, where: object, declared: bool | None = None) -> str:
    """Check a whole in-memory CSR matrix and return its kind by `value_kind_of` (annotation's path; ingest
    streams blocks through `check_values` and decides from its scan's totals by the same rule)."""
    data = matrix.data  # type: ignore[attr-defined]
    if data.size == 0:
        raise SclabelError(f"{where}: the expression matrix has no non-zero value")
    check_values(matrix, "auto", where)
    is_integer = data.dtype.kind != "f" or bool(np.all(data == np.round(data)))
    return value_kind_of(is_integer, float(data.max()), declared, where)
