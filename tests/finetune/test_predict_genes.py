"""`sclabel predict` checks the classifier's own input genes, and gene-match lines name what is lost by expression."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import gene_names, make_counts, write_h5ad

NUM_GENES = 200


def predict(model: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The real `sclabel predict` in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "sclabel_dist.cli", "predict", "--model", str(model), "--data", str(data)]
        + ["--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def input_genes(finetuned: Path) -> list[str]:
    return json.loads((finetuned / "model" / "config.json").read_text())["input_genes"]


def data_without(tmp_path: Path, drop: list[str], name: str) -> Path:
    """New cells of the tiny set's kind, holding every gene but `drop`."""
    X, _ = make_counts(num_genes=NUM_GENES, seed=7)
    names = gene_names(NUM_GENES)
    keep = [j for j, g in enumerate(names) if g not in set(drop)]
    return write_h5ad(tmp_path / name, sp.csr_matrix(X)[:, keep], {}, [names[j] for j in keep])


def test_predict_reports_warns_and_refuses_by_input_gene_coverage(finetuned, tmp_path):
    import anndata

    genes = input_genes(finetuned)
    assert len(genes) == NUM_GENES

    full = data_without(tmp_path, [], "full.h5ad")
    proc = predict(finetuned, full, tmp_path / "full_out.h5ad")
    assert proc.returncode == 0, proc.stderr
    assert f"input genes: {NUM_GENES} of the classifier's {NUM_GENES} input genes" in proc.stdout
    assert "warning" not in proc.stdout
    uns = anndata.read_h5ad(tmp_path / "full_out.h5ad").uns["sclabel"]["input_genes"]
    assert uns["present"] == NUM_GENES and uns["fraction"] == 1.0

    # 80% of the input genes: every remaining gene matches the vocabulary (100% of the data's expression),
    # yet the classifier lost a fifth of its input: a warning, and the figure recorded.
    most = data_without(tmp_path, genes[::5], "most.h5ad")
    proc = predict(finetuned, most, tmp_path / "most_out.h5ad")
    assert proc.returncode == 0, proc.stderr
    assert (
        "warning: input genes: 160 of the classifier's 200 input genes are in the data (80.0%)" in proc.stdout
    )
    assert "under 90%" in proc.stdout
    assert anndata.read_h5ad(tmp_path / "most_out.h5ad").uns["sclabel"]["input_genes"]["present"] == 160

    # 60% (the case): refused, naming the file and the figure; nothing written.
    some = data_without(tmp_path, [g for k, g in enumerate(genes) if k % 5 in (0, 1)], "some.h5ad")
    proc = predict(finetuned, some, tmp_path / "some_out.h5ad")
    assert proc.returncode == 2
    assert "some.h5ad" in proc.stderr and "120 of the classifier's 200" in proc.stderr
    assert "--min-input-genes" in proc.stderr
    assert not (tmp_path / "some_out.h5ad").exists()

    # Both thresholds are the user's to set.
    proc = predict(finetuned, some, tmp_path / "some_out.h5ad", "--min-input-genes", "0.5")
    assert proc.returncode == 0 and "warning: input genes: 120" in proc.stdout
    proc = predict(finetuned, most, tmp_path / "most_quiet.h5ad", "--warn-input-genes", "0.8")
    assert proc.returncode == 0 and "warning" not in proc.stdout


@pytest.mark.parametrize(
    "flags", [["--min-input-genes", "0.95"], ["--warn-input-genes", "1.5"], ["--min-input-genes", "-0.1"]]
)
def test_input_gene_thresholds_are_checked_before_any_file(flags, tmp_path):
    proc = predict(tmp_path / "no_model", tmp_path / "no_data.h5ad", tmp_path / "out.h5ad", *flags)
    assert proc.returncode == 2 and "--min-input-genes" in proc.stderr and "no_model" not in proc.stderr


def test_gene_match_line_names_the_most_expressed_unmatched_genes(finetuned, tmp_path):
    """Unmatched genes listed by expression: a high one (like a pancreas set's INS) ahead of name order."""
    X, _ = make_counts(num_genes=NUM_GENES, seed=7)
    n = X.shape[0]
    rng = np.random.default_rng(0)
    extra = ["LINC00001", "LINC00002", "LINC00003", "LINC00004", "LINC00005", "INS", "GCG"]
    low = rng.poisson(0.05, size=(n, 5))
    high = rng.poisson(50.0, size=(n, 2))
    X = sp.hstack([sp.csr_matrix(low), X, sp.csr_matrix(high)]).tocsr()
    data = write_h5ad(tmp_path / "pancreas_like.h5ad", X, {}, extra[:5] + gene_names(NUM_GENES) + extra[5:])
    proc = predict(finetuned, data, tmp_path / "out.h5ad")
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("genes: "))
    assert "unmatched, most expressed first: INS, GCG, LINC" in line or (
        "unmatched, most expressed first: GCG, INS, LINC" in line
    ), line
