"""SomaCellStore: a TileDB-SOMA experiment read as a CellStore, its genes mapped onto the run's vocabulary.

Row i of the store is the i-th obs soma_joinid in ascending order. A read_rows call is one SOMA point query
per 1,024 rows (TileDB merges adjacent coordinates into ranges), returned in TileDB's global order; each COO
result is mapped to vocabulary genes and put in CSR order by one compiled pass (kernels.coo_to_csr), or by
one sort of packed 64-bit keys (row | gene | value bits) without numba or while its kernels warm up
(kernel_warmup).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sclabel_dist.data import kernel_warmup
from sclabel_dist.data.input_rules import pick_ensembl_column
from sclabel_dist.data.stores.base import HAVE_NUMBA, CSRBlock, checked_rows
from sclabel_dist.errors import SclabelError
from sclabel_dist.vocab import GeneVocab

# var columns tried for gene names, then for Ensembl IDs (CELLxGENE uses feature_name / feature_id).
NAME_COLUMNS = ("feature_name", "gene_symbols", "gene_name", "var_id", "gene_ids", "feature_id")
COUNT_LAYERS = ("counts", "raw")
DATASET_COLUMNS = ("dataset_id", "dataset")
_ROWS_PER_QUERY = 1024
_TILEDB_CONFIG = {
    # Result buffers of 16 MB, not TileDB's 1 GB: a read comes back in a few pieces, and buffers this size
    # are recycled by malloc instead of being mapped and faulted in afresh for every query.
    "soma.init_buffer_bytes": str(16 << 20),
    # TileDB calls malloc_trim() after each query by default: the next query faults every page of its
    # tile and result buffers back in (half of a read's CPU went to page faults). Keeping the freed heap
    # doubles read throughput for a few hundred MB of resident memory.
    "sm.mem.malloc_trim": "false",
}


class SomaCellStore:
    """One measurement's X layer of a SOMA experiment, in the vocabulary's gene space."""

    def __init__(
        self,
        uri: str,
        *,
        vocab: GeneVocab,
        measurement: str = "RNA",
        layer: str | None = None,
        value_kind: str | None = None,
        var_column: str | None = None,
        min_matched_genes: int = 1,
    ):
        import tiledbsoma

        self.uri = str(uri)
        self.vocab = vocab
        try:
            from sclabel_dist.data.stores.location import is_remote, tiledb_s3_config

            s3 = tiledb_s3_config() if is_remote(self.uri) else {}  # the AWS_* endpoint obstore uses too
            ctx = tiledbsoma.SOMATileDBContext(tiledb_config={**_TILEDB_CONFIG, **s3})
            self._exp = tiledbsoma.Experiment.open(self.uri, context=ctx)
            ms = self._exp.ms[measurement]
        except Exception as exc:
            raise SclabelError(
                f"{uri}: cannot open SOMA experiment/measurement {measurement!r}: {exc}"
            ) from None
        layers = list(ms.X.keys())
        if layer is None:
            layer = next((x for x in ("counts", "data", "raw") if x in layers), layers[0] if layers else "")
        if layer not in layers:
            raise SclabelError(f"{uri}: no X layer {layer!r} in measurement {measurement!r}; have {layers}")
        self._X = ms.X[layer]
        self.layer = layer
        joinids = self._exp.obs.read(column_names=["soma_joinid"]).concat()["soma_joinid"].to_numpy()
        self._joinids = np.sort(joinids).astype(np.int64)
        self.num_rows = len(self._joinids)
        self._gene_of_col, self.match_report = self._map_genes(ms, var_column, min_matched_genes)
        self._all_matched = bool((self._gene_of_col >= 0).all())
        # Gene field of the packed read keys; 0xFFFF marks a var column outside the vocabulary.
        self._gene_shifted = np.where(self._gene_of_col >= 0, self._gene_of_col, 0xFFFF).astype(
            np.uint64
        ) << np.uint64(32)
        self.value_kind = value_kind or self._guess_value_kind()
        if self.value_kind not in ("counts", "lognorm"):
            raise SclabelError(f"{uri}: value_kind {self.value_kind!r}: choose 'counts' or 'lognorm'")

    @property
    def num_genes(self) -> int:
        return len(self.vocab)

    def _map_genes(self, ms: Any, var_column: str | None, min_matched: int) -> tuple[np.ndarray, dict]:
        """int64 [var soma_joinid extent]: vocabulary gene index of each var joinid, -1 when unmatched."""
        var = ms.var.read().concat().to_pandas()
        if var_column is None:
            var_column = next((c for c in NAME_COLUMNS if c in var.columns), None)
        if var_column is None or var_column not in var.columns:
            raise SclabelError(f"{self.uri}: var has no gene-name column (tried {NAME_COLUMNS}): {list(var)}")
        ens_col = pick_ensembl_column(list(var.columns), where=self.uri, exclude=[var_column])
        match = self.vocab.match(
            var[var_column].astype(str).tolist(), None if ens_col is None else var[ens_col].tolist()
        )
        if match.num_matched < min_matched:
            raise SclabelError(
                f"{self.uri}: only {match.num_matched} of {match.num_total} genes (var[{var_column!r}]) are "
                "in the vocabulary; wrong species or gene naming?"
            )
        jid = var["soma_joinid"].to_numpy().astype(np.int64)
        out = np.full(int(jid.max(initial=-1)) + 1, -1, dtype=np.int64)
        out[jid] = match.column_to_gene
        return out, match.report()

    def _guess_value_kind(self) -> str:
        """'counts' for a counts layer or integer-valued data, else 'lognorm'."""
        if self.layer in COUNT_LAYERS:
            return "counts"
        sample = self.read_rows(np.arange(min(self.num_rows, 64))).data
        return "counts" if np.all(sample == np.round(sample)) else "lognorm"

    def value_kinds(self) -> list[tuple[int, int, str]]:
        return [(0, self.num_rows, getattr(self, "value_kind", "counts"))]

    def read_rows(self, rows: np.ndarray) -> CSRBlock:
        rows = checked_rows(rows, self.num_rows, self.uri)
        if len(rows) == 0:
            return CSRBlock.empty(self.num_genes)
        # Queries of at most _ROWS_PER_QUERY rows: each result is converted before the next is fetched, so
        # the transient COO arrays (20 bytes per non-zero) stay small whatever the window size.
        parts = [self._read(rows[i : i + _ROWS_PER_QUERY]) for i in range(0, len(rows), _ROWS_PER_QUERY)]
        return CSRBlock.concat(parts, self.num_genes)

    def _read(self, rows: np.ndarray) -> CSRBlock:
        joinids = self._joinids[rows]
        # Point coordinates: TileDB merges adjacent ones into ranges, so a run costs what a slice does.
        table = self._X.read(coords=(joinids,)).tables().concat()
        dim0 = table["soma_dim_0"].to_numpy()
        dim1 = table["soma_dim_1"].to_numpy()
        values = table["soma_data"].to_numpy()
        if HAVE_NUMBA and kernel_warmup.compiled_ready():
            from sclabel_dist.data.kernels import coo_to_csr

            index_dtype = np.uint16 if self.num_genes < 0xFFFF else np.uint32
            indptr, indices, data = coo_to_csr(dim0, dim1, values, joinids, self._gene_of_col, index_dtype)
        else:
            indptr, indices, data = self._coo_to_csr_numpy(dim0, dim1, values.astype(np.float32), joinids)
        lognorm = np.full(len(rows), getattr(self, "value_kind", "counts") == "lognorm")
        return CSRBlock(indptr, indices, data, lognorm, self.num_genes)

    def _coo_to_csr_numpy(
        self, dim0: np.ndarray, dim1: np.ndarray, data: np.ndarray, joinids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """kernels.coo_to_csr without numba: a sort of packed keys (or a lexsort for huge vocabularies)."""
        n = len(joinids)
        if self.num_genes < 0xFFFF:
            # One uint64 per non-zero: row << 48 | gene << 32 | value bits. The row and gene fields come
            # from pre-shifted lookup tables (a gather each, no searchsorted). TileDB returns (row, column)
            # order and var order usually is vocabulary order, so the keys are most often sorted already;
            # otherwise one np.sort (unique (row, gene) pairs: the value rides along, no argsort).
            j0 = int(joinids[0])
            row_of = np.zeros(int(joinids[-1]) - j0 + 1, dtype=np.uint64)
            row_of[joinids - j0] = np.arange(n, dtype=np.uint64) << np.uint64(48)
            packed = row_of[dim0 - j0]
            packed |= self._gene_shifted[dim1]
            packed |= data.view(np.uint32)
            if not self._all_matched:
                packed = packed[(packed >> np.uint64(32)) & np.uint64(0xFFFF) != np.uint64(0xFFFF)]
            if len(packed) > 1 and not (packed[1:] > packed[:-1]).all():
                packed.sort()
            local = (packed >> np.uint64(48)).astype(np.int64)
            indices = (packed >> np.uint64(32)).astype(np.uint16)  # the cast keeps the low 16 bits: the gene
            data = packed.astype(np.uint32).view(np.float32)
        else:
            gene = self._gene_of_col[dim1]
            keep = gene >= 0
            local = np.searchsorted(joinids, dim0[keep])
            order = np.lexsort((gene[keep], local))
            local, indices, data = local[order], gene[keep][order].astype(np.uint32), data[keep][order]
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(local, minlength=n), out=indptr[1:])
        return indptr, indices, data

    def _obs_column(self, column: str) -> np.ndarray:
        df = self._exp.obs.read(column_names=["soma_joinid", column]).concat().to_pandas()
        df = df.sort_values("soma_joinid")
        values = df[column].astype(object).to_numpy()
        return np.array([None if v is None or v != v else str(v) for v in values], dtype=object)

    def obs_values(self, column: str) -> np.ndarray:
        names = [f.name for f in self._exp.obs.schema]
        if column not in names:
            raise SclabelError(f"{self.uri}: no obs column {column!r}; present: {sorted(names)}")
        return self._obs_column(column)

    def datasets(self) -> np.ndarray:
        names = [f.name for f in self._exp.obs.schema]
        col = next((c for c in DATASET_COLUMNS if c in names), None)
        if col is None:
            return np.full(self.num_rows, self.uri.rstrip("/").rsplit("/", 1)[-1], dtype=object)
        return self._obs_column(col)

    def close(self) -> None:
        self._exp.close()
