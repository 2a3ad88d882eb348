"""One pass over an input's expression values, block by block: what predict checks before annotating.

The value kind (counts or log-normalised), the expression per input column (for the gene-match report) and,
for continuous models, each cell's expm1 row sum (is log-normalised input on the log1p-per-10k scale?) are
decided over the whole input, not a sample, exactly as reading it into memory did; the pass holds only these
running totals, so its memory does not grow with the number of cells beyond 4 bytes per cell.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from sclabel_dist.data.input_rules import value_kind_of
from sclabel_dist.errors import SclabelError


@dataclass
class ValueStats:
    """Running totals over the blocks of one input (cells in input column space); merge() joins ranks."""

    num_columns: int
    row_sums: bool = False  # keep each cell's expm1 row sum (continuous models only)
    nnz: int = 0
    is_integer: bool = True
    min_value: float = np.inf
    max_value: float = -np.inf
    first_bad_row: int = -1  # the first row (global index) holding a NaN or infinite value
    column_sums: np.ndarray = field(default=None)  # type: ignore[assignment]
    expm1_sums: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.column_sums is None:
            self.column_sums = np.zeros(self.num_columns, dtype=np.float64)

    def update(self, X: sp.csr_matrix, first_row: int) -> None:
        """Add a block of cells whose first row is `first_row` of the input."""
        data = X.data
        if self.row_sums:
            self.expm1_sums.append(np.asarray(X.expm1().sum(axis=1)).ravel().astype(np.float32))
        if data.size == 0:
            return
        finite = np.isfinite(data)
        if not finite.all():
            row = int(np.searchsorted(X.indptr, int(np.flatnonzero(~finite)[0]), side="right") - 1)
            if self.first_bad_row < 0:
                self.first_bad_row = first_row + row
            data = data[finite]
        self.nnz += int(X.data.size)
        if data.size:
            self.is_integer &= bool(np.all(data == np.round(data)))
            self.min_value = min(self.min_value, float(data.min()))
            self.max_value = max(self.max_value, float(data.max()))
        self.column_sums += np.bincount(
            X.indices, weights=np.where(finite, X.data, 0), minlength=self.num_columns
        )

    def merge(self, other: ValueStats) -> None:
        """Fold another rank's totals (of later rows) into these."""
        self.nnz += other.nnz
        self.is_integer &= other.is_integer
        self.min_value = min(self.min_value, other.min_value)
        self.max_value = max(self.max_value, other.max_value)
        if self.first_bad_row < 0:
            self.first_bad_row = other.first_bad_row
        self.column_sums += other.column_sums
        self.expm1_sums += other.expm1_sums

    def value_kind(self, where: object, declared: bool | None = None) -> str:
        """'counts' or 'lognorm' for the whole input; SclabelError for values neither kind allows."""
        if self.nnz == 0:
            raise SclabelError(f"{where}: the expression matrix has no non-zero value")
        if self.first_bad_row >= 0:
            raise SclabelError(f"{where}: NaN or infinite expression value in row {self.first_bad_row}")
        if self.min_value < 0:
            raise SclabelError(
                f"{where}: negative expression values (min {self.min_value:.3g}): the data look scaled or "
                "centred; give raw counts or log1p-normalised values instead"
            )
        return value_kind_of(self.is_integer, self.max_value, declared, where)

    def row_sums_array(self) -> np.ndarray:
        """Every cell's expm1 row sum, in input order (needs row_sums=True)."""
        return np.concatenate(self.expm1_sums) if self.expm1_sums else np.zeros(0, np.float32)
