"""`ingest --workers N -o s3://...` (issue 14): staged locally by the parallel writer, committed like the serial path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_tools.ingest import main as ingest
from data_tools.validate import validate_store
from sclabel_dist.data import format as fmt
from sclabel_dist.data.stores.zarr_store import ZarrCellStore
from sclabel_dist.errors import SclabelError

ARGS = ["--obs-columns", "cell_type", "--no-progress", "--rows-per-shard", "100"]


def _rows(store: ZarrCellStore):
    return store.read_rows(np.arange(store.num_rows)).to_scipy()


def test_workers_create_and_append_equal_the_serial_local_store(
    store_h5ad: list[Path], s3_bucket: str, tmp_path: Path
) -> None:
    local, url = tmp_path / "local", f"s3://{s3_bucket}/par"
    ingest([str(store_h5ad[0]), "-o", str(local), *ARGS, "--shuffle"])
    ingest([str(store_h5ad[1]), "-o", str(local), *ARGS, "--append", "--shuffle"])
    ingest([str(store_h5ad[0]), "-o", url, *ARGS, "--shuffle", "--workers", "2"])
    ingest([str(store_h5ad[1]), "-o", url, *ARGS, "--append", "--shuffle", "--workers", "2"])
    a, b = ZarrCellStore(local), ZarrCellStore(url)
    assert a.num_rows == b.num_rows == 1200 and a.index.num_shards == b.index.num_shards == 12
    assert (_rows(a) != _rows(b)).nnz == 0
    assert list(a.obs_values("cell_type")) == list(b.obs_values("cell_type"))
    # the shards are the serial ones, byte for byte (only the object names carry a per-run token)
    assert [s.sha256 for s in a.index.shards] == [s.sha256 for s in b.index.shards]
    assert validate_store(url) == ([], [])


def test_parts_refuse_object_storage(store_h5ad: list[Path], s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/parts"
    for flag in (["--plan-only"], ["--part", "0/2"]):
        with pytest.raises(SclabelError, match="--workers N"):
            ingest([str(store_h5ad[0]), "-o", url, *ARGS, *flag])
    with pytest.raises(SclabelError, match="not a cell store"):
        fmt.read_index(url)
