"""Which genes the classifier reads: all matched genes, or the most variable ones of the non-test cells.

Reading only the most variable genes (as scGPT's annotation recipe and the logistic-regression baseline do)
drops the housekeeping genes that fill a cell's top-expressed tokens but say little about its type, and
shortens every sequence. The genes are chosen on training cells only and saved in the fine-tuned bundle by
name, so prediction reads exactly the same ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from sclabel_dist.errors import SclabelError

GENE_CHOICES = ("all", "hvg")


def select_genes(
    csr: sp.csr_matrix, rows: np.ndarray, value_kind: str, mode: str, n: int
) -> np.ndarray | None:
    """Vocabulary column indices the classifier reads (sorted), or None for every gene.

    'hvg': the `n` genes of largest variance of log1p CP10k over `rows` (the baseline's rule, in the
    vocabulary's gene space), so no test cell influences the choice.
    """
    from sclabel_dist.annotate.baseline import lognormalise, top_variable_genes

    if mode not in GENE_CHOICES:
        raise SclabelError(f"data.genes {mode!r}: choose from {list(GENE_CHOICES)}")
    if mode == "all":
        return None
    if n < 1:
        raise SclabelError(f"data.num_genes {n}: must be >= 1 with data.genes=hvg")
    return top_variable_genes(lognormalise(csr[rows], value_kind), n)


def restrict_genes(csr: sp.csr_matrix, genes: np.ndarray | None) -> sp.csr_matrix:
    """`csr` with every column outside `genes` zeroed (same shape: columns stay vocabulary indices)."""
    if genes is None:
        return csr
    keep = np.zeros(csr.shape[1], dtype=bool)
    keep[genes] = True
    out = csr.copy()
    out.data = np.where(keep[out.indices], out.data, 0).astype(out.data.dtype, copy=False)
    out.eliminate_zeros()
    return out


def classifier_input(csr: sp.csr_matrix, value_kind: str, genes: np.ndarray | None) -> sp.csr_matrix:
    """What the classifier tokenises: log1p CP10k over all the matched genes, then only `genes` kept.

    Normalising before the restriction keeps a cell's depth from all its genes, as in pretraining (the gene
    bag weights and the continuous encoding read these values as they are; per-cell bins are unchanged).
    """
    from sclabel_dist.annotate.baseline import lognormalise

    return restrict_genes(lognormalise(csr, value_kind).astype(np.float32), genes)


def gene_names(vocab: Any, genes: np.ndarray | None) -> list[str] | None:
    """The bundle's record of the chosen genes: vocabulary names, None for all genes."""
    return None if genes is None else [vocab.genes[i] for i in genes]


def genes_from_names(vocab: Any, names: list[str] | None, where: str) -> np.ndarray | None:
    """Vocabulary indices of a bundle's recorded genes; a name outside the vocabulary means a corrupt bundle."""
    if names is None:
        return None
    index = {g: i for i, g in enumerate(vocab.genes)}
    missing = [g for g in names if g not in index]
    if missing:
        raise SclabelError(f"{where}: input gene(s) {missing[:5]} are not in the bundle's vocabulary")
    return np.array(sorted(index[g] for g in names), dtype=np.int64)
