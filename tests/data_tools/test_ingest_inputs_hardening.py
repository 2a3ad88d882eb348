"""Inputs that ingest and validate used to accept silently (issue 19, items 4 and 9): each now names file and row."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from h1_builders import GENES, counts_matrix, make_adata, write_10x, write_h5ad

from data_tools.ingest import main as ingest
from data_tools.validate import validate_store
from sclabel_dist.data import format as fmt
from sclabel_dist.data.input_rules import detect_value_kind
from sclabel_dist.errors import SclabelError


def _with_value(value: float, row: int, dtype=np.float64, scale: float = 1.0):
    adata = make_adata(80)
    X = adata.X.toarray().astype(dtype) * scale
    X[row, 5] = value
    adata.X = sp.csr_matrix(X)
    return adata


def test_count_overflow_is_refused_at_scan_naming_the_row(tmp_path: Path) -> None:
    src = write_h5ad(tmp_path / "big.h5ad", _with_value(5e9, row=57))
    with pytest.raises(SclabelError, match=r"big\.h5ad: row 57: count above 4294967295"):
        ingest([str(src), "-o", str(tmp_path / "s"), "--no-progress"])
    assert not (tmp_path / "s").exists()


def test_float64_beyond_float32_is_refused_not_stored_as_inf(tmp_path: Path) -> None:
    src = write_h5ad(tmp_path / "huge.h5ad", _with_value(1e39, row=7))
    with pytest.raises(SclabelError, match=r"huge\.h5ad: row 7: value beyond float32"):
        ingest([str(src), "-o", str(tmp_path / "s"), "--value-kind", "lognorm", "--no-progress"])
    assert not (tmp_path / "s").exists()


def test_stray_non_integer_in_counts_is_said_out_loud(tmp_path: Path, capsys) -> None:
    src = write_h5ad(tmp_path / "stray.h5ad", _with_value(0.5, row=11))
    ingest([str(src), "-o", str(tmp_path / "s"), "--no-progress"])
    out = capsys.readouterr().out
    assert "stray.h5ad: row 11: non-integer value" in out and "stored as log-normalised" in out


def test_stray_non_integer_in_large_counts_is_refused_like_annotation(tmp_path: Path) -> None:
    """One rule (data/input_rules.py) for ingest and annotation: counts up to ~100 with a stray 0.5 are neither kind."""
    adata = _with_value(0.5, row=11, scale=40.0)
    src = write_h5ad(tmp_path / "stray.h5ad", adata)
    with pytest.raises(SclabelError, match="not log-transformed") as from_ingest:
        ingest([str(src), "-o", str(tmp_path / "s"), "--no-progress"])
    with pytest.raises(SclabelError, match="not log-transformed") as from_annotation:
        detect_value_kind(sp.csr_matrix(adata.X), src)
    assert str(from_ingest.value) == str(from_annotation.value)


def test_10x_barcode_count_differs_from_matrix(tmp_path: Path) -> None:
    d = write_10x(tmp_path / "tenx", counts_matrix(30, len(GENES)), GENES, GENES, gz=False)
    with open(d / "barcodes.tsv", "a") as fh:
        fh.write("EXTRA-1\n")
    with pytest.raises(SclabelError, match=r"barcodes\.tsv: 31 barcodes but matrix\.mtx has 30 cells"):
        ingest([str(d), "-o", str(tmp_path / "s"), "--no-progress", "--tmp-dir", str(tmp_path)])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("sclabel-10x")]  # no temp dir either


def test_validate_warns_about_a_shard_the_index_drops(tmp_path: Path) -> None:
    src = write_h5ad(tmp_path / "a.h5ad", make_adata(300))
    store = tmp_path / "s"
    ingest([str(src), "-o", str(store), "--rows-per-shard", "100", "--no-progress"])
    raw = json.loads((store / fmt.INDEX_FILE).read_text())
    dropped = raw["shards"].pop()  # an edit that keeps every count consistent
    raw["num_rows"] -= dropped["num_rows"]
    raw["nnz"] -= dropped["nnz"]
    raw["datasets"][0]["num_rows"] -= dropped["num_rows"]
    raw["datasets"][0]["nnz"] -= dropped["nnz"]
    (store / fmt.INDEX_FILE).write_text(json.dumps(raw))
    problems, warnings = validate_store(store)
    assert problems == []
    assert any("part_00002" in w and "not referenced by index.json" in w for w in warnings), warnings


def test_temp_files_of_a_killed_ingest_are_removed_by_the_next_run(tmp_path: Path) -> None:
    """--shuffle buckets and the 10x spill of a SIGKILLed ingest: the next ingest on that --tmp-dir removes them."""
    n = 20000
    X = sp.random(n, len(GENES), density=0.3, format="csr", random_state=0, dtype=np.float32)
    X.data = np.ceil(X.data * 20)
    d = write_10x(tmp_path / "tenx", X.astype(np.int64), GENES, GENES, gz=False)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    args = [str(d), "--shuffle", "--tmp-dir", str(tmp), "--rows-per-shard", "100", "--no-progress"]
    cmd = [sys.executable, "-m", "data_tools", "ingest", *args]
    proc = subprocess.Popen(
        [*cmd, "-o", str(tmp_path / "s1")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any("part_00003" in dirs for _, dirs, _ in os.walk(tmp_path)):  # writing the shuffled rows
            break
        time.sleep(0.005)
    assert proc.poll() is None, "ingest finished before it could be killed; make the input bigger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert {p.name.split("-")[1] for p in tmp.iterdir()} == {"10x", "shuffle"}  # what the kill leaves
    subprocess.run([*cmd, "-o", str(tmp_path / "s2")], check=True, capture_output=True)
    assert list(tmp.iterdir()) == []


def test_ingest_and_annotation_read_ensembl_ids_from_the_same_column(tmp_path: Path) -> None:
    """One gene-column rule (data/input_rules.py): with several candidate var columns, ingest's reader and
    annotation's reader take the same one (they used to try different lists in different orders)."""
    from data_tools.readers import open_input
    from sclabel_dist.annotate.h5ad import read_h5ad
    from sclabel_dist.data.input_rules import ENSEMBL_COLUMNS

    adata = make_adata(20)
    n = adata.n_vars
    del adata.var["ensembl"]  # old lists disagreed on the rest: annotation took gene_ids, ingest ensembl_ids
    for column in ("feature_id", "gene_ids", "ensembl_ids"):
        adata.var[column] = [f"{column}-{j}" for j in range(n)]
    src = write_h5ad(tmp_path / "cols.h5ad", adata)
    reader = open_input(src)
    try:
        from_ingest = reader.ensembl
    finally:
        reader.close()
    from_annotation = read_h5ad(src).ensembl
    assert from_ingest == from_annotation
    first = next(c for c in ENSEMBL_COLUMNS if c in adata.var.columns)
    assert from_annotation == [f"{first}-{j}" for j in range(n)]
