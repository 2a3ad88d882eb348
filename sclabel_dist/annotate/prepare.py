"""Map an input's genes onto the model vocabulary (the same matching as ingest) and check its value kind fits."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from sclabel_dist.errors import SclabelError

# expm1 of log1p(counts per 10k) sums to 10,000 per cell; anything far off is another log scale.
CP10K_RANGE = (5e3, 2e4)


def match_to_vocab(
    inp: Any, vocab: Any, *, min_genes: int, min_fraction: float
) -> tuple[sp.csr_matrix, dict, np.ndarray]:
    """(CSR in vocabulary space, match report, sorted vocabulary indices of the genes the input holds);
    refuses a match with too few genes or too little expression."""
    from sclabel_dist.vocab import remap_csr

    match = vocab.match(inp.var_names, ensembl=inp.ensembl)
    per_column = np.asarray(inp.X.sum(axis=0)).ravel()
    report, present = check_gene_match(
        match, per_column, min_genes=min_genes, min_fraction=min_fraction, where=str(inp.path)
    )
    return remap_csr(inp.X, match), report, present


def check_gene_match(
    match: Any, per_column: np.ndarray | None, *, min_genes: int, min_fraction: float, where: str
) -> tuple[dict, np.ndarray]:
    """(match report, sorted vocabulary indices of the matched genes) for a gene match and the expression of
    each input column (None: unknown, the fraction of genes stands in); SclabelError for too poor a match."""
    report = match.report(per_column)
    fraction = float(report.get("fraction_counts", report["fraction_genes"]))
    if report["genes_matched"] < min_genes or fraction < min_fraction:
        top = [name for name, value in report.get("top_unmatched_by_counts", []) if value > 0]
        examples = ", ".join((top or report["unmatched_examples"])[:5])
        raise SclabelError(
            f"{where}: only {report['genes_matched']} of {report['genes_total']} genes match the model's "
            f"{report['vocab_genes']}-gene vocabulary, carrying {fraction:.1%} of the expression "
            f"(need >= {min_genes} genes and {min_fraction:.0%}); unmatched e.g. {examples}. Check the species "
            "and that var_names (or var['ensembl']) hold gene symbols or Ensembl IDs"
        )
    present = np.sort(match.column_to_gene[match.column_to_gene >= 0])
    return report, present


def format_match_report(report: dict) -> str:
    """One line for the terminal."""
    line = (
        f"genes: {report['genes_matched']:,} of {report['genes_total']:,} matched the vocabulary "
        f"({report['fraction_genes']:.1%}; {report['matched_by_ensembl']:,} by Ensembl ID, "
        f"{report['matched_by_symbol']:,} by symbol)"
    )
    if "fraction_counts" in report:
        line += f", carrying {report['fraction_counts']:.1%} of the expression"
    # The most expressed unmatched genes say what is lost (a pancreas set's INS); name-order examples do not.
    top = [name for name, value in report.get("top_unmatched_by_counts", []) if value > 0]
    if top:
        line += f"; unmatched, most expressed first: {', '.join(top[:5])}"
    elif report.get("unmatched_examples"):
        line += f"; unmatched e.g. {', '.join(report['unmatched_examples'][:5])}"
    if report.get("duplicates_dropped"):
        line += f"; {report['duplicates_dropped']} duplicate columns dropped"
    return line


def check_value_kind(X: sp.csr_matrix, value_kind: str, tokenize: dict, where: str) -> str:
    """A note on how the input's value kind is handled for this model, or SclabelError when it cannot be.

    Binned models see per-cell quantile bins, which any monotone per-cell transform (log-normalising)
    leaves unchanged, so counts and log-normalised input give the same tokens. Continuous models see
    log1p(counts per 10k): counts are converted, log-normalised input is used as it is and so must already
    be on that scale, which expm1 row sums reveal.
    """
    needed = tokenize.get("value_encoding", "binned") != "binned" and value_kind == "lognorm"
    sums = np.asarray(X.expm1().sum(axis=1)).ravel() if needed and X.nnz else np.zeros(1)
    return value_kind_note(value_kind, tokenize, where, sums)


def value_kind_note(value_kind: str, tokenize: dict, where: str, expm1_row_sums: np.ndarray) -> str:
    """check_value_kind from each cell's expm1 row sum (computed block by block for inputs read in blocks)."""
    if tokenize.get("value_encoding", "binned") == "binned":
        return f"input values: {value_kind}; binned per cell by rank, so counts and log-normalised bin alike"
    if value_kind == "counts":
        return "input values: counts, converted to log1p(counts per 10k) as the model expects"
    sums = expm1_row_sums if len(expm1_row_sums) else np.zeros(1)
    median = float(np.median(sums))
    if not CP10K_RANGE[0] <= median <= CP10K_RANGE[1]:
        raise SclabelError(
            f"{where}: log-normalised input (not counts), but not log1p(counts per 10k) (expm1 of a cell sums to "
            f"{median:,.0f}, not ~10,000), and this model reads continuous log1p(counts per 10k) values: they "
            "would be mis-scaled. Give raw counts (e.g. a 'counts' layer: --data.layer=counts) or "
            "log1p(counts per 10k)"
        )
    return "input values: log1p(counts per 10k), used as they are (the model's continuous scale)"
