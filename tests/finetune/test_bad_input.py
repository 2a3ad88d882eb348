"""Each bad input ends in one clear line on stderr and exit code 2, before any long work."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from helpers import finetune_args, gene_names, make_bundle, make_counts, write_h5ad

from sclabel_dist.cli import main


def run(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_label_key_absent(capsys, tiny_h5ad, tiny_bundle, tmp_path):
    err = run(capsys, *finetune_args(tiny_bundle, tiny_h5ad, tmp_path / "o", key="celltype"))
    assert "label key 'celltype' not in obs" in err
    assert not (tmp_path / "o").exists()  # a refused input leaves no run directory behind


@pytest.mark.parametrize(
    ("labels", "message"), [("single", "single class"), ("missing", "every label is missing")]
)
def test_single_class_and_all_missing(capsys, tiny_bundle, tmp_path, labels, message):
    X, _ = make_counts(num_cells=20, num_genes=200, class_sizes=(20,))
    import pandas as pd

    values = pd.Categorical(["B cell"] * 20 if labels == "single" else [None] * 20, categories=["B cell"])
    data = write_h5ad(tmp_path / "x.h5ad", X, {"cell_type": values}, gene_names(200))
    assert message in run(capsys, *finetune_args(tiny_bundle, data, tmp_path / "o"))


def test_not_a_bundle_and_checksum_failure(capsys, tiny_h5ad, tiny_bundle, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a sclabel bundle" in run(capsys, *finetune_args(empty, tiny_h5ad, tmp_path / "o1"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    assert "checksum mismatch" in run(capsys, *finetune_args(broken, tiny_h5ad, tmp_path / "o2"))
    err = run(
        capsys,
        "predict",
        "--model",
        str(tiny_bundle),
        "--data",
        str(tiny_h5ad),
        "--out",
        str(tmp_path / "p.h5ad"),
    )
    assert "without labels" in err  # a pretrained bundle cannot annotate


def test_too_few_matching_genes(capsys, tiny_bundle, tmp_path):
    X, labels = make_counts(num_genes=200)
    data = write_h5ad(tmp_path / "x.h5ad", X, {"cell_type": labels}, [f"Other{i}" for i in range(200)])
    err = run(capsys, *finetune_args(tiny_bundle, data, tmp_path / "o"))
    assert "only 0 of 200 genes match" in err and "species" in err


def test_output_exists_unless_overwrite(capsys, tiny_h5ad, tiny_bundle, finetuned, tmp_path):
    assert "output exists" in run(capsys, *finetune_args(tiny_bundle, tiny_h5ad, finetuned))
    out = tmp_path / "a.h5ad"
    out.write_text("not mine")
    err = run(capsys, "predict", "--model", str(finetuned), "--data", str(tiny_h5ad), "--out", str(out))
    assert "output exists; pass --overwrite" in err
    assert (
        main(
            ["predict", "--model", str(finetuned), "--data", str(tiny_h5ad), "--out", str(out), "--overwrite"]
        )
        == 0
    )
    err = run(
        capsys,
        "predict",
        "--model",
        str(finetuned),
        "--data",
        str(tiny_h5ad),
        "--out",
        str(tiny_h5ad),
        "--overwrite",
    )
    assert "replace the input" in err
    user_dir = tmp_path / "precious"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("x")
    err = run(capsys, *finetune_args(tiny_bundle, tiny_h5ad, user_dir), "--overwrite")
    assert "not a sclabel run directory" in err and (user_dir / "notes.txt").is_file()


def test_lognorm_on_another_scale_is_refused_for_a_continuous_model(capsys, tmp_path):
    X, labels = make_counts(num_genes=200)
    log2cpm = X.astype(np.float32).multiply(1e6 / X.sum(axis=1)).tocsr()
    log2cpm.data = np.log2(1 + log2cpm.data)
    data = write_h5ad(tmp_path / "x.h5ad", log2cpm, {"cell_type": labels}, gene_names(200))
    bundle = make_bundle(tmp_path / "b", gene_names(200), value_encoding="continuous")
    err = run(capsys, *finetune_args(bundle, data, tmp_path / "o"))
    assert "not log1p(counts per 10k)" in err and "raw counts" in err
    # The same data with a binned model is fine: per-cell ranks do not see the log scale.
    binned = make_bundle(tmp_path / "b2", gene_names(200))
    assert main(finetune_args(binned, data, tmp_path / "o2")) == 0


def test_scaled_data_is_refused(capsys, tiny_bundle, tmp_path):
    X, labels = make_counts(num_genes=200)
    dense = X.toarray().astype(np.float32)
    scaled = (dense - dense.mean(0)) / (dense.std(0) + 1)
    data = write_h5ad(tmp_path / "x.h5ad", scaled, {"cell_type": labels}, gene_names(200))
    assert "negative expression values" in run(capsys, *finetune_args(tiny_bundle, data, tmp_path / "o"))
