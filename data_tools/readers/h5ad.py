"""Read an .h5ad file by row blocks straight from HDF5 (h5py), never loading the whole matrix or obs.

Matrix choice: `layer="NAME"` reads layers/NAME, `use_raw` reads raw/X with raw/var; by default X, except
that when X is not integer counts (uns["X_is_integer_counts"] is False, or a sample of X holds fractional
values) and layers["counts"] exists, layers["counts"] is used: raw counts are what the store should keep.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from sclabel_dist.data.input_rules import pick_ensembl_column
from sclabel_dist.errors import SclabelError

_SAMPLE_VALUES = 1 << 20


def _strings(ds: Any) -> np.ndarray:
    values = ds[()]
    if values.dtype.kind in "SO":
        return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)
    return values.astype(str).astype(object)


def read_column(node: Any, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows [start, stop) of an anndata dataframe column: plain, string or categorical (codes -> values)."""
    import h5py

    if isinstance(node, h5py.Group):
        if node.attrs.get("encoding-type") != "categorical":
            raise SclabelError(f"{node.file.filename}: {node.name}: unsupported column encoding")
        cats = (
            _strings(node["categories"]) if node["categories"].dtype.kind in "SO" else node["categories"][()]
        )
        codes = node["codes"][start:stop]
        out = np.empty(len(codes), dtype=object)
        out[codes >= 0] = np.asarray(cats, dtype=object)[codes[codes >= 0]]
        out[codes < 0] = None
        return out
    values = node[start:stop]
    if values.dtype.kind in "SO":
        return np.array([v.decode() if isinstance(v, bytes) else v for v in values], dtype=object)
    return values


