"""A memory budget per ingest worker (`--worker-memory`): how many rows a worker may read per block.

A worker holds what it has imported and opened (measured: its resident memory when it starts a dataset), one
shard part (fixed by the plan's rows per shard: the store's layout, never changed by a budget) and one read
block. Only the block is free to shrink, and shrinking it changes no byte of the store (shards are cut by row,
not by block), so the budget sets the block's rows and refuses, naming what it needs, a budget that cannot
hold one part. Each part reports its measured peak against the budget.
"""

from __future__ import annotations

import os
import re

from sclabel_dist.errors import SclabelError

# Bytes per non-zero, fitted to measured peaks (benchmarks/RESULTS.md, Parallel ingest: a 200k-cell .h5ad of
# ~1,000 non-zeros per cell, 2 workers, blocks of 2,300 and 4,096 rows). A part: its reused buffer (int32
# index + 32-bit value) and the narrowed copy write_part encodes from. Shuffled, the part is rebuilt from its
# spill and reordered: one more copy. A block: the reader's arrays, the CSR built from them, its copy remapped
# to the vocabulary, the checked one and the freed-but-held holes between them (~70 B, not the 8 B it stores).
PART_BYTES_PER_NNZ = 18
SHUFFLED_PART_BYTES_PER_NNZ = 32
BLOCK_BYTES_PER_NNZ = 72
MIN_BLOCK_ROWS = 64
_UNITS = {"": 1, "k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}


def parse_size_mib(text: str) -> int:
    """'800MiB', '800M', '2GiB', '1.5g' or a bare number of MiB -> MiB."""
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not found:
        raise SclabelError(f"--worker-memory {text!r}: give a size such as 800MiB or 2GiB")
    return int(float(found.group(1)) * _UNITS[found.group(2).lower()])


def resident_mib() -> float:
    """This process's resident memory now (Linux /proc/self/statm), in MiB."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def block_rows_within(
    budget_mib: int,
    resident: float,
    rows_per_shard: int,
    mean_nnz: float,
    shuffled: bool,
    max_rows: int,
    where: str,
) -> int:
    """Rows per read block so that resident + one part + one block stays within `budget_mib` (<= max_rows)."""
    per_part = SHUFFLED_PART_BYTES_PER_NNZ if shuffled else PART_BYTES_PER_NNZ
    part_mib = rows_per_shard * max(mean_nnz, 1.0) * per_part / 2**20
    row_mib = max(mean_nnz, 1.0) * BLOCK_BYTES_PER_NNZ / 2**20
    rows = int((budget_mib - resident - part_mib) / row_mib)
    if rows < MIN_BLOCK_ROWS:
        need = resident + part_mib + MIN_BLOCK_ROWS * row_mib
        raise SclabelError(
            f"{where}: --worker-memory {budget_mib} MiB cannot hold this worker ({resident:.0f} MiB resident) "
            f"plus one shard of {rows_per_shard} rows ({part_mib:.0f} MiB) and a {MIN_BLOCK_ROWS}-row block: "
            f"give at least {need:.0f} MiB, or fewer --rows-per-shard"
        )
    return min(rows, max_rows)
