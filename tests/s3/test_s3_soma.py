"""A SOMA experiment at s3:// read through tiledbsoma's own S3 support, configured from the same AWS_* variables;
and `sclabel-data to-soma` reading a cell store at s3://."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_tools.ingest import main as ingest
from data_tools.to_soma import main as to_soma
from sclabel_dist.data.stores import open_store
from sclabel_dist.data.stores.location import as_path
from sclabel_dist.data.stores.soma_store import SomaCellStore
from sclabel_dist.data.stores.zarr_store import ZarrCellStore


def test_soma_experiment_at_s3_and_to_soma_from_s3(
    store_h5ad: list[Path], s3_bucket: str, tmp_path: Path
) -> None:
    url = f"s3://{s3_bucket}/cells"
    ingest([str(store_h5ad[0]), "-o", url, "--no-progress", "--obs-columns", "cell_type"])
    exp = tmp_path / "exp"
    assert to_soma([url, "--out", str(exp), "--quiet"]) == 0  # input read from S3
    # the experiment uploaded as it is, then opened at s3:// by tiledbsoma with the AWS_* endpoint
    root = as_path(f"s3://{s3_bucket}/exp")
    for f in sorted(p for p in exp.rglob("*") if p.is_file()):
        (root / f.relative_to(exp).as_posix()).upload(f)
    zarr = ZarrCellStore(url)
    soma = open_store(str(root), vocab=zarr.vocab)
    assert isinstance(soma, SomaCellStore) and soma.num_rows == zarr.num_rows == 600
    rows = np.arange(0, 600, 7)
    assert (soma.read_rows(rows).to_scipy() != zarr.read_rows(rows).to_scipy()).nnz == 0
    soma.close()
