"""Vectorised tokenisation of a CSR block: gene selection, per-cell value encoding, CLS, padding, mask.

A cell becomes [CLS, g_1, ..., g_n, PAD...] with its non-zero genes in gene-index order. When it has more than
max_len - 1 genes, training keeps a seeded random subset and evaluation the top genes by value (ties: lower
gene index first). Values are computed from ALL the cell's genes before the subset is taken:

- binned (as scGPT): per-cell quantile bins, bin = 1 + floor(num_bins * r / n) with r the number of the
  cell's genes with a strictly lower value and n its non-zero genes: 1..num_bins, equal values equal bins.
  Ranks are invariant under per-cell monotone maps, so counts and log-normalised values bin identically.
- continuous: log1p(count / total * 1e4) with total over all the cell's counts; a log-normalised store's values
  are used as they are (no second normalisation or log).

One implementation, no Python loop per cell: the compiled kernels (kernels.py, numba, one pass per cell,
~60-80k cells/s per core at 1,500 genes/cell). Their numpy twin is the tests' reference oracle
(tests/data/tokenize_oracle.py): the same rules in flat vectorised passes, checked against the kernels.
A cell's tokens depend on no other cell of the block (only the padded length does), and on `rng` only for
the training subset and the mask.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sclabel_dist.config import TokenizeConfig
from sclabel_dist.data.batch import CellBatch
from sclabel_dist.errors import SclabelError


def tokenize_block(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    lognorm: np.ndarray,
    cfg: TokenizeConfig,
    *,
    train: bool,
    mask: bool,
    rng: np.random.Generator | None,
    labels: np.ndarray | None = None,
    rows: np.ndarray | None = None,
    cell_keys: np.ndarray | None = None,
) -> CellBatch:
    """A CSR block (gene-index space; `lognorm` bool per row) -> CellBatch (module docstring for the rules).

    rows: tokenise these rows of the block in this order (default: every row), read where they lie; the
    same batch as tokenising the gathered rows, without the gathered copy.
    cell_keys: one integer per output cell; its random subset and mask then depend on (rng, key) only.
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    n = len(indptr) - 1
    lognorm = np.ascontiguousarray(np.broadcast_to(np.asarray(lognorm, dtype=bool), (n,)))
    how = cfg.train_gene_selection if train else cfg.eval_gene_selection
    from sclabel_dist.data import kernels  # numba: compiled on first use, cached on disk

    arrays, bag_arrays = kernels.numba_tokens(
        indptr,
        indices,
        data,
        lognorm,
        cfg,
        how,
        mask,
        rng,
        rows=rows,
        bag=cfg.gene_bag,
        **({} if cell_keys is None else {"cell_keys": cell_keys}),  # (the tests' numpy oracle has no keys)
    )
    gene_ids, inputs, attention, masked, targets = arrays
    bag = {}
    if bag_arrays is not None:
        bag = {
            k: torch.from_numpy(a)
            for k, a in zip(("bag_ids", "bag_offsets", "bag_weights"), bag_arrays, strict=True)
        }
    return CellBatch(
        gene_ids=torch.from_numpy(gene_ids),
        values=torch.from_numpy(inputs),
        attention_mask=torch.from_numpy(attention),
        masked=torch.from_numpy(masked),
        targets=torch.from_numpy(targets),
        labels=None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.int64),
        **bag,
    )


def tokenize_csr(
    csr: Any,
    cfg: TokenizeConfig,
    *,
    value_kind: str,
    train: bool,
    mask: bool,
    rng: np.random.Generator | None = None,
    labels: np.ndarray | None = None,
) -> CellBatch:
    """Tokenise an in-memory scipy CSR matrix in vocabulary gene space (fine-tuning, inference).

    value_kind: "counts" or "lognorm" (what the matrix holds). At evaluation (train=False, mask=False) a
    cell's output depends on nothing but the cell itself and the batch's padded length.
    """
    import scipy.sparse as sp

    cfg.validate()  # a section built or changed in code (fine-tuning sets max_len) is checked here
    if value_kind not in ("counts", "lognorm"):
        raise SclabelError(f"value_kind {value_kind!r}: choose 'counts' or 'lognorm'")
    csr = sp.csr_matrix(csr)
    if not csr.has_canonical_format:
        csr = csr.copy()
        csr.sum_duplicates()
    if csr.nnz and (csr.data < 0).any():
        raise SclabelError("expression matrix has negative values; expected counts or log-normalised data")
    # Explicit zeros are not expressed genes.
    if csr.nnz and (csr.data == 0).any():
        csr = csr.copy()
        csr.eliminate_zeros()
    return tokenize_block(
        csr.indptr,
        csr.indices,
        csr.data,
        np.full(csr.shape[0], value_kind == "lognorm"),
        cfg,
        train=train,
        mask=mask,
        rng=rng,
        labels=labels,
    )
