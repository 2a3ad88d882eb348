"""Tiny real input files for the ingest tests: .h5ad (sparse, dense, layers, raw), 10x directories, stores."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from sclabel_dist.data import format as fmt
from sclabel_dist.vocab import GeneVocab, remap_csr

GENES = [f"Gene{i}" for i in range(40)]
ENSEMBL = [f"ENSG{i:011d}" for i in range(40)]


def counts_matrix(n: int = 50, g: int = 40, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = rng.poisson(0.6, size=(n, g)) * (rng.random((n, g)) < 0.5)
    dense[3] = 0  # an empty cell
    return sp.csr_matrix(dense.astype(np.int32))


def make_adata(n: int = 50, seed: int = 0, dense: bool = False):
    import anndata as ad
    import pandas as pd

    X = counts_matrix(n, len(GENES), seed)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(np.array(["T", "B", "NK"])[np.arange(n) % 3]),
            "batch": [f"b{i % 2}" for i in range(n)],
        },
        index=[f"c{i}" for i in range(n)],
    )
    var = pd.DataFrame({"ensembl": ENSEMBL}, index=GENES)
    return ad.AnnData(X=X.toarray() if dense else X, obs=obs, var=var)


def write_h5ad(path: Path, adata) -> Path:
    adata.write_h5ad(path)
    return path


def write_10x(
    directory: Path, X: sp.csr_matrix, genes: list[str], ids: list[str], gz: bool, version3: bool = True
) -> Path:
    """A 10x directory; entries written in a shuffled order (the reader must not assume cell order)."""
    directory.mkdir(parents=True)
    coo = X.tocoo()
    order = np.random.default_rng(1).permutation(coo.nnz)
    lines = [
        "%%MatrixMarket matrix coordinate integer general",
        "%metadata_json: {}",
        f"{X.shape[1]} {X.shape[0]} {coo.nnz}",
        *(f"{coo.col[k] + 1} {coo.row[k] + 1} {coo.data[k]}" for k in order),
    ]
    feats = [
        f"{i}\t{g}\tGene Expression" if version3 else f"{i}\t{g}" for i, g in zip(ids, genes, strict=True)
    ]
    barcodes = [f"AAAC-{i}" for i in range(X.shape[0])]
    files = {
        "matrix.mtx": lines,
        ("features.tsv" if version3 else "genes.tsv"): feats,
        "barcodes.tsv": barcodes,
    }
    for name, content in files.items():
        text = "\n".join(content) + "\n"
        if gz:
            with gzip.open(directory / f"{name}.gz", "wt") as fh:
                fh.write(text)
        else:
            (directory / name).write_text(text)
    return directory


def read_dataset(store: Path, dataset: str) -> sp.csr_matrix:
    """All rows of one dataset, in store order, as CSR in gene index space."""
    index = fmt.read_index(store)
    parts = [shard_rows(store, s) for s in index.shards if s.dataset == dataset]
    return sp.vstack(parts, format="csr")


def read_obs(store: Path, dataset: str, column: str) -> list:
    index = fmt.read_index(store)
    cats = index.obs_columns[column]
    codes = np.concatenate(
        [fmt.read_obs_codes(store, s, column) for s in index.shards if s.dataset == dataset]
    )
    return [cats[c] if c >= 0 else None for c in codes]


def expected(store: Path, X, var_names, ensembl=None) -> sp.csr_matrix:
    vocab = GeneVocab.from_json(store / fmt.VOCAB_FILE)
    return remap_csr(sp.csr_matrix(X), vocab.match(var_names, ensembl))


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_tools", *args], capture_output=True, text=True, timeout=timeout
    )


def shard_rows(store: Path, shard: object, start: int = 0, stop: int | None = None) -> sp.csr_matrix:
    """Rows [start, stop) of one shard, read through the store class (the one reader of the layout)."""
    from sclabel_dist.data.stores.zarr_store import ZarrCellStore

    stop = shard.num_rows if stop is None else stop
    rows = np.arange(shard.row_offset + start, shard.row_offset + stop)
    return ZarrCellStore(store).read_rows(rows).to_scipy()
