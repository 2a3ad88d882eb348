"""Reading .h5ad input: value-kind detection, labels, the baseline and its README figures on a real set."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import gene_names, make_counts, write_h5ad

from sclabel_dist.annotate.h5ad import read_h5ad, read_labels
from sclabel_dist.data.input_rules import detect_value_kind
from sclabel_dist.errors import SclabelError


def test_value_kind_detection():
    X, _ = make_counts(num_cells=20, class_sizes=(10, 10))
    assert detect_value_kind(X.astype(np.float32), "x") == "counts"
    lognorm = X.astype(np.float32).multiply(1e4 / X.sum(axis=1)).tocsr().log1p()
    assert detect_value_kind(lognorm, "x") == "lognorm"
    with pytest.raises(SclabelError, match="negative"):
        detect_value_kind(sp.csr_matrix(np.array([[1.0, -0.5]])), "x")
    with pytest.raises(SclabelError, match="not log-transformed"):
        detect_value_kind(sp.csr_matrix(np.array([[1.5, 400.25]])), "x")
    with pytest.raises(SclabelError, match="NaN or infinite"):
        detect_value_kind(sp.csr_matrix(np.array([[1.0, np.nan]])), "x")
    with pytest.raises(SclabelError, match="non-integer"):
        detect_value_kind(lognorm, "x", declared=True)


def test_read_labels_marks_missing(tmp_path):
    X, labels = make_counts(num_cells=20, class_sizes=(10, 10))
    labels = labels.astype(object)
    labels[0], labels[1] = "nan", ""
    path = write_h5ad(tmp_path / "x.h5ad", X, {"cell_type": labels}, gene_names(X.shape[1]))
    inp = read_h5ad(path)
    got = read_labels(inp, "cell_type")
    assert got[0] is None and got[1] is None and got[2] == "type_0"
    with pytest.raises(SclabelError, match="label key 'celltype' not in obs"):
        read_labels(inp, "celltype")


@pytest.mark.shared_data
def test_baseline_reproduces_readme_on_a_real_set(shared_data):
    from sklearn.metrics import accuracy_score, f1_score

    from sclabel_dist.annotate.baseline import fit_predict
    from sclabel_dist.annotate.splits import stratified_split

    inp = read_h5ad(shared_data / "tabula_muris_immune_actinn.h5ad")
    labels = read_labels(inp, "cell_type")
    acc, f1 = [], []
    for seed in (0, 1, 2):
        s = stratified_split(labels, seed=seed, test_fraction=0.3, val_fraction=0.0)
        pred = fit_predict(inp.X, s.y, s.train, s.test, inp.value_kind)
        acc.append(accuracy_score(s.y[s.test], pred))
        f1.append(f1_score(s.y[s.test], pred, average="macro"))
    assert round(float(np.mean(acc)), 3) == 0.999  # README: 0.999 / 0.998
    assert round(float(np.mean(f1)), 3) == 0.998
