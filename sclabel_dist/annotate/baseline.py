"""The logistic-regression baseline of ../shared/data/README.md: log1p CP10k, 2,000 most variable genes, C=1."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

NUM_HVG = 2000


def lognormalise(X: sp.csr_matrix, value_kind: str) -> sp.csr_matrix:
    """log1p of counts scaled to 10,000 per cell; log-normalised input is used as it is."""
    if value_kind == "lognorm":
        return X.astype(np.float64)
    totals = np.asarray(X.sum(axis=1)).ravel()
    scale = np.divide(1e4, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0)
    out = sp.diags(scale) @ X.astype(np.float64)
    out = sp.csr_matrix(out)
    out.data = np.log1p(out.data)
    return out


def top_variable_genes(X: sp.csr_matrix, n: int = NUM_HVG) -> np.ndarray:
    """Column indices of the n genes with the largest variance (ties broken by column order)."""
    mean = np.asarray(X.mean(axis=0)).ravel()
    sq = np.asarray(X.multiply(X).mean(axis=0)).ravel()
    var = sq - mean**2
    return np.sort(np.argsort(-var, kind="stable")[: min(n, X.shape[1])])


def fit_predict(
    X: sp.csr_matrix, y: np.ndarray, train: np.ndarray, test: np.ndarray, value_kind: str, seed: int = 0
) -> np.ndarray:
    """Fit on the training cells (genes chosen on them alone) and return predicted class ids for test cells."""
    from sklearn.linear_model import LogisticRegression

    Xn = lognormalise(X, value_kind)
    genes = top_variable_genes(Xn[train])
    clf = LogisticRegression(C=1.0, max_iter=2000, random_state=seed)
    clf.fit(Xn[train][:, genes], y[train])
    return clf.predict(Xn[test][:, genes])
