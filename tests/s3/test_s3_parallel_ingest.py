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


def test_parts_staged_then_commit_publish_the_serial_store(
    store_h5ad: list[Path], s3_bucket: str, tmp_path: Path
) -> None:
    """--plan-only / --part i/N into s3:// build the store in --stage; `commit STAGE` publishes it (create and
    append), exactly the serial store; a second commit publishes nothing twice."""
    from data_tools.ingest_commit import main as commit

    local, url = tmp_path / "local", f"s3://{s3_bucket}/staged"
    ingest([str(store_h5ad[0]), "-o", str(local), *ARGS, "--shuffle"])
    ingest([str(store_h5ad[1]), "-o", str(local), *ARGS, "--append", "--shuffle"])
    for inp, extra, stage in (
        (store_h5ad[0], [], tmp_path / "stage0"),
        (store_h5ad[1], ["--append"], tmp_path / "stage1"),
    ):
        common = [str(inp), "-o", url, *ARGS, "--shuffle", *extra, "--stage", str(stage)]
        assert ingest([*common, "--plan-only"]) == 0
        assert ingest([*common, "--part", "1/2"]) == 0
        assert ingest([*common, "--part", "0/2"]) == 0
        if not extra:
            with pytest.raises(SclabelError, match="not a cell store"):
                fmt.read_index(url)  # nothing published before the commit
        assert commit([str(stage)]) == 0
        assert commit([str(stage)]) == 0  # already published: nothing twice
    a, b = ZarrCellStore(local), ZarrCellStore(url)
    assert a.num_rows == b.num_rows == 1200 and a.index.num_shards == b.index.num_shards == 12
    assert (_rows(a) != _rows(b)).nnz == 0
    assert [s.sha256 for s in a.index.shards] == [s.sha256 for s in b.index.shards]
    assert validate_store(url) == ([], [])


def test_a_staged_ingest_never_overwrites_a_store_committed_meanwhile(
    store_h5ad: list[Path], s3_bucket: str, tmp_path: Path
) -> None:
    from data_tools.ingest_commit import main as commit

    url, stage = f"s3://{s3_bucket}/raced", tmp_path / "stage"
    common = [str(store_h5ad[0]), "-o", url, *ARGS, "--stage", str(stage)]
    assert ingest([*common, "--plan-only"]) == 0
    assert ingest([*common, "--part", "0/1"]) == 0
    ingest([str(store_h5ad[1]), "-o", url, *ARGS])  # another writer creates the store first
    with pytest.raises(SclabelError, match="another writer committed to this store"):
        commit([str(stage)])
    assert ZarrCellStore(url).num_rows == 600  # the other writer's store, intact


def test_parts_into_object_storage_need_a_stage(
    store_h5ad: list[Path], s3_bucket: str, tmp_path: Path
) -> None:
    url = f"s3://{s3_bucket}/parts"
    for flag in (["--plan-only"], ["--part", "0/2"]):
        with pytest.raises(SclabelError, match="need --stage DIR"):
            ingest([str(store_h5ad[0]), "-o", url, *ARGS, *flag])
    with pytest.raises(SclabelError, match="--stage is for s3:// outputs"):
        ingest(
            [str(store_h5ad[0]), "-o", str(tmp_path / "s"), *ARGS, "--plan-only", "--stage", str(tmp_path)]
        )
    with pytest.raises(SclabelError, match="not a cell store"):
        fmt.read_index(url)


def test_the_slurm_array_script_publishes_to_object_storage(
    store_h5ad: list[Path], s3_bucket: str, tmp_path: Path
) -> None:
    """launch/slurm_ingest.sbatch with STAGE, as two array tasks one after the other: the last one publishes."""
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "launch" / "slurm_ingest.sbatch"
    url = f"s3://{s3_bucket}/slurm"
    said = []
    for task in ("0", "1"):
        env = dict(
            os.environ,  # the AWS_* settings of the s3_bucket fixture
            OUT=url,
            STAGE=str(tmp_path / "stage"),
            INPUTS=str(store_h5ad[0]),
            ARGS=" ".join(a for a in ARGS if a != "--no-progress"),  # the script adds it
            PYTHON=sys.executable,
            SLURM_ARRAY_TASK_ID=task,
            SLURM_ARRAY_TASK_COUNT="2",
        )
        proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        said.append(proc.stdout)
    assert "commit left to the task that finishes last" in said[0]
    assert f"published to {url}" in said[1] and "is committed" in said[1]
    assert ZarrCellStore(url).num_rows == 600 and validate_store(url) == ([], [])
