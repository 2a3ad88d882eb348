"""Read an `.h5ad` for annotation: expression matrix as CSR, gene names, labels, and its value kind."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from sclabel_dist.errors import SclabelError

# Columns of `var` that may hold Ensembl ids beside the symbols in var_names (first one present wins).
ENSEMBL_COLUMNS = ("ensembl", "ensembl_id", "gene_ids", "gene_id", "ensembl_ids")
# Strings that mean "no label": such cells are left out of training and reported.
MISSING_LABELS = frozenset({"", "nan", "none", "na", "n/a", "null", "unknown", "unassigned"})


@dataclass
class H5adInput:
    """One input file, as the annotation commands need it."""

    path: Path
    X: sp.csr_matrix
    var_names: list[str]
    ensembl: list[str] | None
    value_kind: str  # "counts" or "lognorm"
    adata: Any  # the AnnData as read (predict writes a copy of it with its results added)

    @property
    def obs(self) -> Any:
        return self.adata.obs

    @property
    def obs_names(self) -> list[str]:
        return [str(v) for v in self.adata.obs_names]


def read_h5ad(path: str | Path, layer: str | None = None) -> H5adInput:
    """Read `path` (X, or `layers[layer]`) into memory with float32 CSR rows and a detected value kind."""
    import anndata

    path = Path(path)
    if not path.is_file():
        raise SclabelError(f"{path}: no such .h5ad file")
    try:
        adata = anndata.read_h5ad(path)
    except Exception as exc:  # h5py / anndata raise many types for a truncated or foreign file
        raise SclabelError(f"{path}: not a readable .h5ad file ({type(exc).__name__}: {exc})") from None
    if layer is None:
        matrix = adata.X
    elif layer in adata.layers:
        matrix = adata.layers[layer]
    else:
        raise SclabelError(f"{path}: no layer {layer!r}; layers are {sorted(adata.layers)}")
    if matrix is None or adata.n_obs == 0 or adata.n_vars == 0:
        raise SclabelError(f"{path}: empty expression matrix ({adata.n_obs} cells x {adata.n_vars} genes)")
    X = sp.csr_matrix(matrix, dtype=np.float32)
    X.sum_duplicates()
    X.sort_indices()
    ensembl = None
    for column in ENSEMBL_COLUMNS:
        if column in adata.var.columns:
            ensembl = [str(v) for v in adata.var[column]]
            break
    declared = adata.uns.get("X_is_integer_counts") if layer is None else None
    value_kind = detect_value_kind(X, path, declared=None if declared is None else bool(declared))
    return H5adInput(
        path=path,
        X=X,
        var_names=[str(v) for v in adata.var_names],
        ensembl=ensembl,
        value_kind=value_kind,
        adata=adata,
    )


def detect_value_kind(X: sp.csr_matrix, where: Path | str, declared: bool | None = None) -> str:
    """'counts' for non-negative integers, 'lognorm' for log-normalised values; refuse anything else."""
    from sclabel_dist.annotate.scan import ValueStats

    # One rule for whole matrices and for inputs scanned block by block (scan.py).
    stats = ValueStats(X.shape[1])
    stats.update(X, 0)
    return stats.value_kind(where, declared)


def read_labels(inp: H5adInput, label_key: str) -> np.ndarray:
    """The label column as an object array of strings, None where missing; refuses an absent key."""
    if label_key not in inp.obs.columns:
        raise SclabelError(
            f"{inp.path}: label key {label_key!r} not in obs; columns are {list(map(str, inp.obs.columns))}"
        )
    raw = inp.obs[label_key].to_numpy(dtype=object)
    labels = np.empty(len(raw), dtype=object)
    for i, value in enumerate(raw):
        text = None if value is None or (isinstance(value, float) and np.isnan(value)) else str(value).strip()
        labels[i] = None if text is None or text.lower() in MISSING_LABELS else text
    return labels
