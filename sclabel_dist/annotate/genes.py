"""Which genes the classifier reads: all matched genes, or the most variable ones of the non-test cells.

Reading only the most variable genes (as scGPT's annotation recipe and the logistic-regression baseline do)
drops the housekeeping genes that fill a cell's top-expressed tokens but say little about its type, and
shortens every sequence. The genes are chosen on training cells only and saved in the fine-tuned bundle by
name, so prediction reads exactly the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass
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


# `sclabel predict` defaults: a classifier that lost a tenth of its input genes changes labels measurably (issue
# 18: 61.5% present changed 20% of a pancreas set's labels), so warn there, and refuse where most are gone.
WARN_INPUT_GENES = 0.9
MIN_INPUT_GENES = 0.7


@dataclass(frozen=True)
class InputGeneCoverage:
    """How many of a fine-tuned classifier's input genes the data to annotate holds."""

    present: int
    total: int
    missing: list[str]  # the absent genes' names, in the bundle's order

    @property
    def fraction(self) -> float:
        return self.present / self.total if self.total else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"present": self.present, "total": self.total, "fraction": round(self.fraction, 6)}

    def describe(self) -> str:
        line = (
            f"input genes: {self.present:,} of the classifier's {self.total:,} input genes are in the data "
            f"({self.fraction:.1%})"
        )
        return line + (f"; missing e.g. {', '.join(self.missing[:5])}" if self.missing else "")


def input_gene_coverage(vocab: Any, genes: np.ndarray, present: np.ndarray) -> InputGeneCoverage:
    """Coverage of the classifier's input `genes` (vocabulary indices) by the data's matched genes `present`."""
    held = np.isin(genes, present)
    return InputGeneCoverage(int(held.sum()), len(genes), [vocab.genes[i] for i in genes[~held]])


def check_input_genes(
    coverage: InputGeneCoverage, *, warn_below: float, refuse_below: float, where: str
) -> str:
    """`coverage.describe()`, with a warning under `warn_below`; SclabelError under `refuse_below`.

    A missing input gene reads as zero expression to the classifier, so its labels drift without any error.
    """
    if coverage.fraction < refuse_below:
        raise SclabelError(
            f"{where}: {coverage.describe()}, under the {refuse_below:.0%} this classifier needs to annotate "
            "reliably (missing genes read as unexpressed and change its labels). Check the gene names, or "
            "fine-tune on data with these genes; --min-input-genes lowers the bar at your own risk"
        )
    if coverage.fraction < warn_below:
        return (
            f"warning: {coverage.describe()}, under {warn_below:.0%}: missing genes read as unexpressed, and "
            "labels may differ from those on complete data"
        )
    return coverage.describe()
