"""What an expression matrix's values are: the one rule deciding counts vs log-normalised, and their bounds.

Ingest (data_tools/scan.py) and annotation (annotate/h5ad.py) both decide with `value_kind_of`, so a file is
read as the same kind by every command.
"""

from __future__ import annotations

import numpy as np

from sclabel_dist.errors import SclabelError

# Log1p of counts per 10k tops out near log1p(1e4) ~ 9.2; far above that a non-integer matrix was
# normalised but never logged (or is a count matrix with a stray non-integer value): neither kind fits.
MAX_LOGNORM_VALUE = 30.0
# Counts are stored as unsigned integers of at most 32 bits; log-normalised values as float32.
MAX_COUNT = int(np.iinfo(np.uint32).max)
MAX_FLOAT32 = float(np.finfo(np.float32).max)


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
