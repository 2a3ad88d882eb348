"""Read a TileDB-SOMA experiment by row blocks: X of one measurement (default RNA), var from that measurement.

The X layer: the one asked for, else "counts" when present, else "data" (tiledbsoma.io.from_anndata's name
for X), else the only layer. Rows are obs soma_joinids, which must be 0..n-1 (as from_anndata writes them).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from sclabel_dist.data.input_rules import pick_ensembl_column
from sclabel_dist.errors import SclabelError


class SomaReader:
    """Row-block reader of a SOMA experiment."""

    def __init__(
        self,
        path: str | Path,
        *,
        measurement: str = "RNA",
        layer: str | None = None,
        gene_column: str | None = None,
        ensembl_column: str | None = None,
    ):
        import tiledbsoma

        self.path = str(path)
        try:
            self._exp = tiledbsoma.Experiment.open(str(path))
        except Exception as exc:  # tiledbsoma raises many types for a bad path
            raise SclabelError(f"{path}: not a readable SOMA experiment ({exc})") from None
        if measurement not in self._exp.ms:
            raise SclabelError(
                f"{path}: measurement {measurement!r} not found; present: {sorted(self._exp.ms.keys())}"
            )
        ms = self._exp.ms[measurement]
        layers = sorted(ms.X.keys())
        if layer is None:
            layer = next(
                (n for n in ("counts", "data") if n in layers), layers[0] if len(layers) == 1 else None
            )
        if layer not in layers:
            raise SclabelError(
                f"{path}: X layer {layer!r} not found in measurement {measurement!r}; present: {layers}"
            )
        self.source = f"ms/{measurement}/X/{layer}"
        self._X = ms.X[layer]
        var = ms.var.read().concat().to_pandas().sort_values("soma_joinid")
        columns = [c for c in var.columns if c != "soma_joinid"]
        name_col = gene_column or ("var_id" if "var_id" in columns else columns[0] if columns else None)
        if name_col is None or name_col not in columns:
            raise SclabelError(f"{path}: var column {name_col!r} not found; present: {columns}")
        self.var_names = [str(v) for v in var[name_col]]
        ens = pick_ensembl_column(columns, ensembl_column, self.path, exclude=[name_col])
        self.ensembl = [None if v is None else str(v) for v in var[ens]] if ens else None
        self.num_cols = len(var)
        self._var_pos = np.full(int(var["soma_joinid"].max()) + 1 if len(var) else 0, -1, dtype=np.int64)
        self._var_pos[var["soma_joinid"].to_numpy()] = np.arange(len(var))
        self.num_rows = int(self._exp.obs.count)
        self.counts_hint = None

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        if stop <= start:
            return sp.csr_matrix((0, self.num_cols), dtype=np.float32)
        tables = self._X.read(coords=(slice(start, stop - 1),)).tables().concat()
        rows = tables["soma_dim_0"].to_numpy() - start
        cols = self._var_pos[tables["soma_dim_1"].to_numpy()]
        vals = tables["soma_data"].to_numpy()
        return sp.coo_matrix((vals, (rows, cols)), shape=(stop - start, self.num_cols)).tocsr()

    def blocks(self, block_rows: int, start: int = 0) -> Iterator[tuple[int, sp.csr_matrix]]:
        for a in range(start, self.num_rows, block_rows):
            yield a, self.read_rows(a, min(a + block_rows, self.num_rows))

    def obs(self, columns: Sequence[str], start: int, stop: int) -> dict[str, np.ndarray]:
        present = set(self._exp.obs.schema.names)
        for col in columns:
            if col not in present:
                raise SclabelError(f"{self.path}: obs column {col!r} not found; present: {sorted(present)}")
        if not columns:
            return {}
        table = self._exp.obs.read(
            coords=(slice(start, stop - 1),), column_names=["soma_joinid", *columns]
        ).concat()
        df = table.to_pandas().sort_values("soma_joinid")
        return {c: df[c].astype(object).where(df[c].notna(), None).to_numpy() for c in columns}

    def close(self) -> None:
        self._exp.close()
