"""Input readers: one interface over .h5ad, 10x directories and TileDB-SOMA experiments, read by row blocks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sclabel_dist.errors import SclabelError


class InputReader(Protocol):
    """A cell x gene input read in row blocks; never loads the whole matrix."""

    path: str
    num_rows: int
    var_names: list[str]
    ensembl: list[str | None] | None
    counts_hint: bool | None  # the file says whether its matrix holds raw integer counts (None: unknown)

    def blocks(self, block_rows: int, start: int = 0) -> Iterator[tuple[int, Any]]:
        """Yield (first row, CSR block in input column space) from `start` to the end."""
        ...

    def read_rows(self, start: int, stop: int) -> Any:
        """Rows [start, stop) as CSR in input column space."""
        ...

    def obs(self, columns: Sequence[str], start: int, stop: int) -> dict[str, np.ndarray]:
        """obs values of rows [start, stop) for the named columns (SclabelError when one is missing)."""
        ...

    def close(self) -> None: ...


def detect_kind(path: str | Path) -> str:
    """'h5ad', '10x' or 'soma' from what is on disk."""
    p = Path(path)
    if p.is_dir():
        names = {q.name for q in p.iterdir()}
        if names & {"matrix.mtx", "matrix.mtx.gz"}:
            return "10x"
        if "ms" in names or "obs" in names or "__tiledb_group.tdb" in names or "__group" in names:
            return "soma"
        raise SclabelError(
            f"{p}: directory is neither a 10x matrix directory (matrix.mtx[.gz]) nor a SOMA experiment"
        )
    if p.suffix == ".h5ad" or p.suffix == ".h5":
        return "h5ad"
    if not p.exists():
        raise SclabelError(f"{p}: input not found")
    raise SclabelError(f"{p}: unknown input type (expected .h5ad, a 10x directory or a SOMA experiment)")


def open_input(
    path: str | Path,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    gene_column: str | None = None,
    ensembl_column: str | None = None,
    measurement: str = "RNA",
    workdir: str | Path | None = None,
) -> InputReader:
    """Open any supported input; `layer`/`use_raw` pick the matrix (h5ad: default X, see readers.h5ad)."""
    kind = detect_kind(path)
    if kind == "h5ad":
        from data_tools.readers.h5ad import H5adReader

        return H5adReader(
            path, layer=layer, use_raw=use_raw, gene_column=gene_column, ensembl_column=ensembl_column
        )
    if use_raw:
        raise SclabelError(f"{path}: --use-raw applies to .h5ad input only")
    if kind == "10x":
        from data_tools.readers.tenx import TenXReader

        if layer:
            raise SclabelError(f"{path}: --layer does not apply to a 10x directory")
        return TenXReader(path, workdir=workdir)
    from data_tools.readers.soma import SomaReader

    return SomaReader(
        path, measurement=measurement, layer=layer, gene_column=gene_column, ensembl_column=ensembl_column
    )
