"""Tiny cell stores built with the real StoreWriter (and a SOMA experiment via tiledbsoma.io)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from sclabel_dist.vocab import GeneVocab

NUM_GENES = 60


def random_csr(
    rng: np.random.Generator, n: int, *, lognorm: bool = False, max_nnz: int = 40
) -> sp.csr_matrix:
    """Cells with 0..max_nnz genes (some empty), integer counts or log-normalised floats."""
    dense = np.zeros((n, NUM_GENES), dtype=np.float32)
    for i in range(n):
        k = int(rng.integers(0, max_nnz + 1)) if i % 17 else 0
        genes = rng.choice(NUM_GENES, size=k, replace=False)
        dense[i, genes] = rng.integers(1, 30, size=k)
    if lognorm:
        tot = dense.sum(1, keepdims=True)
        dense = np.log1p(dense / np.maximum(tot, 1) * 1e4).astype(np.float32)
    return sp.csr_matrix(dense)


@pytest.fixture(scope="session")
def vocab() -> GeneVocab:
    return GeneVocab([f"Gene{i}" for i in range(NUM_GENES)])


def _write(path: Path, vocab: GeneVocab, parts: list[tuple[str, sp.csr_matrix, str]]) -> None:
    from data_tools.writer import StoreWriter

    for i, (name, mat, kind) in enumerate(parts):
        tissue = np.where(np.arange(mat.shape[0]) % 3 == 0, "lung", "kidney")
        with StoreWriter(
            path,
            vocab,
            name,
            value_kind=kind,
            obs_columns=["tissue"],
            rows_per_shard=128,
            mode="create" if i == 0 else "append",
        ) as w:
            w.write_block(mat[:100], obs={"tissue": tissue[:100]})
            w.write_block(mat[100:], obs={"tissue": tissue[100:]})


@pytest.fixture(scope="session")
def store_a(tmp_path_factory, vocab) -> tuple[Path, sp.csr_matrix]:
    """Two count datasets (300 + 170 cells) in several shards; returns (path, all rows as CSR)."""
    rng = np.random.default_rng(0)
    a, b = random_csr(rng, 300), random_csr(rng, 170)
    path = tmp_path_factory.mktemp("stores") / "a"
    _write(path, vocab, [("dsA", a, "counts"), ("dsB", b, "counts")])
    return path, sp.vstack([a, b]).tocsr()


@pytest.fixture(scope="session")
def store_ln(tmp_path_factory, vocab) -> tuple[Path, sp.csr_matrix]:
    """One log-normalised dataset of 90 cells."""
    m = random_csr(np.random.default_rng(1), 130, lognorm=True)
    path = tmp_path_factory.mktemp("stores") / "ln"
    _write(path, vocab, [("dsL", m, "lognorm")])
    return path, m


@pytest.fixture(scope="session")
def soma_a(tmp_path_factory, store_a, vocab) -> Path:
    """store_a's cells as a SOMA experiment, genes in reversed order (the mapping must undo it)."""
    import anndata as ad
    import pandas as pd
    import tiledbsoma.io

    _, m = store_a
    rev = np.arange(NUM_GENES)[::-1]
    obs = pd.DataFrame(
        {"tissue": np.where(np.arange(m.shape[0]) % 3 == 0, "lung", "kidney")},
        index=[f"c{i}" for i in range(m.shape[0])],
    )
    adata = ad.AnnData(X=m[:, rev].tocsr(), obs=obs, var=pd.DataFrame(index=[vocab.genes[i] for i in rev]))
    uri = str(tmp_path_factory.mktemp("soma") / "exp")
    tiledbsoma.io.from_anndata(uri, adata, "RNA", X_layer_name="counts")
    return Path(uri)
