"""Fixtures for the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def run_dirs(tmp_path: Path):
    def make(name: str) -> tuple[Path, list[str]]:
        root = tmp_path / name
        return root, [f"--checkpoint.dir={root / 'ckpt'}", f"--log.dir={root / 'logs'}"]

    return make


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    """A 1,200-cell, 300-gene store of structured counts written with the real StoreWriter.

    Each gene has its own typical level (1 to 128 counts), so a masked value's bin is largely predictable from
    its gene and the loss visibly falls within a few dozen steps; cells of 4 types express different genes.
    """
    import numpy as np
    import scipy.sparse as sp

    from data_tools.writer import StoreWriter
    from sclabel_dist.vocab import GeneVocab

    rng = np.random.default_rng(0)
    num_cells, num_genes = 1200, 300
    vocab = GeneVocab([f"GENE{i}" for i in range(num_genes)])
    kinds = rng.integers(0, 4, num_cells)
    rows = []
    for k in kinds:
        genes = np.concatenate([60 * k + rng.choice(60, 30, replace=False), rng.choice(num_genes, 15)])
        genes = np.unique(genes)
        counts = 2 ** (genes % 8) + rng.integers(0, 2, genes.size)
        rows.append((genes, counts))
    indptr = np.cumsum([0] + [g.size for g, _ in rows])
    matrix = sp.csr_matrix(
        (
            np.concatenate([c for _, c in rows]).astype(np.uint32),
            np.concatenate([g for g, _ in rows]),
            indptr,
        ),
        shape=(num_cells, num_genes),
    )
    out = tmp_path_factory.mktemp("store") / "tiny.zarr"
    with StoreWriter(out, vocab, "tiny", value_kind="counts") as writer:
        writer.write_block(matrix)
    return out
