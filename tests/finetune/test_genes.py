"""The classifier's input genes: chosen on non-test cells only, saved in the bundle, applied again by predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import FAST, NUM_GENES
from helpers import finetune_args, gene_names, make_counts, write_h5ad

from sclabel_dist.annotate.genes import classifier_input, genes_from_names, restrict_genes, select_genes
from sclabel_dist.cli import main
from sclabel_dist.errors import SclabelError
from sclabel_dist.vocab import GeneVocab


def test_hvg_picks_the_class_marker_genes_from_the_given_rows_only():
    X, _ = make_counts(num_genes=NUM_GENES)  # classes 0-3 over-express genes 0-79
    rows = np.arange(0, 160, 2)  # every class present
    genes = select_genes(X, rows, "counts", "hvg", 60)
    assert len(genes) == 60 and np.all(np.diff(genes) > 0)
    assert np.mean(genes < 80) > 0.8  # 40% by chance
    # A change to a row outside `rows` (a test cell) cannot move the choice.
    Y = X.tolil()
    Y[151, 150] = 1000
    assert np.array_equal(select_genes(Y.tocsr(), rows, "counts", "hvg", 60), genes)
    assert select_genes(X, rows, "counts", "all", 60) is None
    with pytest.raises(SclabelError, match="data.genes"):
        select_genes(X, rows, "counts", "markers", 60)


def test_restrict_keeps_shape_and_values_of_chosen_genes_only():
    X = sp.csr_matrix(np.array([[1, 0, 3, 4], [0, 5, 6, 0]], dtype=np.float32))
    out = restrict_genes(X, np.array([0, 2]))
    assert out.shape == X.shape
    np.testing.assert_array_equal(out.toarray(), [[1, 0, 3, 0], [0, 0, 6, 0]])
    assert out.nnz == 3  # dropped genes are gone, not stored zeros
    assert restrict_genes(X, None) is X


def test_classifier_input_normalises_over_all_genes_before_keeping_the_chosen_ones():
    X = sp.csr_matrix(np.array([[1, 3, 6, 0], [0, 2, 0, 8]], dtype=np.int32))
    out = classifier_input(X, "counts", np.array([1, 2]))
    assert out.shape == (2, 4) and out.dtype == np.float32
    # depth from all four genes, not from the two kept ones
    expected = np.log1p(np.array([[0, 3 / 10, 6 / 10, 0], [0, 2 / 10, 0, 0]]) * 1e4)
    np.testing.assert_allclose(out.toarray(), expected, rtol=1e-6)
    logged = sp.csr_matrix(np.array([[0.5, 1.5, 0, 2.0]], dtype=np.float32))
    np.testing.assert_allclose(classifier_input(logged, "lognorm", None).toarray(), logged.toarray())


def test_gene_names_round_trip_and_unknown_names_are_refused():
    vocab = GeneVocab(gene_names(10))
    assert np.array_equal(genes_from_names(vocab, ["Gene7", "Gene2"], "b"), [2, 7])
    assert genes_from_names(vocab, None, "b") is None
    with pytest.raises(SclabelError, match="GeneX"):
        genes_from_names(vocab, ["GeneX"], "bundle")


def test_predict_reads_only_the_genes_the_classifier_was_tuned_on(tiny_dir, tiny_h5ad, tiny_bundle):
    import anndata

    out = tiny_dir / "run_hvg"
    args = finetune_args(tiny_bundle, tiny_h5ad, out, *FAST, "--data.num_genes=50", "--data.max_len=64")
    assert main(args) == 0
    config = json.loads((out / "model" / "config.json").read_text())
    chosen = config["input_genes"]
    assert len(chosen) == 50 and config["tokenize"]["max_len"] == 64
    # Genes outside the chosen 50 are shuffled within each cell: they count only through the cell's depth
    # (log1p per 10k is over all genes, as the baseline's), which a shuffle keeps, so predictions must not move.
    X, _ = make_counts(num_genes=NUM_GENES, seed=9)
    other = [i for i, g in enumerate(gene_names(NUM_GENES)) if g not in set(chosen)]
    noisy = X.toarray()
    shuffled = np.random.default_rng(0).permuted(noisy[:, other], axis=1)
    assert (shuffled != noisy[:, other]).mean() > 0.3
    noisy[:, other] = shuffled
    results = []
    for name, matrix in (("clean", X), ("noisy", sp.csr_matrix(noisy))):
        data = write_h5ad(tiny_dir / f"{name}.h5ad", matrix, {}, gene_names(NUM_GENES))
        dest = tiny_dir / f"{name}_annotated.h5ad"
        assert main(["predict", "--model", str(out), "--data", str(data), "--out", str(dest)]) == 0
        results.append(anndata.read_h5ad(dest))
    np.testing.assert_allclose(results[0].obsm["X_sclabel"], results[1].obsm["X_sclabel"], atol=1e-5)
    assert (results[0].obs["sclabel_top_label"] == results[1].obs["sclabel_top_label"]).all()
