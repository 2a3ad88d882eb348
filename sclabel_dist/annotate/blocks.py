"""Inputs read in blocks of cells for predict / embed: an `.h5ad` opened backed, one read into memory, a cell
store or a SOMA experiment. Peak memory is set by the block size, not by the number of cells.

A source answers `read(start, stop)` with Blocks: the cells' names and their expression in the bundle's gene
space (float32 CSR, values as stored: counts or log-normalised). `.h5ad` sources also `scan` their values in
the file's own columns first (annotate/scan.py), so predict checks the gene match and the value kind over the
whole input exactly as it did with the file in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp

from sclabel_dist.annotate.scan import ValueStats
from sclabel_dist.data.input_rules import pick_ensembl_column
from sclabel_dist.errors import SclabelError


@dataclass
class Block:
    """Cells [start, start + n) of the input: names, expression in vocabulary space, and the values' kind."""

    start: int
    names: np.ndarray  # str
    X: sp.csr_matrix  # float32, num_cells x vocabulary genes, canonical (sorted, no duplicates)
    value_kind: str


class BlockSource(Protocol):
    where: str
    num_cells: int
    match: Any  # GeneMatch of the input's genes onto the bundle's vocabulary

    def read(self, start: int, stop: int) -> list[Block]: ...

    def close(self) -> None: ...


def canonical(X: Any) -> sp.csr_matrix:
    """float32 CSR with sorted indices and no duplicates (what read_h5ad made of a whole matrix)."""
    X = sp.csr_matrix(X, dtype=np.float32)
    X.sum_duplicates()
    X.sort_indices()
    return X