class H5adReader:
    """Row-block reader of one .h5ad (CSR or dense matrix)."""

    def __init__(
        self,
        path: str | Path,
        *,
        layer: str | None = None,
        use_raw: bool = False,
        gene_column: str | None = None,
        ensembl_column: str | None = None,
    ):
        import h5py

        self.path = str(path)
        p = Path(path)
        if not p.is_file():
            raise SclabelError(f"{p}: file not found")
        if p.stat().st_size == 0:
            raise SclabelError(f"{p}: empty file")
        try:
            self._f = h5py.File(p, "r")
        except OSError as exc:
            raise SclabelError(f"{p}: not a readable .h5ad (truncated or not HDF5: {exc})") from None
        try:
            self._init(layer, use_raw, gene_column, ensembl_column)
        except (OSError, KeyError, ValueError) as exc:
            self._f.close()
            raise SclabelError(f"{p}: unreadable .h5ad structure (corrupted or truncated?): {exc}") from None

    def _init(
        self, layer: str | None, use_raw: bool, gene_column: str | None, ensembl_column: str | None
    ) -> None:
        f, p = self._f, Path(self.path)
        self.counts_hint: bool | None = None
        try:
            if "uns" in f and "X_is_integer_counts" in f["uns"]:
                self.counts_hint = bool(f["uns"]["X_is_integer_counts"][()])
        except (OSError, KeyError):
            pass
        if layer and use_raw:
            raise SclabelError(f"{p}: choose --layer or --use-raw, not both")
        var_key = "var"
        if use_raw:
            if "raw" not in f or "X" not in f["raw"]:
                raise SclabelError(f"{p}: --use-raw given but the file has no raw/X")
            self.source, var_key = "raw/X", "raw/var"
            self.counts_hint = None
        elif layer:
            if "layers" not in f or layer not in f["layers"]:
                have = sorted(f["layers"].keys()) if "layers" in f else []
                raise SclabelError(f"{p}: layer {layer!r} not found; layers present: {have}")
            self.source = f"layers/{layer}"
            self.counts_hint = None
        else:
            self.source = "X"
        self._open_matrix(self.source)
        if (
            not layer
            and not use_raw
            and "layers" in f
            and "counts" in f["layers"]
            and not self._looks_integer()
        ):
            self.source = "layers/counts"
            self.counts_hint = None
            self._open_matrix(self.source)
        self._read_var(f.get(var_key, None), gene_column, ensembl_column)

    # -- structure --------------------------------------------------------------------------------------

    def _open_matrix(self, key: str) -> None:
        import h5py

        if key not in self._f:
            raise SclabelError(f"{self.path}: no {key} in the file")
        node = self._f[key]
        if isinstance(node, h5py.Group):
            enc = node.attrs.get("encoding-type", node.attrs.get("h5sparse_format", ""))
            enc = enc.decode() if isinstance(enc, bytes) else str(enc)
            if enc.startswith("csc"):
                raise SclabelError(
                    f"{self.path}: {key} is CSC (column-major); rows cannot be streamed. Convert it with "
                    "adata.X = scipy.sparse.csr_matrix(adata.X) and write the file again"
                )
            if not enc.startswith("csr") or not {"data", "indices", "indptr"} <= set(node.keys()):
                raise SclabelError(f"{self.path}: {key}: unsupported matrix encoding {enc!r}")
            self.num_rows, self.num_cols = (int(x) for x in node.attrs["shape"])
            self._indptr = node["indptr"]
            self._dense = None
        else:
            if node.ndim != 2:
                raise SclabelError(f"{self.path}: {key} is not a 2-D matrix")
            self.num_rows, self.num_cols = (int(x) for x in node.shape)
            self._dense = node
        self._node = node

    def _read_var(self, var: Any, gene_column: str | None, ensembl_column: str | None) -> None:
        if var is None:
            raise SclabelError(f"{self.path}: no var dataframe")
        index_key = var.attrs.get("_index", "_index")
        columns = [k for k in var if k != index_key]
        if gene_column:
            if gene_column not in columns:
                raise SclabelError(f"{self.path}: var column {gene_column!r} not found; present: {columns}")
            names = read_column(var[gene_column])
        else:
            names = read_column(var[index_key])
        self.var_names = [str(v) for v in names]
        ens = pick_ensembl_column(columns, ensembl_column, self.path)
        self.ensembl = None
        if ens:
            self.ensembl = [None if v is None else str(v) for v in read_column(var[ens])]
        if len(self.var_names) != self.num_cols:
            raise SclabelError(
                f"{self.path}: var has {len(self.var_names)} genes, matrix {self.num_cols} columns"
            )

    def _looks_integer(self) -> bool:
        """Whether the current matrix holds integer values (hint first, else a sample of its values)."""
        if self.counts_hint is not None:
            return self.counts_hint
        sample = self.read_rows(0, min(self.num_rows, 1024)).data[:_SAMPLE_VALUES]
        return sample.dtype.kind in "iub" or bool(np.all(sample == np.round(sample)))

    # -- reading ----------------------------------------------------------------------------------------

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        try:
            if self._dense is not None:
                return sp.csr_matrix(self._dense[start:stop])
            ptr = self._indptr[start : stop + 1].astype(np.int64)
            lo, hi = int(ptr[0]), int(ptr[-1])
            data = self._node["data"][lo:hi]
            indices = self._node["indices"][lo:hi]
        except OSError as exc:
            raise SclabelError(
                f"{self.path}: rows {start}-{stop} of {self.source} unreadable (truncated file?): {exc}"
            ) from None
        if len(data) != hi - lo or len(indices) != hi - lo:
            raise SclabelError(
                f"{self.path}: rows {start}-{stop} of {self.source}: arrays shorter than indptr says"
            )
        if len(indices) and (indices.max() >= self.num_cols or indices.min() < 0):
            raise SclabelError(
                f"{self.path}: rows {start}-{stop} of {self.source}: column index out of range"
            )
        return sp.csr_matrix((data, indices, ptr - lo), shape=(stop - start, self.num_cols))

    def blocks(self, block_rows: int, start: int = 0) -> Iterator[tuple[int, sp.csr_matrix]]:
        for a in range(start, self.num_rows, block_rows):
            yield a, self.read_rows(a, min(a + block_rows, self.num_rows))

    def obs(self, columns: Sequence[str], start: int, stop: int) -> dict[str, np.ndarray]:
        obs = self._f.get("obs", None)
        out = {}
        for col in columns:
            if obs is None or col not in obs:
                have = sorted(k for k in obs if k != "_index") if obs is not None else []
                raise SclabelError(f"{self.path}: obs column {col!r} not found; present: {have}")
            out[col] = read_column(obs[col], start, stop)
        return out

    def close(self) -> None:
        self._f.close()