class MatrixSource:
    """An .h5ad-like input: rows read in the file's columns, then mapped onto the vocabulary per block."""

    where: str
    num_cells: int
    num_columns: int
    var_names: list[str]
    ensembl: list[str] | None
    declared: bool | None
    value_kind: str = ""  # decided by the scan (predict) before any read()
    match: Any = None

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        raise NotImplementedError

    def names(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def match_to(self, vocab: Any) -> Any:
        self.match = vocab.match(self.var_names, ensembl=self.ensembl)
        return self.match

    def scan(self, start: int, stop: int, block_size: int, stats: ValueStats) -> None:
        """Add cells [start, stop) to `stats`, block by block."""
        for lo in range(start, stop, block_size):
            stats.update(self.rows(lo, min(stop, lo + block_size)), lo)

    def read(self, start: int, stop: int) -> list[Block]:
        from sclabel_dist.vocab import remap_csr

        assert self.match is not None and self.value_kind, "match_to() and the scan come first"
        X = remap_csr(self.rows(start, stop), self.match).astype(np.float32)
        return [Block(start, self.names(start, stop), X, self.value_kind)]

    def close(self) -> None:
        pass


class MemorySource(MatrixSource):
    """An .h5ad read whole with read_h5ad (any layout anndata reads: CSC, dense, old formats)."""

    def __init__(self, path: Path, layer: str | None):
        from sclabel_dist.annotate.h5ad import read_h5ad

        inp = read_h5ad(path, layer=layer)
        self.where, self._X = str(path), inp.X
        self.num_cells, self.num_columns = inp.X.shape
        self.var_names, self.ensembl = inp.var_names, inp.ensembl
        self._names = np.asarray(inp.obs_names, dtype=str)
        declared = inp.adata.uns.get("X_is_integer_counts") if layer is None else None
        self.declared = None if declared is None else bool(declared)

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        return self._X[start:stop]

    def names(self, start: int, stop: int) -> np.ndarray:
        return self._names[start:stop]


class BackedH5adSource(MatrixSource):
    """An .h5ad opened with h5py: only `indptr` (8 bytes per cell) is held; rows are read slice by slice."""

    def __init__(self, path: Path, layer: str | None):
        import h5py

        self.where = str(path)
        try:
            self._file = h5py.File(path, "r")
        except OSError as exc:
            raise SclabelError(f"{path}: not a readable .h5ad file ({exc})") from None
        f = self._file
        if layer is None:
            if "X" not in f:
                raise SclabelError(f"{path}: no X matrix")
            elem = f["X"]
        else:
            layers = sorted(f["layers"]) if "layers" in f else []
            if layer not in layers:
                raise SclabelError(f"{path}: no layer {layer!r}; layers are {layers}")
            elem = f["layers"][layer]
        self._elem, self._indptr = elem, None
        if isinstance(elem, h5py.Group):
            encoding = _attr(elem, "encoding-type") or f"{_attr(elem, 'h5sparse_format')}_matrix"
            if encoding != "csr_matrix":
                raise SclabelError(
                    f"{path}: the matrix is stored as {encoding}, which cannot be read in blocks of cells; pass "
                    "--in-memory to read it whole (if it fits), or rewrite it as CSR"
                )
            self.num_cells, self.num_columns = (int(v) for v in elem.attrs["shape"])
            self._indptr = elem["indptr"][:].astype(np.int64)
        else:
            self.num_cells, self.num_columns = elem.shape
        if self.num_cells == 0 or self.num_columns == 0:
            raise SclabelError(
                f"{path}: empty expression matrix ({self.num_cells} cells x {self.num_columns} genes)"
            )
        self._read_annotations(path, layer)

    def _read_annotations(self, path: Path, layer: str | None) -> None:
        from anndata.io import read_elem

        f = self._file
        try:
            var = read_elem(f["var"])
        except Exception as exc:  # anndata raises many types for foreign files
            raise SclabelError(f"{path}: unreadable var ({type(exc).__name__}: {exc})") from None
        self.var_names = [str(v) for v in var.index]
        column = pick_ensembl_column(list(var.columns), where=path)  # the rule read_h5ad uses
        self.ensembl = None if column is None else [str(v) for v in var[column]]
        self.declared = None
        if layer is None and "uns" in f and "X_is_integer_counts" in f["uns"]:
            self.declared = bool(f["uns"]["X_is_integer_counts"][()])
        obs = f["obs"]
        key = _attr(obs, "_index")
        self._obs_index = obs[key] if key and key in obs else None

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        if self._indptr is None:
            return canonical(self._elem[start:stop])
        lo, hi = int(self._indptr[start]), int(self._indptr[stop])
        indptr = self._indptr[start : stop + 1] - lo
        data = self._elem["data"][lo:hi]
        indices = self._elem["indices"][lo:hi]
        return canonical(sp.csr_matrix((data, indices, indptr), shape=(stop - start, self.num_columns)))

    def names(self, start: int, stop: int) -> np.ndarray:
        if self._obs_index is None:
            return np.arange(start, stop).astype(str)
        return np.asarray(self._obs_index.asstr()[start:stop], dtype=str)

    def close(self) -> None:
        self._file.close()


class StoreSource:
    """A cell store (Zarr, its own vocabulary mapped onto the bundle's) or a SOMA experiment (mapped on open)."""

    def __init__(self, uri: str, vocab: Any, layer: str | None):
        from sclabel_dist.data.stores import open_store

        self.where = uri
        soma = not (Path(uri) / "index.json").is_file()
        kwargs = {"layer": layer} if soma and layer else {}
        if layer and not soma:
            raise SclabelError(f"{uri}: a cell store has no layers (--layer {layer!r})")
        self._store = open_store(uri, vocab=vocab, **kwargs)
        self.num_cells = int(self._store.num_rows)
        if self.num_cells == 0:
            raise SclabelError(f"{uri}: the store holds no cells")
        self._soma = soma
        self.report: dict | None = getattr(self._store, "match_report", None)
        store_vocab = vocab if soma else self._store.vocab
        self.match = vocab.match(store_vocab.genes, ensembl=getattr(store_vocab, "ensembl", None))
        self._kinds = self._store.value_kinds()
        self._datasets = None if soma else self._store.datasets()
        self._obs_ids = None
        if soma:  # cell names: the obs_id column that to-soma and tiledbsoma's from_h5ad write, when present
            try:
                self._obs_ids = self._store.obs_values("obs_id")
            except SclabelError:
                self._obs_ids = None

    @property
    def value_kinds(self) -> set[str]:
        return {kind for _, _, kind in self._kinds}

    def names(self, start: int, stop: int) -> np.ndarray:
        if self._obs_ids is not None:
            return np.asarray(self._obs_ids[start:stop], dtype=str)
        rows = np.arange(start, stop).astype(str)
        if self._datasets is None:
            return rows
        return np.char.add(np.char.add(self._datasets[start:stop].astype(str), ":"), rows)

    def read(self, start: int, stop: int) -> list[Block]:
        from sclabel_dist.vocab import remap_csr

        out = []
        # One Block per value kind: a store may join counts and log-normalised datasets.
        for lo, hi, kind in self._kinds:
            a, b = max(start, lo), min(stop, hi)
            if a >= b:
                continue
            X = canonical(self._store.read_rows(np.arange(a, b, dtype=np.int64)).to_scipy())
            if not self._soma:
                X = remap_csr(X, self.match).astype(np.float32)
            out.append(Block(a, self.names(a, b), X, kind))
        return out

    def close(self) -> None:
        self._store.close()


def _attr(node: Any, key: str) -> str | None:
    value = node.attrs.get(key)
    return None if value is None else (value.decode() if isinstance(value, bytes) else str(value))


def is_h5ad(path: str) -> bool:
    return Path(path).suffix == ".h5ad" or Path(path).is_file()


def open_source(data: str, vocab: Any, *, layer: str | None, in_memory: bool) -> Any:
    """The block source for `data`: .h5ad (backed, or whole with in_memory), a cell store or a SOMA experiment."""
    if is_h5ad(data):
        path = Path(data)
        if not path.is_file():
            raise SclabelError(f"{path}: no such .h5ad file")
        source = MemorySource(path, layer) if in_memory else BackedH5adSource(path, layer)
        source.match_to(vocab)
        return source
    if not Path(data).exists() and "://" not in data:
        raise SclabelError(f"{data}: no such .h5ad file, cell store or SOMA experiment")
    return StoreSource(data, vocab, layer)
